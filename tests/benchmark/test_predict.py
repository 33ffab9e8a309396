"""padfree.benchmark.predict: the static model's attention time next to a measured benchmark."""

import pytest
import torch

from padfree import efficiency
from padfree.benchmark import predict
from padfree.kernels import attention, registry


def _row(kind: str, label: str, instr_per_mflop: float) -> efficiency.Efficiency:
    return efficiency.Efficiency(predict.ATTENTION_KERNELS[kind][0], label, 90, 8, 3, mma="wgmma",
                                 instr_per_mflop=instr_per_mflop, mufu_per_mflop=0.0)


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("causal", [False, True])
def test_launch_is_the_registered_default_tile_of_sm90(kind, causal):
    name, index = predict.attention_launch(kind, 128, causal)
    launch = list(next(e for e in registry.all_kernels() if e.name == name).launches())[index]
    tile = attention.TILES.choices(attention.tile_key(kind, 128, torch.bfloat16), 90)[0]
    assert launch.constexprs["BLOCK_M"] == tile.block_m and launch.constexprs["BLOCK_N"] == tile.block_n
    assert (launch.num_warps, launch.num_stages) == (tile.num_warps, tile.num_stages)
    assert launch.constexprs["HAS_RIGHT"] == causal and launch.signature["Q"] == "*bf16"


def test_forward_seconds_are_flops_times_quantization_over_the_rate():
    lengths, heads, head_dim = [100, 300], 2, 128
    row = _row("fwd", "bf16 d128 64x32 w8s3 has_right", 500.0)
    pairs = 100 * 101 // 2 + 300 * 301 // 2
    quantization = efficiency.pair_quantization(lengths, 64, 32, True)
    expected = 4 * pairs * heads * head_dim * quantization / (efficiency.predicted_tflops(row) * 1e12)
    assert predict.attention_seconds(lengths, heads, head_dim, True, False, {"fwd": row}) == pytest.approx(expected)
    assert quantization > 1


def test_backward_adds_dq_dkdv_on_the_key_side_and_the_row_sums():
    lengths, heads, head_dim = [64, 200], 1, 64
    rows = {"fwd": _row("fwd", "bf16 d64 128x64 w8s3 plain", 600.0),
            "dq": _row("dq", "bf16 d64 64x32 w4s2 plain", 700.0),
            "dkdv": _row("dkdv", "bf16 d64 32x128 w8s2 plain", 900.0)}
    pairs = 64 * 64 + 200 * 200
    expected = sum(flops * pairs * heads * head_dim * efficiency.pair_quantization(lengths, r, c, False, keys)
                   / (efficiency.predicted_tflops(rows[kind]) * 1e12)
                   for kind, flops, r, c, keys in [("fwd", 4, 128, 64, False), ("dq", 6, 64, 32, False),
                                                   ("dkdv", 8, 128, 32, True)])
    expected += 2 * sum(lengths) * heads * head_dim * 2 / (efficiency.H100_BANDWIDTH_TBS * 1e12)
    assert predict.attention_seconds(lengths, heads, head_dim, False, True, rows) == pytest.approx(expected)


def test_compare_analyzes_the_launches_it_predicts_with(monkeypatch):
    """The table's prediction comes from the efficiency rows of exactly the launches the launcher
    picks (a spy on efficiency.evaluate), and measured / predicted is their quotient."""
    asked = []

    def fake_evaluate(launches, jobs=None):
        asked.extend(launches)
        return [_row(kind, list(next(e for e in registry.all_kernels() if e.name == name).launches())[index].label,
                     800.0) for kind, (name, index, _) in zip(("fwd", "dq", "dkdv"), launches)]

    monkeypatch.setattr(efficiency, "evaluate", fake_evaluate)
    shape = {"lengths": [512, 1024], "heads": 4, "head_dim": 128, "causal": True}
    report = {"benchmarks": [
        {"name": "test_attention[forward-padfree_varlen]", "stats": {"median": 2e-3},
         "extra_info": {"backend": "padfree_varlen", "pass_name": "forward", "dtype": "torch.bfloat16", "shape": shape}},
        {"name": "test_attention[forward-sdpa_padded]", "stats": {"median": 1e-3},
         "extra_info": {"backend": "sdpa_padded", "pass_name": "forward", "dtype": "torch.bfloat16", "shape": shape}}]}
    table = predict.compare(report)
    assert asked == [(*predict.attention_launch("fwd", 128, True), 90)]
    expected = predict.attention_seconds(shape["lengths"], 4, 128, True, False, {"fwd": fake_evaluate(asked)[0]})
    line = next(line for line in table.splitlines() if "padfree_varlen" in line)
    assert "sdpa_padded" not in table
    measured, predicted, ratio = (float(cell) for cell in line.split("|")[2:5])
    assert (measured, predicted) == (2.0, pytest.approx(expected * 1e3, rel=1e-3))
    assert ratio == pytest.approx(2e-3 / expected, rel=1e-2)
    assert "device ms" not in table  # a run without the host/device split (CPU, or before it)

    # a CUDA run also recorded the host's launch time and the kernels' device time
    report["benchmarks"][0]["extra_info"].update(host_s=0.5e-3, device_s=1.25e-3)
    line = next(line for line in predict.compare(report).splitlines() if "padfree_varlen" in line)
    host, device, device_ratio = (float(cell) for cell in line.split("|")[5:8])
    assert (host, device) == (0.5, 1.25)
    assert device_ratio == pytest.approx(1.25e-3 / expected, rel=1e-2)


def test_compare_refuses_a_json_without_padfree_runs():
    with pytest.raises(ValueError, match="no padfree_varlen benchmark"):
        predict.compare({"benchmarks": []})
