"""padfree.moe_route / moe_experts / moe_align: Triton kernels (interpreter) vs float64, C++ align vs
the PyTorch one, explicit backward math vs autograd, custom-op checks, torch.compile, bad input."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import padfree
from padfree import _ext
from padfree.ops import moe as moe_ops
from padfree.reference import moe as reference
from tests.conftest import cuda_syncs_raise
from tests.numerics import assert_close

BLOCK = 64  # padfree.kernels.moe.ALIGN_BLOCK


def random_index(num_tokens, num_experts, top_k, experts=None):
    """Distinct experts per token, drawn from `experts` (default all): idle experts when a subset."""
    pool = torch.tensor(experts if experts is not None else range(num_experts))
    picks = torch.rand(num_tokens, pool.numel()).argsort(dim=1)[:, :top_k]
    return pool[picks]


def expert_weights(num_experts, hidden, inter, dtype):
    gate_up = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.float64) / hidden ** 0.5
    down = torch.randn(num_experts, hidden, inter, dtype=torch.float64) / inter ** 0.5
    return gate_up.to(dtype), down.to(dtype)


def run_experts(inputs, index, grad):
    x, weights, gate_up, down = (t.detach().clone().requires_grad_() for t in inputs)
    out = padfree.moe_experts(x, index, weights, gate_up, down)
    out.backward(grad)
    return out.detach(), [t.grad for t in (x, weights, gate_up, down)]


def reference_experts(inputs, index, grad):
    x, weights, gate_up, down = (t.detach().clone().requires_grad_() for t in inputs)
    out = reference.experts(x, index, weights, gate_up, down)
    out.backward(grad)
    return out.detach(), [t.grad for t in (x, weights, gate_up, down)]


EXPERT_CASES = {
    "top1": dict(num_tokens=29, num_experts=4, top_k=1),
    "top2": dict(num_tokens=37, num_experts=6, top_k=2),
    "top8": dict(num_tokens=11, num_experts=8, top_k=8),
    "idle_experts": dict(num_tokens=23, num_experts=8, top_k=2, experts=[1, 4, 6]),
    "one_token": dict(num_tokens=1, num_experts=5, top_k=2),
    # one expert gets block-1, block and block+1 pairs as the token count grows
    "tile_edge_63": dict(num_tokens=BLOCK - 1, num_experts=3, top_k=1, experts=[2]),
    "tile_edge_64": dict(num_tokens=BLOCK, num_experts=3, top_k=1, experts=[0]),
    "tile_edge_65": dict(num_tokens=BLOCK + 1, num_experts=3, top_k=2),
}


def check_experts(num_tokens, num_experts, top_k, hidden, inter, dtype, experts=None):
    """padfree.moe_experts (the current backend) vs a float64 oracle, forward and backward; -> grads."""
    index = random_index(num_tokens, num_experts, top_k, experts)
    gate_up, down = expert_weights(num_experts, hidden, inter, torch.float64)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64)
    weights = torch.rand(num_tokens, top_k, dtype=torch.float64)
    grad = torch.randn(num_tokens, hidden, dtype=torch.float64)
    oracle, oracle_grads = reference_experts((x, weights, gate_up, down), index, grad)
    low = (x.to(dtype), weights.float(), gate_up.to(dtype), down.to(dtype))
    out, grads = run_experts(low, index, grad.to(dtype))
    with padfree.use_backend("reference"):
        base, base_grads = reference_experts(low, index, grad.to(dtype))
    assert out.dtype == dtype
    assert_close("out", out, oracle, base, factor=2)
    for name, got, want, baseline in zip(("d hidden_states", "d top_k_weights", "d gate_up_proj", "d down_proj"),
                                         grads, oracle_grads, base_grads):
        # d top_k_weights is fp32 but carries the precision of the fp16 data it is computed from
        assert_close(name, got.to(dtype), want, baseline.to(dtype), factor=3, rtol_fp32=2e-5)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(EXPERT_CASES))
def test_experts_forward_backward_match_float64(triton_cpu, case, dtype):
    spec = dict(EXPERT_CASES[case])
    num_experts = spec["num_experts"]
    grads = check_experts(spec["num_tokens"], num_experts, spec["top_k"], 32, 48, dtype, spec.get("experts"))
    if "experts" in spec:
        idle = sorted(set(range(num_experts)) - set(spec["experts"]))
        assert grads[2][idle].abs().max() == 0 and grads[3][idle].abs().max() == 0


# Tiles each launcher may pick (defaults of every arch and tuning candidates), see padfree.kernels.moe.
CANDIDATE_COUNTS = {"gate_up": 3, "down": 5, "down_backward": 2, "down_weight_grad": 2, "gate_up_backward_input": 5,
                    "gate_up_weight_grad": 2}


@pytest.mark.parametrize("tile, index", [(tile, i) for tile, count in CANDIDATE_COUNTS.items() for i in range(count)])
def test_every_tuning_candidate_matches_float64(triton_cpu, tile, index):
    """On a GPU the 16-bit tiles are per-arch defaults or picked by timing (PADFREE_AUTOTUNE=1); each must
    be right, including the ragged K tail after the whole steps."""
    from padfree.kernels import moe as kernels
    from padfree.kernels import runtime

    assert len(kernels.TILES.choices((tile, 2))) == CANDIDATE_COUNTS[tile]
    # hidden and inter cross the 64/128 tiles; 70 tokens x top-2 over 5 experts cross the 64-row block
    with runtime.force_choice(f"moe_{tile}", index):
        check_experts(70, 5, 2, 136, 72, torch.float16)


def test_tiles_per_arch():
    """Each arch's default comes first, and a tile limited to some archs is neither picked nor
    registered (compile-checked) elsewhere."""
    from padfree.kernels import moe as kernels
    from padfree.kernels import registry

    tiles = kernels.TILES
    limited = set()
    for tile, kernel in kernels.KERNELS.items():
        key = (tile, 2)
        for arch in registry.ARCHS:
            candidates = tiles.choices(key, arch)
            assert candidates[0] == tiles.arch_defaults.get(arch, {}).get(key, tiles.defaults[key])
            assert len(set(candidates)) == len(candidates)
            for config in candidates:
                assert arch in tiles.archs(key, config), (tile, config, arch)
        name = f"padfree.kernels.moe.{kernel.fn.__name__}"
        entry = next(e for e in registry.all_kernels() if e.name == name)
        for launch in entry.launches():
            c = launch.constexprs
            config = registry.Tile(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], launch.num_warps, launch.num_stages)
            if (key, config) in tiles.only_on:
                assert launch.archs == tiles.only_on[(key, config)]
                limited.add((key, config))
    assert limited == set(tiles.only_on)
    assert tiles.choices(("gate_up", 2), 90)[0] != tiles.choices(("gate_up", 2), 80)[0]


def test_experts_are_deterministic(triton_cpu):
    index = random_index(40, 4, 2)
    gate_up, down = expert_weights(4, 32, 48, torch.float32)
    inputs = (torch.randn(40, 32), torch.rand(40, 2), gate_up, down)
    grad = torch.randn(40, 32)
    first, first_grads = run_experts(inputs, index, grad)
    second, second_grads = run_experts(inputs, index, grad)
    assert torch.equal(first, second) and all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def test_explicit_experts_backward_matches_autograd():
    index = random_index(17, 5, 2, [0, 2, 3])
    gate_up, down = expert_weights(5, 16, 24, torch.float64)
    inputs = (torch.randn(17, 16, dtype=torch.float64), torch.rand(17, 2, dtype=torch.float64), gate_up, down)
    grad = torch.randn(17, 16, dtype=torch.float64)
    _, autograd_grads = reference_experts(inputs, index, grad)
    explicit = reference.experts_backward(grad, inputs[0], index, inputs[1], gate_up, down)
    for got, want in zip(explicit, autograd_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


ROUTE_CASES = {
    "softmax_top1": dict(num_experts=4, top_k=1, normalize=False),
    "softmax_top2_norm": dict(num_experts=8, top_k=2),
    "softmax_top8_no_norm": dict(num_experts=64, top_k=8, normalize=False),
    "sigmoid_groups_bias": dict(num_experts=16, top_k=4, scoring="sigmoid", bias=True, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5),
    "sigmoid_no_groups": dict(num_experts=10, top_k=3, scoring="sigmoid", bias=True),
}


@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_route_matches_float64(triton_cpu, case):
    spec = dict(ROUTE_CASES[case])
    num_experts, top_k = spec.pop("num_experts"), spec.pop("top_k")
    bias = torch.randn(num_experts) * 0.1 if spec.pop("bias", False) else None
    logits = torch.randn(37, num_experts)
    grad = torch.randn(37, top_k)
    kernel_logits = logits.clone().requires_grad_()
    weights, index = padfree.moe_route(kernel_logits, top_k, correction_bias=bias, **spec)
    weights.backward(grad)
    oracle_logits = logits.double().requires_grad_()
    oracle_weights, oracle_index = reference.route(oracle_logits, top_k, correction_bias=bias, **spec)
    oracle_weights.backward(grad.double())
    assert weights.dtype == torch.float32 and index.dtype == torch.int64
    assert torch.equal(index, oracle_index)
    assert_close("weights", weights, oracle_weights, None, factor=2)
    assert_close("d router_logits", kernel_logits.grad, oracle_logits.grad, None, factor=3, rtol_fp32=2e-5)
    scoring = spec.get("scoring", "softmax")
    explicit = reference.route_backward(grad.double(), oracle_logits.detach(), oracle_weights.detach(), oracle_index,
                                        scoring, spec.get("normalize", True), spec.get("routed_scaling_factor", 1.0))
    torch.testing.assert_close(explicit, oracle_logits.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n_group", [1, 2])
def test_nan_router_logits_give_nan_output_rows(triton_cpu, scoring, n_group):
    """A NaN logit routes its token to real experts with NaN weight (kernel and reference alike), so
    the NaN reaches that token's output row through the C++ align; the other rows stay right."""
    assert _ext.load(), _ext.status()
    logits = torch.randn(70, 8)
    nan_rows = torch.tensor([0, 5, 63, 64])
    logits[nan_rows, torch.tensor([3, 0, 7, 4])] = float("nan")
    logits[5, 6] = float("nan")
    options = dict(scoring=scoring, n_group=n_group, topk_group=1)
    weights, index = padfree.moe_route(logits, 2, **options)
    want_weights, want_index = reference.route(logits.double(), 2, **options)
    assert torch.equal(index, want_index) and ((index >= 0) & (index < 8)).all()
    assert torch.equal(weights.isnan(), want_weights.isnan())
    assert weights[nan_rows].isnan().all() and not weights[~weights.isnan().any(1)].isnan().any()
    gate_up, down = expert_weights(8, 16, 24, torch.float32)
    x = torch.randn(70, 16)
    out = padfree.moe_experts(x, index, weights, gate_up, down)
    finite = torch.ones(70, dtype=torch.bool)
    finite[nan_rows] = False
    assert out[nan_rows].isnan().all()
    want = reference.experts(x[finite], index[finite], weights[finite], gate_up, down)
    torch.testing.assert_close(out[finite], want, rtol=2e-5, atol=1e-5)


