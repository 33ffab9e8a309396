"""`padfree bench-compare OLD.json NEW.json [--threshold 0.10]`: flag performance regressions.

Accepts two pytest-benchmark JSON files (`--benchmark-json`, or `.benchmarks/` autosaves),
compared by test fullname on the median time (lower is better; a regression is
new / old - 1 > threshold), or two `padfree bench --json` reports, compared per
(distribution, mode) on useful tokens/s (higher is better; a regression is
1 - new / old > threshold). Prints a table; exits 1 when any entry regressed, 0 otherwise.
Entries present in only one file are listed and never count as regressions.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

PYTEST_BENCHMARK = "pytest-benchmark median time (s)"
PADFREE_BENCH = "padfree bench useful tokens/s"


@dataclass
class Row:
    name: str
    old: float | None
    new: float | None
    change: float | None  # fraction worse (positive) or better (negative); None if in one file only
    regression: bool


def load(path: str | Path) -> tuple[str, dict[str, float]]:
    """(kind, {entry name: metric}) from a pytest-benchmark JSON or a `padfree bench --json` report."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        return PYTEST_BENCHMARK, {b["fullname"]: float(b["stats"]["median"]) for b in data["benchmarks"]}
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        return PADFREE_BENCH, {f"{r['distribution']}/{r['mode']}": float(r["useful_tokens_per_s"])
                               for r in data["results"]}
    raise ValueError(f"{path}: neither a pytest-benchmark JSON (key 'benchmarks') nor a "
                     f"`padfree bench --json` report (key 'results')")


def compare(kind: str, old: dict[str, float], new: dict[str, float], threshold: float) -> list[Row]:
    """One row per entry of either file, regressions flagged against `threshold` (a fraction)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    rows = []
    for name in list(dict.fromkeys([*old, *new])):
        before, after = old.get(name), new.get(name)
        if before is None or after is None:
            rows.append(Row(name, before, after, None, False))
            continue
        change = after / before - 1 if kind == PYTEST_BENCHMARK else 1 - after / before
        rows.append(Row(name, before, after, change, change > threshold))
    return rows


def format_rows(kind: str, rows: list[Row], threshold: float) -> str:
    def number(value):
        return "-" if value is None else f"{value:.4g}"

    def verdict(row):
        if row.change is None:
            return "only in old" if row.new is None else "only in new"
        return f"{100 * row.change:.1f}% worse" + ("  REGRESSION" if row.regression else "") \
            if row.change > 0 else f"{-100 * row.change:.1f}% better"

    cells = [(row.name, number(row.old), number(row.new), verdict(row)) for row in rows]
    headers = ("entry", "old", "new", "change")
    widths = [max(len(headers[i]), *(len(cell[i]) for cell in cells)) if cells else len(headers[i])
              for i in range(4)]
    lines = [f"{kind}; regression: more than {100 * threshold:.0f}% worse",
             "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    regressions = sum(row.regression for row in rows)
    lines.append(f"{regressions} regression(s) in {sum(row.change is not None for row in rows)} compared")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", help="baseline JSON (pytest-benchmark or padfree bench --json)")
    parser.add_argument("new", help="JSON to check, of the same kind")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="flag entries more than this fraction worse (default 0.10)")


def run(args: argparse.Namespace) -> int:
    old_kind, old = load(args.old)
    new_kind, new = load(args.new)
    if old_kind != new_kind:
        raise ValueError(f"cannot compare a {old_kind} file ({args.old}) with a {new_kind} file ({args.new})")
    rows = compare(old_kind, old, new, args.threshold)
    print(format_rows(old_kind, rows, args.threshold))
    return 1 if any(row.regression for row in rows) else 0
