"""The pytest-benchmark suites under bench/ run on CPU at their quick sizes, timed and with
--benchmark-disable (each case once: what `bench/gpu.sh --lease` does to warm the Triton cache, and
what xdist forces), and record their extra_info."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("timed", [True, False], ids=["timed", "benchmark_disable"])
def test_bench_suites_run_on_cpu(tmp_path, timed):
    report = tmp_path / "bench.json"
    args = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--bench-device", "cpu",
            "--bench-size", "quick"]
    args += ["--benchmark-json", str(report)] if timed else ["--benchmark-disable"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
    if timed:
        benchmarks = json.loads(report.read_text())["benchmarks"]
        suites = {b["fullname"].split("::")[0] for b in benchmarks}
        assert suites == {f"bench/test_{s}.py" for s in ("attention", "lora", "lora_mixture", "moe")}
        for b in benchmarks:
            assert b["extra_info"]["median_s"] == b["stats"]["median"]
            if "test_lora" in b["fullname"]:
                assert b["extra_info"]["tokens_per_s"] > 0


def _bench(name, impl, median, q1, q3, tflops=None):
    info = {"backend": impl, "device": "GPU-X", "date": "2026-01-02", "versions": {"torch": "9.9", "triton": "8.8"}}
    if tflops is not None:
        info["tflops"] = tflops
    return {"name": name, "extra_info": info, "stats": {"median": median, "q1": q1, "q3": q3, "rounds": 20}}


def test_suite_markdown_gives_median_ratios_and_the_range_the_quartiles_allow(tmp_path):
    from padfree.benchmark import report

    path = tmp_path / "lora.json"
    path.write_text(json.dumps({"benchmarks": [
        _bench("test_lora_linear[full-h64-r8-padfree-fwd]", "padfree", 0.002, 0.0018, 0.0025, tflops=123.4),
        _bench("test_lora_linear[full-h64-r8-base-fwd]", "base", 0.003, 0.0027, 0.0036),
        _bench("test_lora_linear[full-h64-r8-padfree-fwd_bwd]", "padfree", 0.004, 0.004, 0.004),
        _bench("test_lora_linear[full-h64-r8-peft-fwd]", "peft", 0.001, 0.001, 0.001)]}))
    assert report.suite_markdown(path, ("base", "peft")).splitlines() == [
        f"GPU-X, torch 9.9, Triton 8.8, 2026-01-02, 20 rounds per case, from `{path.as_posix()}`:",
        "",
        "| case | padfree median ms | padfree TFLOP/s | base / padfree | peft / padfree |",
        "|---|---|---|---|---|",
        "| h64 r8 fwd | 2.000 | 123 | 1.50x (1.08-2.00) | 0.50x (0.40-0.56) |",
        "| h64 r8 fwd_bwd | 4.000 | - | - | - |"]


def test_cuda_timing_splits_host_launch_time_from_device_time(monkeypatch):
    """On CUDA, `common.run` adds host_s (an unsynchronised call on an idle device) and device_s
    (CUDA events around the call, queued behind a sleep kernel so the device runs the kernels
    back to back). Checked with the CUDA calls faked: the order of the calls and which clock each
    number comes from."""
    import torch

    from bench import common

    log, clock = [], [0.0]

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.at = None

        def record(self):
            log.append("record")
            self.at = len(log)

        def elapsed_time(self, other):
            return 2.5 * (other.at - self.at)  # milliseconds

    def fn():
        log.append("fn")
        clock[0] += 0.004

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(f"sleep {cycles}"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: log.append("sync"))
    monkeypatch.setattr("time.perf_counter", lambda: clock[0])
    host, device = common.host_and_device_seconds(fn, torch.device("cuda", 0), rounds=3)
    # the sleep covers twice the host time just measured, at least MIN_SLEEP_S
    cycles = int(common.SLEEP_CLOCK_HZ * max(common.MIN_SLEEP_S, 2 * 0.004))
    one_round = ["sync", "fn", "sync", f"sleep {cycles}", "record", "fn", "record", "sync"]
    assert log == one_round * 3
    assert host == 0.004  # the host clock around the unsynchronised call only
    assert device == 2.5 * 2 / 1e3  # begin and end events two log entries apart, in seconds