def test_route_fp16_logits(triton_cpu):
    logits = torch.randn(21, 8).half()
    weights, index = padfree.moe_route(logits, 2)
    want_weights, want_index = reference.route(logits.double(), 2)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(weights.double(), want_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (50, 2, 8, 16), (7, 8, 8, 1), (200, 4, 16, 64)])
def test_native_align_matches_reference(shape, index_dtype):
    num_tokens, top_k, num_experts, block = shape
    assert _ext.load(), _ext.status()
    index = random_index(num_tokens, num_experts, top_k, list(range(0, num_experts, 2)) if num_experts > 4 else None)
    native = torch.ops.padfree.moe_align(index.to(index_dtype), num_experts, block)
    want = reference.align(index, num_experts, block)
    for name, got, expected in zip(("sorted_pairs", "block_expert", "padded_offsets", "pair_position"), native, want):
        assert got.dtype == torch.int32 and torch.equal(got, expected), name
    sorted_pairs, _, padded_offsets, pair_position = want
    flat = index.reshape(-1)
    assert torch.equal(sorted_pairs.long()[pair_position.long()], torch.arange(flat.numel()))
    for expert in range(num_experts):
        run = sorted_pairs[padded_offsets[expert]:padded_offsets[expert + 1]].long()
        real = run[run < flat.numel()]
        assert torch.equal(real, (flat == expert).nonzero().squeeze(1))
        assert (padded_offsets[expert + 1] - padded_offsets[expert]) % block == 0


