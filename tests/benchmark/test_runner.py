import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from padfree import cli
from padfree.benchmark import cli as bench_cli
from padfree.benchmark import report as bench_report
from padfree.benchmark import runner

MICRO = ["--model-size", "micro", "--tokens-per-step", "256", "--max-length", "128", "--no-progress"]
RESULT_KEYS = {"distribution", "mode", "useful_tokens_per_s", "step_time_s", "peak_memory_bytes", "loss",
               "activation_bytes", "activations_vs_padded", "fill_ratio", "speedup_vs_padded", "step_time_vs_padded",
               "loss_gap_vs_padded", "losses", "round_tokens_per_s", "speedup_range", "speedup_rounds",
               "speedup_flag"}


def test_micro_run_writes_the_json_schema_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    modes = ["padded", "padded_sorted", "naive_packing", "padding_free"]
    assert cli.main(["bench", *MICRO, "--steps", "2", "--warmup", "1", "--modes", *modes,
                     "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "versions", "date", "config", "machine", "wall_s", "results"} <= set(report)
    assert report["wall_s"] > 0
    assert report["device"].startswith("CPU") and report["versions"]["torch"]
    for moment in ("before", "after"):  # Linux: load averages and a CPU clock are readable
        conditions = report["machine"][moment]
        assert len(conditions["load_average"]) == 3 and conditions["cpu_mhz"] > 0 and conditions["cpu_count"] >= 1
    assert [(r["distribution"], r["mode"]) for r in report["results"]] == \
        [(d, m) for d in ("flan", "orcamath") for m in modes]
    for result in report["results"]:
        assert RESULT_KEYS <= set(result)
        assert result["useful_tokens_per_s"] > 0 and result["step_time_s"] > 0
        assert result["peak_memory_bytes"] is None  # CPU: not measured, and the report says so
        assert 0 < result["fill_ratio"] <= 1 and len(result["losses"]) == 3
        assert result["activation_bytes"] > 0 and len(result["round_tokens_per_s"]) == 2
        if result["mode"] == "padded":
            assert result["speedup_vs_padded"] == 1.0 and result["loss_gap_vs_padded"] == 0.0
            assert result["speedup_flag"] is None
        else:  # two rounds: no spread to judge the ratio by, and the report says so
            assert "too few for a spread" in result["speedup_flag"]
        if result["mode"] == "naive_packing":
            assert result["fill_ratio"] == 1.0 and result["loss_gap_vs_padded"] > 1e-4
    assert "not measured on CPU" in report["peak_memory_note"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "naive_packing" in table and "vs padded" in table and "act vs padded" in table and "range" in table
    assert "? flan padding_free: 2 round(s): too few for a spread" in table


def test_padding_free_loss_equals_padded_loss_from_the_same_weights():
    config = runner.BenchConfig(model_size="micro", tokens_per_step=256, max_length=128, steps=2, warmup=0,
                                distributions=["flan"], modes=["padded", "padding_free"], progress=False)
    padded, padding_free = runner.run(config)["results"]
    assert padding_free["losses"][0] == pytest.approx(padded["losses"][0], rel=1e-5)
    assert padding_free["losses"][1] == pytest.approx(padded["losses"][1], rel=1e-4)
    assert padding_free["loss_gap_vs_padded"] < 1e-3 and padding_free["fill_ratio"] == 1.0
    # the same examples, without the pad rows and the (B, L, L) padded attention: fewer saved bytes
    assert padded["activations_vs_padded"] == 1.0
    assert padding_free["activations_vs_padded"] < 1.0, (padding_free["activation_bytes"], padded["activation_bytes"])


def test_user_lengths_replace_the_distributions():
    config = runner.BenchConfig(model_size="micro", tokens_per_step=256, max_length=128, steps=1, warmup=1,
                                modes=["padded", "naive_packing"], lengths=(40, 7, 90, 12, 60, 33, 150, 18) * 3,
                                progress=False)
    report = runner.run(config)
    assert {r["distribution"] for r in report["results"]} == {"lengths"}
    assert report["length_stats"]["lengths"]["max"] == 128


@pytest.mark.parametrize(("change", "message"), [
    ({"modes": ["padding_free"]}, "must include 'padded'"),
    ({"model_size": "70b"}, "model_size must be one of"),
    ({"dataset": "data.jsonl"}, "go together"),
    ({"distributions": ["alpaca"]}, "distributions must be among"),
    ({"steps": 0}, "steps must be >= 1"),
])
def test_bad_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        runner.run(runner.BenchConfig(**change))


def test_too_few_examples_for_the_steps_is_a_clear_error():
    config = runner.BenchConfig(model_size="micro", tokens_per_step=256, max_length=128, steps=3,
                                lengths=(30, 30), progress=False)
    with pytest.raises(ValueError, match="need warmup \\+ steps"):
        runner.run(config)



def test_out_of_memory_names_the_mode_and_the_step(monkeypatch):
    def step(self, batch, timed):
        if timed and self.mode == "padded":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner._ModeRun, "step", step)
    config = runner.BenchConfig(model_size="micro", tokens_per_step=256, max_length=128, steps=1, warmup=0,
                                distributions=["flan"], modes=["padded", "padding_free"], progress=False)
    with pytest.raises(RuntimeError, match=r"padded on flan ran out of GPU memory on a step of \d+ token slots"):
        runner.run(config)


class _Clock:
    """A fake step timer: a step takes its token slots times the load of the round it runs in."""

    def __init__(self, loads, modes):
        self.now, self.forwards, self.loads, self.modes = 0.0, 0, loads, modes

    def forward(self, slots):
        self.now += slots * self.loads[min(self.forwards // self.modes, len(self.loads) - 1)]
        self.forwards += 1


class _ClockedModel(torch.nn.Module):
    """Stands in for the LM; the clock is a class attribute so every mode's deepcopy shares it."""

    clock: _Clock

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, labels, **batch_keys):
        type(self).clock.forward(input_ids.numel())
        return SimpleNamespace(loss=(self.weight * torch.ones(input_ids.numel())).square().mean())


MODES = ["padded", "naive_packing", "padding_free"]


def _stand_in_patch(monkeypatch):
    """padfree.patch refuses a model it cannot serve; the stand-in LM has no attention to switch."""
    import padfree
    from padfree.hf.patch import PatchReport

    def patch(model, **parts):
        report = PatchReport()
        report.add("attention", "", True, "stand-in")
        return report

    monkeypatch.setattr(padfree, "patch", patch)
    monkeypatch.setattr(padfree, "unpatch", lambda model: None)


def _clocked_run(monkeypatch, loads, **change):
    clock = _ClockedModel.clock = _Clock(loads, len(MODES))
    _stand_in_patch(monkeypatch)
    monkeypatch.setattr(runner, "build_model", lambda config: _ClockedModel())
    monkeypatch.setattr(runner, "_clock", lambda: clock.now)
    config = dict(model_size="micro", tokens_per_step=256, max_length=128, steps=len(loads), warmup=0,
                  distributions=["flan"], modes=MODES, progress=False)
    return runner.run(runner.BenchConfig(**{**config, **change}))["results"]


def test_ratios_hold_when_the_load_changes_between_rounds(monkeypatch):
    quiet = _clocked_run(monkeypatch, [1.0, 1.0, 1.0])
    busy = _clocked_run(monkeypatch, [1.0, 6.0, 2.5])
    for calm, loaded in zip(quiet, busy):
        # absolute throughput follows the load; the per-round ratios against padded do not
        assert loaded["round_tokens_per_s"][1] == pytest.approx(calm["round_tokens_per_s"][1] / 6)
        assert loaded["speedup_rounds"] == pytest.approx(calm["speedup_rounds"])
        assert loaded["speedup_vs_padded"] == pytest.approx(calm["speedup_vs_padded"])
    padding_free = busy[2]
    assert padding_free["mode"] == "padding_free" and padding_free["speedup_vs_padded"] > 1
    # a padding-free step computes only its useful tokens: its ratio is padded's token slots / useful
    padded = busy[0]
    assert padding_free["speedup_vs_padded"] == pytest.approx(padded["processed_tokens"] / padded["useful_tokens"],
                                                              rel=0.5)
    assert padding_free["speedup_range"] == [min(padding_free["speedup_rounds"]), max(padding_free["speedup_rounds"])]


def test_rounds_time_one_step_of_every_mode_in_rotated_order(monkeypatch):
    timed_modes = []
    step = runner._ModeRun.step

    def spy(self, batch, timed):
        if timed:
            timed_modes.append(self.mode)
        step(self, batch, timed)

    monkeypatch.setattr(runner._ModeRun, "step", spy)
    _clocked_run(monkeypatch, [1.0] * 4, warmup=1)
    assert timed_modes == [mode for order in runner.round_orders(MODES, 4) for mode in order]
    assert runner.round_orders(MODES, 3) == [MODES, MODES[1:] + MODES[:1], MODES[2:] + MODES[:2]]


def test_progress_total_is_known_up_front_and_names_distribution_and_mode(monkeypatch):
    class Bar:
        def __init__(self, total, enabled):
            self.total, self.updates, self.descriptions = total, 0, []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def set_description(self, text):
            self.descriptions.append(text)

        def update(self):
            self.updates += 1

    bars = []
    monkeypatch.setattr(runner, "_progress", lambda total, enabled: bars.append(Bar(total, enabled)) or bars[-1])
    _clocked_run(monkeypatch, [1.0] * 3, warmup=1, distributions=["flan", "orcamath"])
    (bar,) = bars
    assert bar.total == 2 * len(MODES) * (1 + 3) == bar.updates
    assert "flan padded (warmup)" in bar.descriptions and "orcamath padding_free" in bar.descriptions


@pytest.mark.parametrize(("ratios", "flag"), [
    ([2.0, 2.1, 1.9], None),
    ([0.9, 1.3, 1.1], "crosses 1.0x"),
    ([1.05, 1.4, 1.1], "wider than the effect"),
    ([3.0, 3.2], "too few for a spread"),
])
def test_spread_flag(ratios, flag):
    result = runner.spread_flag(ratios)
    assert result is None if flag is None else flag in result


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quick_keeps_enough_rounds_for_a_spread(device):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    quick = bench_cli.config_from_args(parser.parse_args(["--quick", "--device", device]))
    default = bench_cli.config_from_args(parser.parse_args(["--device", device]))
    assert runner.MIN_ROUNDS <= quick.steps < default.steps


def test_table_marks_a_flagged_ratio_and_prints_its_range(monkeypatch):
    results = _clocked_run(monkeypatch, [1.0, 1.0, 1.0])
    conditions = {"load_average": [3.5, 2.0, 1.0], "cpu_mhz": 2400.0, "cpu_count": 2}
    results[2]["speedup_flag"] = "spread 0.90-1.30x crosses 1.0x"
    table = bench_report.table({"device": "CPU", "date": "today",
                                "machine": {"before": conditions, "after": conditions},
                                "config": runner.asdict(runner.BenchConfig()), "peak_memory_note": "-",
                                "activation_note": "-", "results": results})
    row = next(line for line in table.splitlines() if line.startswith("flan") and "padding_free" in line)
    low, high = results[2]["speedup_range"]
    assert f"{results[2]['speedup_vs_padded']:.2f}x?" in row and f"{low:.2f}-{high:.2f}x" in row
    assert "machine: load 3.50 @ 2,400 MHz before" in table
    assert "? flan padding_free: spread 0.90-1.30x crosses 1.0x" in table



def test_threads_apply_during_the_run_only_and_a_busy_cpu_run_is_flagged(monkeypatch):
    seen = []
    _stand_in_patch(monkeypatch)
    monkeypatch.setattr(runner, "build_model", lambda config: seen.append(torch.get_num_threads()) or _ClockedModel())
    before = torch.get_num_threads()
    _ClockedModel.clock = clock = _Clock([1.0] * 3, len(MODES))
    monkeypatch.setattr(runner, "_clock", lambda: clock.now)
    config = runner.BenchConfig(model_size="micro", tokens_per_step=256, max_length=128, steps=3, warmup=0,
                                distributions=["flan"], modes=MODES, progress=False, threads=1)
    report = runner.run(config)
    assert seen == [1] and torch.get_num_threads() == before
    busy = {"load_average": [9.0, 9.0, 9.0], "cpu_mhz": None, "cpu_count": 2}
    report["machine"] = {"before": busy, "after": busy}
    assert "busy" not in bench_report.table(report)          # one thread: nothing waits
    report["config"]["threads"] = None
    assert "busy: load 9.0 on 2 CPUs" in bench_report.table(report) and "--threads 1" in bench_report.table(report)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        runner.run(runner.BenchConfig(threads=0))


def test_bench_runs_one_torch_thread_on_cpu_unless_told():
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert bench_cli.config_from_args(parser.parse_args([])).threads == 1
    assert bench_cli.config_from_args(parser.parse_args(["--threads", "2"])).threads == 2
