"""`padfree bench-compare OLD.json NEW.json [--threshold F]`: flag performance regressions.

A regression is a change the runs' own spreads cannot explain: the new run's spread lies wholly
on the worse side of the old run's (the two do not overlap), and the medians differ by more than
`--threshold` (a fraction; default 0, the spreads alone decide). Noise that moves both runs alike
makes their spreads wider, not disjoint, so a busy machine does not fake a regression, and a
small but consistent slow-down is still caught.

Two kinds of file:
- pytest-benchmark JSON (`--benchmark-json`, or `.benchmarks/` autosaves): entries by test
  fullname; the figure is the time per round (lower is better), its spread the interquartile
  range [q1, q3] that pytest-benchmark records.
- `padfree bench --json` reports: one entry per (distribution, mode) other than `padded`; the
  figure is the mode's speed-up over padded (higher is better), its spread the min-max of the
  per-round ratios (`speedup_rounds`). Ratios measured in the same rounds are what stays put
  when the machine's load changes; absolute tokens/s do not.

Prints a table; exits 1 when any entry regressed, 0 otherwise. Entries present in only one file
are listed and never count as regressions.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

PYTEST_BENCHMARK = "pytest-benchmark time per round (s), spread q1-q3"
PADFREE_BENCH = "padfree bench speed-up vs padded, spread min-max of the rounds"
LOWER_IS_BETTER = {PYTEST_BENCHMARK: True, PADFREE_BENCH: False}


@dataclass
class Figure:
    median: float
    low: float
    high: float


@dataclass
class Row:
    name: str
    old: Figure | None
    new: Figure | None
    change: float | None  # fraction worse (positive) or better (negative); None if in one file only
    regression: bool


def _pytest_benchmark_figure(entry: dict) -> Figure:
    stats = entry["stats"]
    return Figure(float(stats["median"]), float(stats["q1"]), float(stats["q3"]))


def _padfree_bench_figure(path: str | Path, result: dict) -> Figure:
    rounds = result.get("speedup_rounds")
    if not rounds:
        raise ValueError(f"{path}: {result['distribution']}/{result['mode']} has no per-round ratios "
                         f"(`speedup_rounds`); rerun `padfree bench --json` with this version")
    return Figure(statistics.median(rounds), min(rounds), max(rounds))


def load(path: str | Path) -> tuple[str, dict[str, Figure]]:
    """(kind, {entry name: figure}) from a pytest-benchmark JSON or a `padfree bench --json` report."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        return PYTEST_BENCHMARK, {b["fullname"]: _pytest_benchmark_figure(b) for b in data["benchmarks"]}
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        return PADFREE_BENCH, {f"{r['distribution']}/{r['mode']}": _padfree_bench_figure(path, r)
                               for r in data["results"] if r["mode"] != "padded"}
    raise ValueError(f"{path}: neither a pytest-benchmark JSON (key 'benchmarks') nor a "
                     f"`padfree bench --json` report (key 'results')")


def is_regression(old: Figure, new: Figure, lower_is_better: bool, threshold: float) -> bool:
    """The new spread lies wholly on the worse side of the old one, and the medians differ by > threshold."""
    disjoint = new.low > old.high if lower_is_better else new.high < old.low
    return disjoint and _change(old, new, lower_is_better) > threshold


def _change(old: Figure, new: Figure, lower_is_better: bool) -> float:
    return new.median / old.median - 1 if lower_is_better else 1 - new.median / old.median


def compare(kind: str, old: dict[str, Figure], new: dict[str, Figure], threshold: float = 0.0) -> list[Row]:
    """One row per entry of either file, regressions flagged (see the module docstring)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    lower_is_better = LOWER_IS_BETTER[kind]
    rows = []
    for name in list(dict.fromkeys([*old, *new])):
        before, after = old.get(name), new.get(name)
        if before is None or after is None:
            rows.append(Row(name, before, after, None, False))
            continue
        rows.append(Row(name, before, after, _change(before, after, lower_is_better),
                        is_regression(before, after, lower_is_better, threshold)))
    return rows


def format_rows(kind: str, rows: list[Row], threshold: float) -> str:
    def figure(value: Figure | None) -> str:
        return "-" if value is None else f"{value.median:.4g} [{value.low:.4g}, {value.high:.4g}]"

    def verdict(row: Row) -> str:
        if row.change is None:
            return "only in old" if row.new is None else "only in new"
        word = f"{100 * row.change:.1f}% worse" if row.change > 0 else f"{-100 * row.change:.1f}% better"
        return word + ("  REGRESSION" if row.regression else "")

    cells = [(row.name, figure(row.old), figure(row.new), verdict(row)) for row in rows]
    headers = ("entry", "old median [spread]", "new median [spread]", "change")
    widths = [max(len(headers[i]), *(len(cell[i]) for cell in cells)) if cells else len(headers[i])
              for i in range(4)]
    rule = "the spreads do not overlap" + (f" and more than {100 * threshold:.0f}% worse" if threshold else "")
    lines = [f"{kind}; regression: {rule}",
             "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    regressions = sum(row.regression for row in rows)
    lines.append(f"{regressions} regression(s) in {sum(row.change is not None for row in rows)} compared")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", help="baseline JSON (pytest-benchmark or padfree bench --json)")
    parser.add_argument("new", help="JSON to check, of the same kind")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="besides disjoint spreads, require the median to be more than this fraction "
                             "worse (default 0: the spreads alone decide)")


def run(args: argparse.Namespace) -> int:
    old_kind, old = load(args.old)
    new_kind, new = load(args.new)
    if old_kind != new_kind:
        raise ValueError(f"cannot compare a {old_kind} file ({args.old}) with a {new_kind} file ({args.new})")
    rows = compare(old_kind, old, new, args.threshold)
    print(format_rows(old_kind, rows, args.threshold))
    return 1 if any(row.regression for row in rows) else 0