def test_native_align_rejects_out_of_range_expert():
    assert _ext.load(), _ext.status()
    with pytest.raises(RuntimeError, match="outside 0..3"):
        torch.ops.padfree.moe_align(torch.tensor([[0, 4]]), 4, 16)


def test_bad_input():
    x = torch.randn(5, 32)
    index = random_index(5, 4, 2)
    weights = torch.rand(5, 2)
    gate_up, down = expert_weights(4, 32, 48, torch.float32)
    with pytest.raises(ValueError, match="top_k_index holds expert 4"):
        padfree.moe_experts(x, torch.full((5, 2), 4), weights, gate_up, down)
    with pytest.raises(ValueError, match="down_proj must have shape"):
        padfree.moe_experts(x, index, weights, gate_up, down[:, :, :40])
    with pytest.raises(ValueError, match="gate_up_proj must have shape"):
        padfree.moe_experts(x, index, weights, gate_up[:, :, :16], down)
    with pytest.raises(TypeError, match="top_k_weights must be a float"):
        padfree.moe_experts(x, index, weights.long(), gate_up, down)
    with pytest.raises(TypeError, match="top_k_index must have dtype"):
        padfree.moe_experts(x, index.float(), weights, gate_up, down)
    with pytest.raises(TypeError, match="one dtype"):
        padfree.moe_experts(x.half(), index, weights, gate_up, down)
    with pytest.raises(ValueError, match="top_k_weights must have the shape"):
        padfree.moe_experts(x, index, weights[:, :1], gate_up, down)
    with pytest.raises(ValueError, match="activation"):
        padfree.moe_experts(x, index, weights, gate_up, down, activation="relu")
    with pytest.raises(ValueError, match="top_k must be"):
        padfree.moe_route(torch.randn(5, 4), 5)
    with pytest.raises(ValueError, match="scoring"):
        padfree.moe_route(torch.randn(5, 4), 2, scoring="tanh")
    with pytest.raises(ValueError, match="n_group"):
        padfree.moe_route(torch.randn(5, 6), 2, n_group=4)
    with pytest.raises(ValueError, match="correction_bias must have shape"):
        padfree.moe_route(torch.randn(5, 6), 2, scoring="sigmoid", correction_bias=torch.zeros(5))
    with pytest.raises(TypeError, match="router_logits must have dtype"):
        padfree.moe_route(torch.randn(5, 6).long(), 2)


