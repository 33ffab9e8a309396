import json

import pytest
import torch

from padfree import cli
from padfree.benchmark import runner

MICRO = ["--model-size", "micro", "--tokens-per-step", "256", "--max-length", "128", "--no-progress"]
RESULT_KEYS = {"distribution", "mode", "useful_tokens_per_s", "step_time_s", "peak_memory_bytes", "loss",
               "activation_bytes", "activations_vs_padded", "fill_ratio", "speedup_vs_padded", "step_time_vs_padded",
               "loss_gap_vs_padded", "losses"}


def test_micro_run_writes_the_json_schema_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    modes = ["padded", "padded_sorted", "naive_packing", "padding_free"]
    assert cli.main(["bench", *MICRO, "--steps", "2", "--warmup", "1", "--modes", *modes,
                     "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "versions", "date", "config", "results"} <= set(report)
    assert report["device"].startswith("CPU") and report["versions"]["torch"]
    assert [(r["distribution"], r["mode"]) for r in report["results"]] == \
        [(d, m) for d in ("flan", "orcamath") for m in modes]
    for result in report["results"]:
        assert RESULT_KEYS <= set(result)
        assert result["useful_tokens_per_s"] > 0 and result["step_time_s"] > 0
        assert result["peak_memory_bytes"] is None  # CPU: not measured, and the report says so
        assert 0 < result["fill_ratio"] <= 1 and len(result["losses"]) == 3
        assert result["activation_bytes"] > 0
        if result["mode"] == "padded":
            assert result["speedup_vs_padded"] == 1.0 and result["loss_gap_vs_padded"] == 0.0
        if result["mode"] == "naive_packing":
            assert result["fill_ratio"] == 1.0 and result["loss_gap_vs_padded"] > 1e-4
    assert "not measured on CPU" in report["peak_memory_note"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "naive_packing" in table and "vs padded" in table and "act vs padded" in table


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


def test_user_lengths_file_replaces_the_distributions(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(str(n) for n in [40, 7, 90, 12, 60, 33, 120, 18] * 3))
    config = runner.BenchConfig(model_size="micro", tokens_per_step=256, max_length=128, steps=1, warmup=1,
                                modes=["padded", "naive_packing"], lengths_file=str(lengths), progress=False)
    report = runner.run(config)
    assert {r["distribution"] for r in report["results"]} == {"lengths-file"}
    assert report["length_stats"]["lengths-file"]["max"] <= 128


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


def test_too_few_examples_for_the_steps_is_a_clear_error(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("30\n30\n")
    config = runner.BenchConfig(model_size="micro", tokens_per_step=256, max_length=128, steps=3,
                                lengths_file=str(lengths), progress=False)
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
