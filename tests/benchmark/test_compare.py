import json

import pytest

from padfree import cli
from padfree.benchmark import compare


def _pytest_benchmark(path, medians):
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [
        {"fullname": name, "name": name.split("::")[-1], "stats": {"median": value, "mean": value}}
        for name, value in medians.items()]}))
    return str(path)


def _padfree_bench(path, throughputs):
    path.write_text(json.dumps({"device": "CPU", "results": [
        {"distribution": d, "mode": m, "useful_tokens_per_s": value} for (d, m), value in throughputs.items()]}))
    return str(path)


def test_pytest_benchmark_20_percent_slower_is_flagged_5_percent_is_not(tmp_path, capsys):
    old = _pytest_benchmark(tmp_path / "old.json", {"bench/a.py::test_x": 1.0, "bench/a.py::test_y": 2.0})
    new = _pytest_benchmark(tmp_path / "new.json", {"bench/a.py::test_x": 1.2, "bench/a.py::test_y": 2.1})
    assert cli.main(["bench-compare", old, new]) == 1
    out = capsys.readouterr().out
    assert "test_x" in out and "REGRESSION" in out.split("test_x")[1].splitlines()[0]
    assert "REGRESSION" not in out.split("test_y")[1].splitlines()[0]
    assert "1 regression(s) in 2 compared" in out


def test_small_changes_and_speedups_pass(tmp_path):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": 1.0, "t::b": 1.0})
    new = _pytest_benchmark(tmp_path / "new.json", {"t::a": 1.05, "t::b": 0.5})
    assert cli.main(["bench-compare", old, new]) == 0


def test_threshold_is_configurable(tmp_path):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": 1.0})
    new = _pytest_benchmark(tmp_path / "new.json", {"t::a": 1.05})
    assert cli.main(["bench-compare", old, new, "--threshold", "0.02"]) == 1


def test_padfree_bench_reports_compare_throughput(tmp_path):
    old = _padfree_bench(tmp_path / "old.json", {("flan", "padded"): 1000.0, ("flan", "padding_free"): 3000.0})
    slower = _padfree_bench(tmp_path / "new.json", {("flan", "padded"): 950.0, ("flan", "padding_free"): 2400.0})
    kind, before = compare.load(old)
    rows = compare.compare(kind, before, compare.load(slower)[1], 0.10)
    assert [(r.name, r.regression) for r in rows] == [("flan/padded", False), ("flan/padding_free", True)]
    assert rows[1].change == pytest.approx(0.2)
    assert cli.main(["bench-compare", old, slower]) == 1


def test_entries_in_one_file_only_are_listed_not_flagged(tmp_path, capsys):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": 1.0, "t::gone": 1.0})
    new = _pytest_benchmark(tmp_path / "new.json", {"t::a": 1.0, "t::added": 9.0})
    assert cli.main(["bench-compare", old, new]) == 0
    out = capsys.readouterr().out
    assert "only in old" in out and "only in new" in out


def test_mixed_or_unknown_files_are_errors(tmp_path, capsys):
    old = _pytest_benchmark(tmp_path / "old.json", {"t::a": 1.0})
    new = _padfree_bench(tmp_path / "new.json", {("flan", "padded"): 1.0})
    assert cli.main(["bench-compare", old, new]) == 2
    assert "cannot compare" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a pytest-benchmark JSON"):
        compare.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="threshold"):
        compare.compare(compare.PYTEST_BENCHMARK, {}, {}, -0.1)
