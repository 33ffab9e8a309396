"""Terminal table, JSON file and PNG plot of a `padfree bench` report.

The report (from `runner.run`) is
    {"device", "versions", "date", "config", "machine": {"before", "after"}, "length_stats",
     "peak_memory_note", "activation_note",
     "results": [{"distribution", "mode", "useful_tokens_per_s", "round_tokens_per_s", "step_time_s",
                  "peak_memory_bytes", "activation_bytes", "loss", "fill_ratio", "speedup_vs_padded",
                  "speedup_range", "speedup_rounds", "speedup_flag", ...}]}
"""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (("distribution", "distribution"), ("mode", "mode"), ("tok/s", "useful_tokens_per_s"),
           ("vs padded", "speedup_vs_padded"),
           ("range", "speedup_range"), ("step s", "step_time_s"), ("peak MiB", "peak_memory_bytes"),
           ("mem vs padded", "memory_vs_padded"), ("act MiB", "activation_bytes"),
           ("act vs padded", "activations_vs_padded"), ("fill", "fill_ratio"), ("loss", "loss"),
           ("loss gap", "loss_gap_vs_padded"))


_FORMATS = {
    "useful_tokens_per_s": "{:,.0f}".format,
    "peak_memory_bytes": lambda value: f"{value / 2**20:,.0f}",
    "activation_bytes": lambda value: f"{value / 2**20:,.1f}",
    "speedup_vs_padded": "{:.2f}x".format,
    "speedup_range": lambda value: f"{value[0]:.2f}-{value[1]:.2f}x",
    "memory_vs_padded": "{:.2f}x".format,
    "activations_vs_padded": "{:.2f}x".format,
    "step_time_s": "{:.3f}".format,
    "fill_ratio": "{:.2f}".format,
    "loss": "{:.4f}".format,
    "loss_gap_vs_padded": "{:.1e}".format,
}


def _cell(key: str, value) -> str:
    return "n/a" if value is None else _FORMATS.get(key, str)(value)


def _load(conditions: dict) -> str:
    load = conditions.get("load_average")
    clock = conditions.get("cpu_mhz")
    return (f"load {load[0]:.2f}" if load else "load n/a") + (f" @ {clock:,.0f} MHz" if clock else "")


def _busier_than_its_cores(report: dict) -> str | None:
    """A warning when the load average passed the CPU count while a multi-threaded CPU run ran."""
    conditions = [report["machine"]["before"], report["machine"]["after"]]
    loads = [c["load_average"][0] for c in conditions if c.get("load_average")]
    cores = conditions[0].get("cpu_count")
    if report["config"]["device"] != "cpu" or not loads or not cores or max(loads) <= cores:
        return None
    if report["config"].get("threads") == 1:
        return None
    return (f"busy: load {max(loads):.1f} on {cores} CPUs; torch's threads then wait on each other at every op, "
            f"and the timings measure that waiting more than the work: rerun with --threads 1")


def _wall(report: dict) -> str:
    return f", {report['wall_s']:,.0f} s wall" if report.get("wall_s") is not None else ""


def load(path: str | Path) -> dict:
    """A report written by `write_json` (or `padfree bench --json`)."""
    return json.loads(Path(path).read_text())


def table(report: dict) -> str:
    """The results as an aligned text table, with a header line naming device, model and date."""
    rows = [[_cell(key, result.get(key)) + ("?" if key == "speedup_vs_padded" and result.get("speedup_flag") else "")
             for _, key in COLUMNS] for result in report["results"]]
    headers = [title for title, _ in COLUMNS]
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    config = report["config"]
    model = config["model_size"] + (" MoE" if config["moe"] else "") + (" LoRA" if config["lora"] else "")
    lines = [f"padfree bench: {report['device']}, model {model}, {config['dtype']}, "
             f"{config['tokens_per_step']} tokens/step, {config['steps']} rounds of one timed step per mode "
             f"(+{config['warmup']} warmup), {report['date']}",
             f"machine: {_load(report['machine']['before'])} before, {_load(report['machine']['after'])} after "
             f"({report['machine']['before']['cpu_count']} CPUs)" + _wall(report),
             "  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))),
             "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines.append("tok/s: useful (non-pad) tokens per second over the timed steps; vs padded: median of the "
                 "per-round ratios of tok/s to padded's, range: their min-max; fill: useful / computed tokens; "
                 "loss gap: max |loss - padded loss| over the same steps (n/a for padded_sorted, whose steps "
                 "hold other examples)")
    flagged = [r for r in report["results"] if r.get("speedup_flag")]
    for result in flagged:
        lines.append(f"? {result['distribution']} {result['mode']}: {result['speedup_flag']}")
    if flagged:
        lines.append("? marks a ratio its rounds do not pin down: rerun with more --steps or on a quieter machine")
    busy = _busier_than_its_cores(report)
    if busy:
        lines.append(busy)
    lines.append(f"peak memory: {report['peak_memory_note']}")
    lines.append(f"act: {report['activation_note']}")
    return "\n".join(lines)


