"""The static efficiency report (padfree.efficiency), its textbook yardstick and its CI gate.

Compiling needs a process without TRITON_INTERPRET (tests/conftest.py sets it), so the compile
tests run a script in a subprocess that prints one JSON line per result.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from padfree import efficiency
from padfree.kernels import textbook
from tests.numerics import assert_close


def _compiled(script: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line.removeprefix("ROW ")) for line in done.stdout.splitlines() if line.startswith("ROW ")]


_KNOWN = '''
import json
from dataclasses import asdict
from padfree import compile_check, efficiency
from padfree.kernels import textbook as t
from padfree.kernels.registry import Tile

for arch in (80, 90):
    for name, kernel, launch in (
            ("fwd w4", t.textbook_attention_fwd_kernel, t.attention_launch(t.textbook_attention_fwd_kernel, "bf16",
                                                                            Tile(64, 64, None, 4, 2), 64)),
            ("fwd w8", t.textbook_attention_fwd_kernel, t.attention_launch(t.textbook_attention_fwd_kernel, "bf16",
                                                                            Tile(64, 64, None, 8, 2), 64)),
            ("gemm w8", t.textbook_gemm_kernel, t.gemm_launch("bf16", Tile(64, 128, 64, 8, 3)))):
        row = efficiency.analyze(compile_check.build(kernel, launch, arch), arch, name)
        print("ROW " + json.dumps(asdict(row)))
'''


@pytest.mark.slow
def test_replication_and_mma_kind_of_known_kernels():
    """Chained dots are laid out warpsPerCTA = [num_warps, 1]: 8 warps x 16 rows cover 128 rows, so
    on a 64-row attention tile every warp pair computes the same scores (both score GEMMs on
    sm_80's mma.sync; the QK^T one on sm_90, whose PV GEMM splits its columns); 4 warps do not.
    A plain GEMM splits 8 warps [4, 2] over 64 x 128 and replicates nothing. Hopper gets wgmma,
    Ampere mma.sync; replicated work shows as more instructions per useful MFLOP."""
    rows = {(r["kernel"], r["arch"]): r for r in _compiled(_KNOWN)}
    assert len(rows) == 6, rows
    for arch, kind in ((80, "mma.sync"), (90, "wgmma")):
        w4, w8, gemm = rows[("fwd w4", arch)], rows[("fwd w8", arch)], rows[("gemm w8", arch)]
        assert {w4["mma"], w8["mma"], gemm["mma"]} == {kind}
        assert w4["replication"] == 1.0 and gemm["replication"] == 1.0
        assert w8["replication"] == (2.0 if arch == 80 else 1.5)
        assert w8["instr_per_mflop"] > 1.3 * w4["instr_per_mflop"]
        for row in (w4, w8, gemm):
            assert row["spill"] == 0 and row["pipelining"] == "cp.async" and row["ctas_per_sm"] >= 1
            # 64 x 64 x 64 per key block (QK^T and PV: 2 x 2 x 64^3 FLOPs), 64 x 128 x 64 per GEMM step
            assert row["loop_mflop"] == pytest.approx(1.048576)


# Representative hot launches: the attention defaults at head dim 128 (sm_90's own forward tile,
# the dq on both archs, dk/dv) and two of their grid-stride (STRIDED) variants, the head-dim-256
# tiles of sm_90 and sm_80 (dk/dv in two passes on both; sm_80's once replicated or spilled), the
# LoRA forward's large default and widest tile, the LoRA launches the dropout and tile changes
# fixed (the rank-128 dropout shrink, once replicated 1.67x, and the dA kernel, once 7-12x the plain
# GEMM, both against the dropout GEMM; the large dx, once 1.33x), and the MoE defaults the gate
# flagged before (gate_up replicated on sm_80; the weight gradients at 10x and 2x the GEMM's
# instructions per MFLOP; the down backward at 1.2-1.3x).
_GATE = '''
import json
from dataclasses import asdict
from padfree import efficiency
from padfree.kernels import registry

wanted = [("attention_fwd_kernel", "bf16 d128 128x128 w8s3 plain", 90),
          ("attention_bwd_dq_kernel", "bf16 d128 128x32 w8s2 has_right", 90),
          ("attention_bwd_dq_kernel", "bf16 d128 128x32 w8s2 plain", 80),
          ("lora_forward_kernel", "bf16 large 128x128x64 w8s3", 90),
          ("lora_forward_kernel", "bf16 large 128x256x64 w8s3 has_bias", 80),
          ("lora_shrink_kernel", "bf16 r128 dropout", 90),
          ("lora_da_kernel", "bf16 r16", 90),
          ("lora_dx_kernel", "bf16 large 128x128x64 w8s3 dropout", 90),
          ("attention_bwd_dkdv_kernel", "bf16 d128 16x128 w8s2 has_right", 90),
          ("attention_fwd_kernel", "bf16 d128 128x128 w8s3 has_right strided", 90),
          ("attention_bwd_dkdv_kernel", "bf16 d128 16x128 w8s2 plain strided", 90),
          ("attention_fwd_kernel", "bf16 d256 128x16 w8s3 has_right", 90),
          ("attention_bwd_dq_kernel", "bf16 d256 128x16 w8s2 plain", 90),
          ("attention_bwd_dkdv_kernel", "bf16 d256 16x128 w8s2 dv pass plain", 90),
          ("attention_bwd_dkdv_kernel", "bf16 d256 16x128 w8s2 dk pass has_right", 90),
          ("attention_fwd_kernel", "bf16 d256 64x64 w8s2 has_right", 80),
          ("attention_bwd_dq_kernel", "bf16 d256 64x64 w8s2 plain", 80),
          ("attention_bwd_dkdv_kernel", "bf16 d256 64x16 w8s2 dv pass has_right", 80),
          ("moe_gate_up_kernel", "bf16 64x128x64 w8s3", 80),
          ("moe_gate_up_kernel", "bf16 64x128x64 w4s3", 90),
          ("moe_down_backward_kernel", "bf16 64x64x128 w8s3", 90),
          ("moe_down_weight_grad_kernel", "bf16 64x128x64 w4s3", 80),
          ("moe_down_weight_grad_kernel", "bf16 64x256x64 w8s3", 90),
          ("moe_gate_up_weight_grad_kernel", "bf16 256x128x64 w8s3", 90)]
launches = []
for short, label, arch in wanted:
    entry = next(e for e in registry.all_kernels() if e.name.endswith("." + short))
    index = next(i for i, launch in enumerate(entry.launches()) if launch.label == label)
    assert efficiency.is_hot(entry.name, list(entry.launches())[index]), label
    launches.append((entry.name, index, arch))
for row in efficiency.evaluate(launches, jobs=2):
    print("ROW " + json.dumps({**asdict(row), "ratio": row.ratio}))
'''


@pytest.mark.slow
def test_gate_passes_on_representative_hot_launches():
    rows = _compiled(_GATE)
    assert len(rows) == 24
    for row in rows:
        assert row["flags"] == [], (row["kernel"], row["label"], row["arch"], row["flags"])
        assert row["reference_instr_per_mflop"] and row["ratio"] <= efficiency.MAX_REFERENCE_RATIO
    # each dk/dv pass is measured against the textbook kernel computing the same one output
    assert {row["reference"] for row in rows if " pass " in row["label"]} == {
        "attention_dkdv bf16 d256 16x128 w8s2 dv pass", "attention_dkdv bf16 d256 16x128 w8s2 dk pass",
        "attention_dkdv bf16 d256 64x16 w8s2 dv pass"}


def _row(**changes) -> efficiency.Efficiency:
    good = dict(kernel="k", label="l", arch=90, num_warps=8, num_stages=3, mma="wgmma", replication=1.0,
                registers=128, spill=0, shared=1024, ctas_per_sm=1, pipelining="cp.async", loop_instructions=100,
                loop_mflop=1.0, instr_per_mflop=800.0, reference_instr_per_mflop=700.0)
    return efficiency.Efficiency(**{**good, **changes})


def test_cli_gate_fails_on_any_flagged_row(monkeypatch, capsys):
    """`compile-check --efficiency` exits 1 and names the row when any row is flagged, 0 when none
    is: the gate has no list of exceptions."""
    from padfree import cli

    good = _row(kernel="padfree.kernels.x.k")
    bad = _row(kernel="padfree.kernels.x.k", label="m", spill=8)
    for row in (good, bad):
        row.flags = efficiency.gate(row)
    for rows, code in (([good], 0), ([good, bad], 1)):
        monkeypatch.setattr(efficiency, "run", lambda *args, **kwargs: rows)
        assert cli.main(["compile-check", "--efficiency"]) == code
        err = capsys.readouterr().err
        assert f"1 pass, {code} flagged" in err
        assert ("flagged: padfree.kernels.x.k m sm_90: spills 8 B" in err) == bool(code)


def test_ci_gate_runs_the_default_hot_launches():
    """CI (`compile-check --efficiency` without --all) judges the hot launches that are not
    extended ones; --all adds the tuning candidates and grid-stride variants."""
    ci = efficiency.hot_launches([80, 90], extended=False)
    assert ci and len(ci) < len(efficiency.hot_launches([80, 90]))
    assert all(not registry_launch.extended for registry_launch in _launches(ci))


def _launches(keys):
    from padfree.kernels import registry

    entries = {entry.name: list(entry.launches()) for entry in registry.all_kernels()}
    return [entries[name][index] for name, index, _ in keys]


@pytest.mark.parametrize("changes, reason", [
    ({"replication": 1.5}, "replicated 1.50x"),
    ({"mma": "mma.sync"}, "mma.sync instead of wgmma"),
    ({"spill": 8}, "spills 8 B"),
    ({"instr_per_mflop": 900.0}, "1.29x the reference"),
    ({"instr_per_mflop": None}, "no MMA main loop"),
    ({"error": "out of resources"}, "does not compile"),
])
def test_gate_flags_each_rule(changes, reason):
    assert efficiency.gate(_row()) == []
    flags = efficiency.gate(_row(**changes))
    assert len(flags) == 1 and reason in flags[0], flags


def test_gate_accepts_mma_sync_below_hopper():
    assert efficiency.gate(_row(arch=80, mma="mma.sync")) == []


def test_ctas_per_sm_takes_the_tightest_limit():
    # registers: 255 -> 256 a thread, 8 warps x 32 x 256 = 65536, the whole file
    assert efficiency.ctas_per_sm(90, 255, 8, 1024) == 1
    # threads: 64 regs x 4 warps would allow 8 by registers; 2048 threads allow 16; shared 100 KiB -> 2
    assert efficiency.ctas_per_sm(90, 64, 4, 100 * 1024) == 2
    # sm_86 holds 1536 threads: 6 CTAs of 8 warps, though registers would allow 8
    assert efficiency.ctas_per_sm(86, 32, 8, 0) == 6


def test_hot_selection_and_references():
    from padfree.kernels import registry

    hot = {entry.name: [launch for launch in entry.launches() if efficiency.is_hot(entry.name, launch)]
           for entry in registry.all_kernels()}
    assert not hot["padfree.kernels.attention.attention_bwd_delta_kernel"]
    assert not hot["padfree.kernels.textbook.textbook_gemm_kernel"]
    fwd = hot["padfree.kernels.attention.attention_fwd_kernel"]
    assert {launch.constexprs["HEAD_DIM_PAD"] for launch in fwd} == {64, 128, 256}
    assert all(launch.signature["Q"] == "*bf16" and not launch.constexprs["DROPOUT"] for launch in fwd)
    for name, launches in hot.items():
        for launch in launches:
            kernel, reference = efficiency.reference_for(name, launch)
            assert (reference.num_warps, reference.num_stages) == (launch.num_warps, launch.num_stages)
    da = next(launch for launch in hot["padfree.kernels.lora.lora_da_kernel"])
    _, reference = efficiency.reference_for("padfree.kernels.lora.lora_da_kernel", da)
    c = da.constexprs
    assert (reference.constexprs["BLOCK_M"], reference.constexprs["BLOCK_N"], reference.constexprs["BLOCK_K"]) == \
        (c["BLOCK_K"], c["BLOCK_R"], c["BLOCK_M"])


# ---- the textbook kernels compute what they claim (interpreter, float64 oracle) ------------------

def _attention(q, k, v, dout, scale, dtype):
    """out, lse, dq, dk, dv by plain autograd in `dtype` (float64: the oracle; float16: the baseline)."""
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    out = torch.einsum("hts,shd->thd", torch.softmax(scores.float(), -1).to(dtype), v)
    out.backward(dout.to(dtype))
    return out.detach(), torch.logsumexp(scores.detach().double(), -1), q.grad, k.grad, v.grad


def test_textbook_attention_matches_float64(triton_cpu):
    seqlen, heads, dim, block = 32, 2, 16, 16
    q, k, v, dout = (torch.randn(seqlen, heads, dim, dtype=torch.float16) for _ in range(4))
    scale = dim ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(heads, seqlen)
    grid = (seqlen // block, heads)
    stride_t, stride_h = q.stride(0), q.stride(1)
    textbook.textbook_attention_fwd_kernel[grid](q, k, v, out, lse, stride_t, stride_h, seqlen, scale,
                                                 BLOCK_M=block, BLOCK_N=block, HEAD_DIM=dim)
    oracle = _attention(q, k, v, dout, scale, torch.float64)
    baseline = _attention(q, k, v, dout, scale, torch.float16)
    assert_close("out", out, oracle[0], baseline[0], factor=2)
    assert_close("lse", lse, oracle[1], None, factor=2)
    delta = (out.float() * dout.float()).sum(-1).t().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    textbook.textbook_attention_dkdv_kernel[grid](q, k, v, dout, lse, delta, dk, dv, stride_t, stride_h, seqlen,
                                                  scale, BLOCK_M=block, BLOCK_N=block, HEAD_DIM=dim, OUTPUT="dkdv")
    textbook.textbook_attention_dq_kernel[grid](q, k, v, dout, lse, delta, dq, stride_t, stride_h, seqlen, scale,
                                                BLOCK_M=block, BLOCK_N=block, HEAD_DIM=dim)
    # the one-output passes (yardstick of the two-pass dk/dv tiles) write only their output
    passes = {output: (torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))) for output in ("dk", "dv")}
    for output, (pass_dk, pass_dv) in passes.items():
        textbook.textbook_attention_dkdv_kernel[grid](q, k, v, dout, lse, delta, pass_dk, pass_dv, stride_t, stride_h,
                                                      seqlen, scale, BLOCK_M=block, BLOCK_N=block, HEAD_DIM=dim,
                                                      OUTPUT=output)
    assert passes["dk"][1].isnan().all() and passes["dv"][0].isnan().all()
    got = (("dq", dq), ("dk", dk), ("dv", dv), ("dk", passes["dk"][0]), ("dv", passes["dv"][1]))
    for name, value in got:
        index = {"dq": 2, "dk": 3, "dv": 4}[name]
        assert_close(name, value, oracle[index], baseline[index], factor=3)


def test_textbook_gemm_matches_float64(triton_cpu):
    a, b = torch.randn(32, 48, dtype=torch.float16), torch.randn(16, 48, dtype=torch.float16)
    c = torch.empty(32, 16, dtype=torch.float16)
    textbook.textbook_gemm_kernel[(2, 1)](a, b, c, torch.tensor([0]), 32, 16, 48, a.stride(0), b.stride(0),
                                          c.stride(0), 0, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, DROPOUT=False)
    assert_close("c", c, a.double() @ b.double().t(), (a @ b.t()), factor=2)


def test_textbook_dropout_gemm_applies_the_lora_mask(triton_cpu):
    """The dropout yardstick computes (a * keep) @ b^T with the mask padfree.reference.lora.keep_mask
    defines (stream 0): a mask that differed from the LoRA kernels' would fail here."""
    from padfree.reference import lora as lora_reference

    a, b = torch.randn(32, 48, dtype=torch.float16), torch.randn(16, 48, dtype=torch.float16)
    c = torch.empty(32, 16, dtype=torch.float16)
    seed, dropout_p = 1234, 0.3
    textbook.textbook_gemm_kernel[(2, 1)](a, b, c, torch.tensor([seed]), 32, 16, 48, a.stride(0), b.stride(0),
                                          c.stride(0), lora_reference.keep_threshold(dropout_p),
                                          BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, DROPOUT=True)
    keep = lora_reference.keep_mask(seed, 0, 32, 48, dropout_p)
    assert 0.6 < keep.double().mean().item() < 0.8
    dropped = a * keep.to(a.dtype)
    assert_close("c", c, dropped.double() @ b.double().t(), dropped @ b.t(), factor=2)
    assert (c.double() - a.double() @ b.double().t()).abs().max() > 0.5  # the mask did drop something


# ---- the performance model -------------------------------------------------------------------------

def _visited_pairs(length, block_rows, block_cols, causal, keys_side):
    """Pairs in the (block_rows x block_cols) tiles holding at least one allowed pair: what a tiled
    kernel computes, counted by brute force over the mask."""
    rows, cols = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (rows >= cols) if causal else torch.ones(length, length, dtype=torch.bool)
    if keys_side:
        allowed = allowed.t()
    padded = torch.zeros(-(-length // block_rows) * block_rows, -(-length // block_cols) * block_cols,
                         dtype=torch.bool)
    padded[:length, :length] = allowed
    tiles = padded.view(padded.shape[0] // block_rows, block_rows, -1, block_cols).any(3).any(1)
    return tiles.sum().item() * block_rows * block_cols


@pytest.mark.parametrize("causal, keys_side", [(False, False), (True, False), (True, True)])
def test_pair_quantization_counts_the_tiles_a_kernel_visits(causal, keys_side):
    lengths = [1, 5, 37, 64, 130]
    executed = sum(_visited_pairs(n, 16, 8, causal, keys_side) for n in lengths)
    needed = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    assert efficiency.pair_quantization(lengths, 16, 8, causal, keys_side) == pytest.approx(executed / needed)


def test_model_charges_replication_issue_and_sfu():
    ideal = _row(instr_per_mflop=0.0, mufu_per_mflop=0.0)
    assert efficiency.predicted_tflops(ideal) == pytest.approx(efficiency.H100_PEAK_TFLOPS)
    assert efficiency.predicted_tflops(_row(instr_per_mflop=0.0, replication=2.0)) == pytest.approx(
        efficiency.H100_PEAK_TFLOPS / 2)
    slower = [_row(), _row(mufu_per_mflop=50.0), _row(mma="mma.sync", mufu_per_mflop=50.0)]
    tflops = [efficiency.predicted_tflops(row) for row in slower]
    assert tflops == sorted(tflops, reverse=True) and len(set(tflops)) == 3
    assert efficiency.predicted_tflops(_row(instr_per_mflop=None)) is None


def test_moe_layer_charges_padding_compute_and_bytes():
    ideal = {name: _row(instr_per_mflop=0.0, mufu_per_mflop=0.0) for name in efficiency.MOE_KERNELS}
    pairs, experts = 4096 * 2, 8
    padding = (pairs + experts * 63 / 2) / pairs
    big = efficiency.moe_layer(ideal, tokens=4096, experts=experts, hidden=4096, inter=4096, top_k=2)
    # compute-bound: the down GEMM (2 P H I FLOPs) over the padded rows at the peak
    assert big["moe_down_kernel"] == pytest.approx(1e3 * 2 * pairs * 4096 * 4096 * padding / 989e12)
    assert big["forward+backward"] == pytest.approx(sum(big[name] for name in efficiency.MOE_KERNELS))
    # memory-bound: the down kernel reads h and W2, writes one row per pair, and the sum over k
    # reads those and writes one row per token
    small = efficiency.moe_layer(ideal, tokens=4096, experts=experts, hidden=16, inter=16, top_k=2)
    moved = (pairs * padding * 16 + 2 * pairs * 16 + 4096 * 16) * 2 + experts * 16 * 16 * 2
    assert small["moe_down_kernel"] == pytest.approx(1e3 * moved / 3.35e12)
    # a slower padfree leaves grouped_mm less room: its GEMMs must be slower for the same speedup
    slow = {name: _row(instr_per_mflop=2000.0) for name in efficiency.MOE_KERNELS}
    slower = efficiency.moe_layer(slow, **efficiency.MOE_TARGET)
    target = efficiency.moe_layer(ideal, **efficiency.MOE_TARGET)
    assert slower["forward+backward"] > target["forward+backward"]
    assert efficiency.grouped_mm_break_even(slower) < efficiency.grouped_mm_break_even(target)


@pytest.mark.parametrize("changes, reason", [
    ({"instr_per_mflop": 800.0 * 1.3}, "1.30x the baseline's instructions"),
    ({"mma": "mma.sync"}, "mma.sync instead of the baseline's wgmma"),
    ({"replication": 2.0}, "replicated 2.00x"),
    ({"error": "out of resources"}, "does not compile"),
    ({"instr_per_mflop": None}, "no MMA main loop"),
    ({"label": "renamed"}, "not in the baseline report"),
])
def test_against_baseline_flags_each_rule(changes, reason):
    """A report under another Triton (the one a user's torch pins) against the gate's: each way a
    launch can compile worse fails it; within MAX_TRITON_GROWTH, or better, passes."""
    baseline = [_row(kernel="padfree.kernels.x.k")]
    assert efficiency.against_baseline([_row(kernel="padfree.kernels.x.k", instr_per_mflop=800.0 * 1.2)], baseline) == []
    assert efficiency.against_baseline([_row(kernel="padfree.kernels.x.k", instr_per_mflop=400.0, spill=64)],
                                       baseline) == []
    (row, why), = efficiency.against_baseline([_row(kernel="padfree.kernels.x.k", **changes)], baseline)
    assert reason in why, why


def test_report_json_round_trips():
    rows = [_row(kernel="padfree.kernels.x.k", flags=["spills 8 B"]), _row(label="m", error="boom", instr_per_mflop=None)]
    assert efficiency.from_json(efficiency.to_json(rows)) == rows


def test_cli_baseline_judges_the_report_against_another(monkeypatch, tmp_path, capsys):
    """`compile-check --efficiency --baseline REPORT.json` exits 1 on a launch worse than the
    report's, 0 otherwise, whatever the gate's own flags (another Triton's rows may differ)."""
    from padfree import cli

    baseline = tmp_path / "triton39.json"
    baseline.write_text(efficiency.to_json([_row(kernel="padfree.kernels.x.k")]))
    for instr, code in ((800.0 * 1.2, 0), (800.0 * 2.2, 1)):
        here = [_row(kernel="padfree.kernels.x.k", instr_per_mflop=instr, spill=16, flags=["spills 16 B"])]
        monkeypatch.setattr(efficiency, "run", lambda *args, **kwargs: here)
        assert cli.main(["compile-check", "--efficiency", "--baseline", str(baseline)]) == code
        assert ("2.20x the baseline's" in capsys.readouterr().err) == bool(code)