def test_opcheck_experts_and_route(triton_cpu):
    index = random_index(9, 4, 2)
    gate_up, down = expert_weights(4, 16, 24, torch.float32)
    x = torch.randn(9, 16, requires_grad=True)
    weights = torch.rand(9, 2, requires_grad=True)
    gate_up.requires_grad_()
    down.requires_grad_()
    alignment = moe_ops.moe_align(index, 4, BLOCK)
    torch.library.opcheck(torch.ops.padfree.moe_experts_fwd, (x, index, weights, gate_up, down, *alignment, "triton"))
    logits = torch.randn(9, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.padfree.moe_route_fwd, (logits, None, 2, "softmax", True, 1, 1, 1.0, "triton"))
    torch.library.opcheck(torch.ops.padfree.moe_align, (index, 4, BLOCK))


def test_compiles_without_graph_break(triton_cpu):
    gate_up, down = expert_weights(4, 16, 24, torch.float32)
    x = torch.randn(12, 16)
    logits = torch.randn(12, 4)

    def layer(x, logits):
        weights, index = padfree.moe_route(logits, 2)
        return padfree.moe_experts(x, index, weights, gate_up, down)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, logits), layer(x, logits), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is needed to compile the CUDA sources")
def test_compile_check_moe_kernel_and_cuda_align():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "padfree.cli", "compile-check", "--arch", "80", "90", "--cuda",
                           "--kernel", "moe_down_kernel"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any("moe_align_cuda.cu" in line and "sm_90" in line and line.endswith("ok") for line in lines)
    assert any("moe_align_cuda.cu" in line and "sm_80" in line and line.endswith("ok") for line in lines)
    assert any("moe.moe_down_kernel" in line and "bf16" in line and line.endswith("ok") for line in lines)