def markdown(path: str | Path, modes: tuple[str, ...] = ("padded_sorted", "padding_free")) -> str:
    """A Markdown summary of a saved report: where and when it ran, and the ratios of `modes`.

    Docs quote measured figures through this (a test regenerates it), never by retyping them.
    """
    report = load(path)
    config, conditions = report["config"], report["machine"]
    model = config["model_size"] + (" MoE" if config["moe"] else "") + (" LoRA" if config["lora"] else "")
    lines = [f"{report['device']}, {report['date'][:10]}, model {model} {config['dtype']}, "
             f"{config['steps']} rounds, {_load(conditions['before'])} before / {_load(conditions['after'])} after "
             f"({conditions['before']['cpu_count']} CPUs){_wall(report)}, from `{Path(path).as_posix()}`:",
             "",
             "| distribution | mode | useful tok/s vs padded | range over rounds | activations vs padded |",
             "|---|---|---|---|---|"]
    shown = [result for result in report["results"] if result["mode"] in modes]
    for result in shown:
        lines.append(f"| {result['distribution']} | {result['mode']} | "
                     f"{_cell('speedup_vs_padded', result['speedup_vs_padded'])}"
                     f"{'?' if result['speedup_flag'] else ''} | "
                     f"{_cell('speedup_range', result['speedup_range'])} | "
                     f"{_cell('activations_vs_padded', result['activations_vs_padded'])} |")
    flagged = [f"{result['distribution']} {result['mode']}: {result['speedup_flag']}"
               for result in shown if result["speedup_flag"]]
    if flagged:
        lines += ["", "? " + "; ".join(flagged) + "."]
    return "\n".join(lines)


def _implementation(bench: dict) -> str:
    info = bench["extra_info"]
    return info.get("impl") or info["backend"]


def suite_markdown(path: str | Path, baselines: tuple[str, ...], impl: str = "padfree") -> str:
    """A Markdown table of a pytest-benchmark JSON written by a bench/test_*.py suite: per case
    `impl` ran, its median time and TFLOP/s, and per baseline the ratio of the baseline's median
    time to `impl`'s (> 1: `impl` is faster) with, in brackets, the range the two interquartile
    ranges allow (baseline q1 / impl q3 to baseline q3 / impl q1). A case is a test id without its
    implementation and size tokens; a baseline missing from a case shows as "-".

    Docs quote GPU results through this (a test regenerates it), never by retyping them.
    """
    benchmarks = json.loads(Path(path).read_text())["benchmarks"]
    tests = {bench["name"].partition("[")[0] for bench in benchmarks}
    cases: dict[str, dict[str, dict]] = {}
    for bench in benchmarks:
        name = _implementation(bench)
        test, _, params = bench["name"].partition("[")
        words = [p for p in params.rstrip("]").split("-") if p not in (name, "full", "quick")]
        case = " ".join(([test.removeprefix("test_")] if len(tests) > 1 else []) + words)
        cases.setdefault(case, {})[name] = bench
    info = benchmarks[0]["extra_info"]
    versions = info["versions"]
    lines = [f"{info['device']}, torch {versions['torch']}, Triton {versions['triton']}, {info['date']}, "
             f"{benchmarks[0]['stats']['rounds']} rounds per case, from `{Path(path).as_posix()}`:",
             "",
             f"| case | {impl} median ms | {impl} TFLOP/s | " + " | ".join(f"{b} / {impl}" for b in baselines) + " |",
             "|---|---|---|" + "---|" * len(baselines)]
    for case, by_name in cases.items():
        if impl not in by_name:
            continue
        mine = by_name[impl]["stats"]
        cells = []
        for baseline in baselines:
            other = by_name.get(baseline)
            if other is None:
                cells.append("-")
                continue
            theirs = other["stats"]
            cells.append(f"{theirs['median'] / mine['median']:.2f}x "
                         f"({theirs['q1'] / mine['q3']:.2f}-{theirs['q3'] / mine['q1']:.2f})")
        tflops = by_name[impl]["extra_info"].get("tflops")
        lines.append(f"| {case} | {mine['median'] * 1e3:.3f} | {'-' if tflops is None else f'{tflops:.0f}'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict, path: str | Path) -> None:
    """Bar chart of useful tokens/s per mode, one group per distribution, speedups annotated."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    results = report["results"]
    groups = list(dict.fromkeys(r["distribution"] for r in results))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    figure, axes = pyplot.subplots(figsize=(2.2 + 2.4 * len(groups), 4.2))
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        xs, heights, labels = [], [], []
        for group_index, group in enumerate(groups):
            match = [r for r in results if r["distribution"] == group and r["mode"] == mode]
            if match:
                xs.append(group_index + (index - (len(modes) - 1) / 2) * width)
                heights.append(match[0]["useful_tokens_per_s"])
                labels.append(f"{match[0]['speedup_vs_padded']:.2f}x" + ("?" if match[0]["speedup_flag"] else ""))
        bars = axes.bar(xs, heights, width, label=mode)
        axes.bar_label(bars, labels, fontsize=7)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("useful tokens / s")
    config = report["config"]
    axes.set_title(f"padfree bench: {config['model_size']}, {config['dtype']}\n{report['device']}", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
