"""End-to-end benchmark behind `padfree bench` and `padfree bench-compare`.

    distributions   example-length distributions (FLAN-like, OrcaMath-like, user lengths)
    batches         the batching modes: padded, padded_sorted, naive_packing, padding_free
    runner          trains a small model under each mode and measures it
    report          terminal table, JSON, PNG plot
    cli             `padfree bench` arguments and entry point
    compare         `padfree bench-compare`: regressions between two JSON results
"""