def test_frozen_experts_skip_weight_gradients(triton_cpu, monkeypatch):
    """Frozen experts: no weight-gradient kernel runs and the down backward stores no w h rows."""
    from padfree.kernels import moe as moe_kernels

    launched, store_hw = [], []
    for name in ("moe_down_weight_grad_kernel", "moe_gate_up_weight_grad_kernel"):
        kernel = getattr(moe_kernels, name)
        monkeypatch.setattr(moe_kernels, name, _Recorder(kernel, name, launched))
    monkeypatch.setattr(moe_kernels, "moe_down_backward_kernel",
                        _Recorder(moe_kernels.moe_down_backward_kernel, "down_backward", [], store_hw))
    index = random_index(20, 4, 2)
    gate_up, down = expert_weights(4, 32, 48, torch.float32)
    x = torch.randn(20, 32, requires_grad=True)
    weights = torch.rand(20, 2, requires_grad=True)
    grad = torch.randn(20, 32)
    padfree.moe_experts(x, index, weights, gate_up, down).backward(grad)
    assert launched == [] and store_hw == [False]
    _, want = reference_experts((x, weights, gate_up, down), index, grad)
    torch.testing.assert_close(x.grad, want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad, want[1], rtol=2e-5, atol=1e-6)


class _Recorder:
    """Stands in for a kernel: records its launches (and their STORE_HW option) and forwards them."""

    def __init__(self, kernel, name, launched, store_hw=None):
        self.kernel, self.name, self.launched, self.store_hw = kernel, name, launched, store_hw

    def __getitem__(self, grid):
        self.launched.append(self.name)

        def run(*args, **kwargs):
            if self.store_hw is not None:
                self.store_hw.append(kwargs["STORE_HW"])
            return self.kernel[grid](*args, **kwargs)
        return run


def test_align_without_native_kernel_warns_once_and_agrees(monkeypatch):
    monkeypatch.setattr(moe_ops, "_has_native_align", lambda device: False)
    monkeypatch.setattr(padfree._backend, "_warned", set())
    index = random_index(30, 6, 2)
    with pytest.warns(padfree._backend.PadfreeFallbackWarning, match="PyTorch version"):
        got = moe_ops.moe_align(index, 6, BLOCK)
    for a, b in zip(got, reference.align(index, 6, BLOCK)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (64, 8)])
def test_gpu_experts_bf16_and_cuda_align(num_experts, top_k):
    device = torch.device("cuda")
    num_tokens, hidden, inter = 2048 + 37, 512, 384
    index = random_index(num_tokens, num_experts, top_k, list(range(num_experts - 1))).to(device)
    assert _ext.load() and _ext.has_kernel("moe_align", device), _ext.status()
    with cuda_syncs_raise():
        native = torch.ops.padfree.moe_align(index, num_experts, BLOCK)
        pytorch_version = reference.align(index, num_experts, BLOCK)
    for got, want in zip(native, pytorch_version):
        assert torch.equal(got, want)
    gate_up, down = (t.to(device) for t in expert_weights(num_experts, hidden, inter, torch.float64))
    x = torch.randn(num_tokens, hidden, dtype=torch.float64, device=device)
    weights = torch.rand(num_tokens, top_k, dtype=torch.float64, device=device)
    grad = torch.randn(num_tokens, hidden, dtype=torch.float64, device=device)
    oracle, oracle_grads = reference_experts((x, weights, gate_up, down), index, grad)
    low = (x.bfloat16(), weights.float(), gate_up.bfloat16(), down.bfloat16())
    with padfree.use_backend("triton"), cuda_syncs_raise():
        out, grads = run_experts(low, index, grad.bfloat16())
    with padfree.use_backend("reference"):
        base, base_grads = reference_experts(low, index, grad.bfloat16())
    assert_close("out", out, oracle, base, factor=2)
    for name, got, want, baseline in zip(("d hidden_states", "d top_k_weights", "d gate_up_proj", "d down_proj"),
                                         grads, oracle_grads, base_grads):
        assert_close(name, got.bfloat16(), want, baseline.bfloat16(), factor=3)
    assert grads[2][-1].abs().max() == 0 and grads[3][-1].abs().max() == 0
