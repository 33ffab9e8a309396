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
