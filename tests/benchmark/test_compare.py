import json

import pytest

from padfree import cli
from padfree.benchmark import compare


def _pytest_benchmark(path, spreads):
    """{fullname: (q1, median, q3)} as pytest-benchmark writes it."""
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [
        {"fullname": name, "name": name.split("::")[-1],
         "stats": {"q1": q1, "median": median, "q3": q3, "mean": median}}
        for name, (q1, median, q3) in spreads.items()]}))
    return str(path)


def _padfree_bench(path, rounds):
    """{(distribution, mode): per-round speed-ups vs padded} as `padfree bench --json` writes them."""
    results = [{"distribution": d, "mode": "padded", "speedup_rounds": [1.0, 1.0, 1.0]}
               for d in dict.fromkeys(d for d, _ in rounds)]
    results += [{"distribution": d, "mode": m, "speedup_rounds": values} for (d, m), values in rounds.items()]
    path.write_text(json.dumps({"device": "CPU", "results": results}))
    return str(path)


def _verdict(out, name):
    return out.split(name)[1].splitlines()[0]


def test_a_slower_spread_that_does_not_overlap_is_a_regression(tmp_path, capsys):
    old = _pytest_benchmark(tmp_path / "old.json", {"b::tight": (1.00, 1.01, 1.02), "b::noisy": (0.8, 1.0, 1.3)})
    new = _pytest_benchmark(tmp_path / "new.json", {"b::tight": (1.04, 1.05, 1.06), "b::noisy": (0.9, 1.25, 1.6)})
    assert cli.main(["bench-compare", old, new]) == 1
    out = capsys.readouterr().out
    # a consistent 4% slow-down is caught; a 25% slower median inside a wide noisy spread is not
    assert "REGRESSION" in _verdict(out, "b::tight") and "REGRESSION" not in _verdict(out, "b::noisy")
    assert "25.0% worse" in _verdict(out, "b::noisy")
    assert "1 regression(s) in 2 compared" in out


def test_faster_or_overlapping_runs_pass(tmp_path):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": (0.9, 1.0, 1.1), "t::b": (0.9, 1.0, 1.1)})
    new = _pytest_benchmark(tmp_path / "new.json", {"t::a": (1.05, 1.15, 1.2), "t::b": (0.4, 0.5, 0.6)})
    assert cli.main(["bench-compare", old, new]) == 0


def test_threshold_also_requires_a_large_enough_change(tmp_path):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": (1.00, 1.01, 1.02)})
    new = _pytest_benchmark(tmp_path / "new.json", {"t::a": (1.04, 1.05, 1.06)})
    assert cli.main(["bench-compare", old, new]) == 1
    assert cli.main(["bench-compare", old, new, "--threshold", "0.10"]) == 0


def test_padfree_bench_reports_compare_speedups_by_their_round_spreads(tmp_path):
    old = _padfree_bench(tmp_path / "old.json", {("flan", "padding_free"): [3.4, 3.6, 3.9],
                                                 ("flan", "naive_packing"): [2.0, 2.2, 2.3]})
    new = _padfree_bench(tmp_path / "new.json", {("flan", "padding_free"): [2.5, 2.7, 3.0],
                                                 ("flan", "naive_packing"): [1.5, 2.1, 2.6]})
    kind, before = compare.load(old)
    assert kind == compare.PADFREE_BENCH and set(before) == {"flan/padding_free", "flan/naive_packing"}
    rows = compare.compare(kind, before, compare.load(new)[1])
    assert [(r.name, r.regression) for r in rows] == [("flan/padding_free", True), ("flan/naive_packing", False)]
    assert rows[0].change == pytest.approx(1 - 2.7 / 3.6)
    assert cli.main(["bench-compare", old, new]) == 1


def test_a_report_without_rounds_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"results": [{"distribution": "flan", "mode": "padding_free",
                                             "useful_tokens_per_s": 3.0}]}))
    with pytest.raises(ValueError, match="no per-round ratios"):
        compare.load(path)


def test_entries_in_one_file_only_are_listed_not_flagged(tmp_path, capsys):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": (1, 1, 1), "t::gone": (1, 1, 1)})
    new = _pytest_benchmark(tmp_path / "new.json", {"t::a": (1, 1, 1), "t::added": (9, 9, 9)})
    assert cli.main(["bench-compare", old, new]) == 0
    out = capsys.readouterr().out
    assert "only in old" in out and "only in new" in out


def test_mixed_or_unknown_files_are_errors(tmp_path, capsys):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": (1, 1, 1)})
    new = _padfree_bench(tmp_path / "new.json", {("flan", "padding_free"): [1.0, 1.1, 1.2]})
    assert cli.main(["bench-compare", old, new]) == 2
    assert "cannot compare" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a pytest-benchmark JSON"):
        compare.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="threshold"):
        compare.compare(compare.PYTEST_BENCHMARK, {}, {}, -0.1)
