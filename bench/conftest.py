"""pytest-benchmark suites of padfree's ops (this directory, `bench/`, is not installed).

`bench/` holds the per-op timing suites, run with pytest; the installed library package
`padfree.benchmark` holds the end-to-end `padfree bench` and the measuring helpers these suites
import (`machine`, `memory`). Results go to `bench/results/` (see docs/benchmarks.md).

    python -m pytest bench/ --benchmark-json out.json            # on the default device
    python -m pytest bench/ --bench-device cpu --bench-size quick # small shapes, CPU
    python -m pytest bench/ --benchmark-autosave                  # .benchmarks/ history

On a GPU, kernels are compiled (TRITON_INTERPRET must be unset). On CPU, padfree runs its
reference backend (the Triton interpreter is a correctness tool, not a performance one), so CPU
numbers compare PyTorch implementations only; the suites are meant for GPUs.
"""

import os

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("padfree bench")
    group.addoption("--bench-device", default=None,
                    help="cuda or cpu (default: cuda when available, else cpu)")
    group.addoption("--bench-size", default=None, choices=("quick", "full"),
                    help="quick: small shapes; full: the sizes the targets are stated at "
                         "(default: full on cuda, quick on cpu)")


def chosen_device(config: pytest.Config) -> str:
    """--bench-device, else cuda when available, else cpu (also for suites' pytest_generate_tests)."""
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def chosen_size(config: pytest.Config) -> str:
    """--bench-size, else full on cuda and quick on cpu."""
    return config.getoption("--bench-size") or ("full" if chosen_device(config) == "cuda" else "quick")


@pytest.fixture(scope="session")
def bench_device(request):
    name = chosen_device(request.config)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda but CUDA is not available", returncode=2)
    if name == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.exit("unset TRITON_INTERPRET to benchmark compiled kernels", returncode=2)
    return torch.device(name)


@pytest.fixture(scope="session")
def bench_size(request, bench_device):
    return chosen_size(request.config)
