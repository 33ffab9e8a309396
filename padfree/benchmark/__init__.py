"""The benchmark library: the end-to-end `padfree bench`, `padfree bench-compare`, and the
measuring helpers the pytest-benchmark suites share.

Two homes, two jobs: this package is installed with padfree and is what the `padfree bench` and
`padfree bench-compare` commands run; `bench/` at the repository root holds the per-op
pytest-benchmark suites (`python -m pytest bench/`), which import `machine` and `memory` from here.

    distributions   example-length distributions (FLAN-like, OrcaMath-like, user lengths)
    batches         the batching modes: padded, padded_sorted, naive_packing, padding_free
    runner          trains a small model under each mode, the modes interleaved in rounds
    report          terminal table, JSON, Markdown summary, PNG plot
    cli             `padfree bench` arguments and entry point
    compare         `padfree bench-compare`: regressions between two JSON results, by their spreads
    machine         device name, versions, load average and CPU clock of a run
    memory          `SavedTensors`: activation bytes saved for backward, on any device
"""
