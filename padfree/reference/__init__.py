"""Plain-PyTorch implementations of every op: the CPU backend and the oracle of the tests."""
