"""lora_mixture_linear / lora_per_sequence_linear: kernels (interpreter) and reference vs a float64 oracle.

The oracle is padfree.reference.lora_mixture.forward (a loop over experts with per-token gates, the
way a PEFT user writes a mixture) run by autograd in float64, with the dropout mask of the seed the
op draws; the baseline for the low-precision tolerance is the same loop run by PyTorch in the input
dtype. The Triton path computes the mixture differently (one LoRA of rank E * r with a gate on its
intermediate), so agreement tests that identity too.
"""

import pytest
import torch

import padfree
from padfree.kernels import lora as lora_kernels
from padfree.kernels import lora_mixture as mixture_kernels
from padfree.kernels import moe as moe_kernels
from padfree.ops import lora_mixture as mixture_ops
from padfree.ops.lora_mixture import lora_mixture_linear, lora_per_sequence_linear, sequence_routing
from padfree.reference import lora_mixture as reference
from tests.numerics import assert_close

SEED = 1234


def _inputs(m, k, n, experts, rank, top_k, dtype, bias=True):
    """Random inputs scaled like a trained layer; routing weights fp32 (a router's softmax)."""
    x = torch.randn(m, k).to(dtype).requires_grad_()
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    b = (torch.randn(n) * 0.1).to(dtype).requires_grad_() if bias else None
    lora_a = (torch.randn(experts, rank, k) / k**0.5).to(dtype).requires_grad_()
    lora_b = (torch.randn(experts, n, rank) / rank**0.5).to(dtype).requires_grad_()
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(m)]) if m else torch.zeros(0, top_k).long()
    weights = torch.rand(m, top_k).softmax(-1).requires_grad_()
    return dict(x=x, weight=weight, bias=b, lora_a=lora_a, lora_b=lora_b, scaling=1.5, top_k_index=index,
                top_k_weights=weights)


def _grad_names(args):
    return [name for name in ("x", "bias", "lora_a", "lora_b", "top_k_weights")
            if args[name] is not None and args[name].requires_grad]


def _run(fn, args, dy):
    y = fn(args)
    names = _grad_names(args)
    grads = torch.autograd.grad(y, [args[name] for name in names], dy)
    return y.detach(), dict(zip(names, grads))


def _as(dtype, args, weights_dtype):
    def convert(value, to):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        return value.detach().to(to).requires_grad_(value.requires_grad)
    return {name: convert(value, weights_dtype if name == "top_k_weights" else dtype) for name, value in args.items()}


def _loop(args, dropout_p, seed):
    y, _ = reference.forward(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], args["scaling"],
                             args["top_k_index"], args["top_k_weights"], dropout_p, seed)
    return y


def _check(args, dropout_p):
    """The op (on the active backend) against the float64 loop, with the loop in the input dtype
    as the baseline; returns the op's gradients."""
    dtype = args["x"].dtype
    dy = torch.randn(args["x"].shape[0], args["weight"].shape[0]).to(dtype)
    torch.manual_seed(SEED)
    out, grads = _run(lambda a: lora_mixture_linear(**a, dropout_p=dropout_p), args, dy)
    torch.manual_seed(SEED)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) if dropout_p > 0 else 0
    oracle_out, oracle_grads = _run(lambda a: _loop(a, dropout_p, seed), _as(torch.float64, args, torch.float64),
                                    dy.double())
    base_out, base_grads = _run(lambda a: _loop(a, dropout_p, seed), args, dy)
    assert out.dtype == dtype
    assert_close("y", out, oracle_out, base_out, factor=2)
    assert set(grads) == set(oracle_grads) == {"x", "lora_a", "lora_b", "top_k_weights"} | (
        {"bias"} if args["bias"] is not None else set())
    assert grads["top_k_weights"].dtype == args["top_k_weights"].dtype
    for name in grads:
        # the routing weights are fp32 but their gradient is a sum of products of 16-bit values: it
        # is held to the rule of the input dtype (both it and the baseline's rounded to that dtype)
        assert_close(f"d{name}", grads[name].to(dtype), oracle_grads[name], base_grads[name].to(dtype), factor=3)
    return grads


class Counter:
    """Counts calls of module.<name> for one test."""

    def __init__(self, monkeypatch, module, name):
        self.count = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counters on the fused-LoRA launchers the Triton path of the mixture must use."""
    return {name: Counter(monkeypatch, lora_kernels, name) for name in ("shrink", "expand", "backward_input_and_a")}


def _assert_kernels_ran(kernel_calls):
    assert {name: c.count for name, c in kernel_calls.items()} == {"shrink": 1, "expand": 1,
                                                                    "backward_input_and_a": 1}


# ----------------------------------------------------------------------------- mixture vs float64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_kernels_top2_of_4_match_float64(triton_cpu, kernel_calls, dtype, bias):
    # 66 tokens, K = 65, N = 67: one past the 64 tiles of the "small" configuration
    _check(_inputs(66, 65, 67, 4, 3, 2, dtype, bias), 0.0)
    _assert_kernels_ran(kernel_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_dropout_match_float64_with_the_same_mask(triton_cpu, kernel_calls, dtype):
    _check(_inputs(66, 65, 67, 4, 4, 2, dtype), 0.25)
    _assert_kernels_ran(kernel_calls)


def test_kernels_total_rank_over_one_column_block(triton_cpu, kernel_calls):
    # E * r = 8 * 17 = 136: the shrink spans two of its 128-wide column blocks, expert 7's columns cross
    _check(_inputs(20, 33, 35, 8, 17, 3, torch.float32), 0.1)
    _assert_kernels_ran(kernel_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_reference_backend_matches_float64(dtype, dropout_p):
    with padfree.use_backend("reference"):
        _check(_inputs(30, 24, 20, 4, 3, 2, dtype), dropout_p)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_expert_top1_equals_lora_linear(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    args = _inputs(33, 24, 20, 1, 5, 1, torch.float32)
    args["top_k_weights"] = torch.ones(33, 1)
    dy = torch.randn(33, 20)
    with padfree.use_backend(backend):
        torch.manual_seed(SEED)
        out, grads = _run(lambda a: lora_mixture_linear(**a, dropout_p=0.3), args, dy)
        torch.manual_seed(SEED)
        lora_out, lora_grads = _run(lambda a: padfree.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"][0],
                                                                  a["lora_b"][0], a["scaling"], 0.3), args, dy)
    assert_close("y", out, lora_out, None, factor=1)
    for name in ("x", "bias", "lora_a", "lora_b"):
        assert_close(f"d{name}", grads[name], lora_grads[name], None, factor=1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_repeated_expert_adds_its_weights(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    args = _inputs(12, 16, 8, 3, 2, 2, torch.float32)
    args["top_k_index"] = torch.tensor([[1, 1]] * 12)
    merged = {**args, "top_k_index": torch.ones(12, 1, dtype=torch.int64),
              "top_k_weights": args["top_k_weights"].detach().sum(1, keepdim=True).requires_grad_()}
    dy = torch.randn(12, 8)
    with padfree.use_backend(backend):
        out, grads = _run(lambda a: lora_mixture_linear(**a), args, dy)
        merged_out, merged_grads = _run(lambda a: lora_mixture_linear(**a), merged, dy)
    assert_close("y", out, merged_out, None, factor=1)
    # d y / d w_j is the same for both slots: the merged weight's gradient
    assert_close("dw", grads["top_k_weights"], merged_grads["top_k_weights"].expand(12, 2), None, factor=1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_expert_no_token_chose_gets_zero_gradient(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    args = _inputs(20, 16, 8, 4, 2, 2, torch.float32)
    args["top_k_index"] = torch.stack([torch.randperm(2) for _ in range(20)])
    with padfree.use_backend(backend):
        _, grads = _run(lambda a: lora_mixture_linear(**a, dropout_p=0.2), args, torch.randn(20, 8))
    assert grads["lora_a"][:2].abs().sum() > 0 and grads["lora_b"][:2].abs().sum() > 0
    assert torch.equal(grads["lora_a"][2:], torch.zeros_like(grads["lora_a"][2:]))
    assert torch.equal(grads["lora_b"][2:], torch.zeros_like(grads["lora_b"][2:]))


def test_frozen_weight_gets_a_gradient_only_when_it_requires_one():
    args = _inputs(10, 16, 8, 2, 2, 1, torch.float32)
    with padfree.use_backend("reference"):
        lora_mixture_linear(**args).sum().backward()
        assert args["weight"].grad is None
        args["weight"].requires_grad_()
        dy = torch.randn(10, 8)
        lora_mixture_linear(**args).backward(dy)
    torch.testing.assert_close(args["weight"].grad, dy.t() @ args["x"].detach())


def test_leading_shape_and_int32_index(triton_cpu, kernel_calls):
    args = _inputs(12, 16, 8, 3, 2, 2, torch.float32)
    flat = lora_mixture_linear(**args)
    shaped = lora_mixture_linear(**{**args, "x": args["x"].view(3, 4, 16), "top_k_index": args["top_k_index"].int()})
    assert shaped.shape == (3, 4, 8) and kernel_calls["shrink"].count == 2
    torch.testing.assert_close(shaped.view(12, 8), flat, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_tokens(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    args = _inputs(0, 16, 8, 3, 2, 2, torch.float32)
    with padfree.use_backend(backend):
        y, grads = _run(lambda a: lora_mixture_linear(**a, dropout_p=0.2), args, torch.randn(0, 8))
    assert y.shape == (0, 8) and grads["x"].shape == (0, 16) and grads["top_k_weights"].shape == (0, 2)
    assert torch.equal(grads["lora_a"], torch.zeros_like(grads["lora_a"]))
    assert torch.equal(grads["lora_b"], torch.zeros_like(grads["lora_b"]))


# ----------------------------------------------------------------------------- many experts (E * r > 256)
SEGMENTED_KERNELS = ("lora_mixture_shrink_kernel", "lora_mixture_grad_h_kernel", "lora_mixture_weight_grad_kernel",
                     "lora_mixture_grad_x_kernel")


class LaunchCounter:
    """Counts launches (kernel[grid](...)) of module.<name> for one test."""

    def __init__(self, monkeypatch, module, name):
        self.count = 0
        kernel = getattr(module, name)
        counter = self

        class Counted:
            def __getitem__(self, grid):
                counter.count += 1
                return kernel[grid]

        monkeypatch.setattr(module, name, Counted())


@pytest.fixture
def segmented_launches(monkeypatch):
    """Launch counters on the many-experts kernels and the MoE down kernel their forward reuses."""
    counters = {name: LaunchCounter(monkeypatch, mixture_kernels, name) for name in SEGMENTED_KERNELS}
    counters["moe_down_kernel"] = LaunchCounter(monkeypatch, moe_kernels, "moe_down_kernel")
    return counters


def _launch_counts(counters):
    return {name: c.count for name, c in counters.items()}


def _assert_unchosen_experts_get_zero(args, grads):
    chosen = set(args["top_k_index"].flatten().tolist())
    for expert in range(args["lora_a"].shape[0]):
        for name in ("lora_a", "lora_b"):
            grad = grads[name][expert]
            assert (grad.abs().sum() > 0) == (expert in chosen), (name, expert)
            if expert not in chosen:
                assert torch.equal(grad, torch.zeros_like(grad)), (name, expert)


@pytest.mark.slow
@pytest.mark.parametrize("experts, rank, top_k, dtype, bias, dropout_p", [
    (64, 16, 2, torch.float32, True, 0.0),
    (64, 16, 2, torch.float16, False, 0.25),
    (64, 16, 2, torch.bfloat16, True, 0.25),
    (20, 16, 2, torch.float32, False, 0.25),
    (20, 16, 3, torch.bfloat16, False, 0.0),
])
def test_many_experts_kernels_match_float64(triton_cpu, kernel_calls, segmented_launches, experts, rank, top_k, dtype,
                                            bias, dropout_p):
    # K = 40, N = 36: past one 32-wide fp32 tile, inside one 64-wide 16-bit tile (masked)
    args = _inputs(12, 40, 36, experts, rank, top_k, dtype, bias)
    grads = _check(args, dropout_p)
    # the weight-gradient kernel runs twice: dA and dB
    assert _launch_counts(segmented_launches) == {**dict.fromkeys([*SEGMENTED_KERNELS, "moe_down_kernel"], 1),
                                                  "lora_mixture_weight_grad_kernel": 2}
    assert all(c.count == 0 for c in kernel_calls.values())  # not the gated single-LoRA path
    _assert_unchosen_experts_get_zero(args, grads)


def test_many_experts_rank_tiles_and_an_expert_over_several_blocks(triton_cpu, segmented_launches):
    """E * r = 4 * 80: several rank tiles (d top_k_weights adds their partial sums; a rank past a
    multiple of 16); expert 0 is every token's first choice, 70 pairs over two 64-row pair blocks."""
    args = _inputs(70, 24, 20, 4, 80, 2, torch.float32)
    index = torch.stack([torch.zeros(70, dtype=torch.int64), torch.randint(1, 4, (70,))], dim=1)
    args["top_k_index"] = index
    _check(args, 0.2)
    assert segmented_launches["lora_mixture_shrink_kernel"].count == 1


def test_many_experts_frozen_input_skips_dx(triton_cpu, segmented_launches):
    args = _inputs(12, 24, 20, 64, 16, 2, torch.float32)
    args["x"] = args["x"].detach()
    dy = torch.randn(12, 20)
    torch.manual_seed(SEED)
    _, grads = _run(lambda a: lora_mixture_linear(**a, dropout_p=0.3), args, dy)
    torch.manual_seed(SEED)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    _, oracle = _run(lambda a: _loop(a, 0.3, seed), _as(torch.float64, args, torch.float64), dy.double())
    assert set(grads) == {"bias", "lora_a", "lora_b", "top_k_weights"}
    for name in grads:
        assert_close(f"d{name}", grads[name], oracle[name], None, factor=1)
    assert segmented_launches["lora_mixture_grad_x_kernel"].count == 0
    assert segmented_launches["lora_mixture_weight_grad_kernel"].count == 2
    _assert_unchosen_experts_get_zero(args, grads)


def test_many_experts_efficiency_yardsticks():
    """The efficiency gate holds the launches that drop out x in their main loop (shrink, dA) to
    the dropout GEMM, every other many-experts launch (grad_x's mask is in its epilogue) to the plain
    GEMM, each at the launch's own (rows, columns, reduction) tile."""
    from padfree import efficiency
    from padfree.kernels import registry, textbook

    tiles = {"shrink": ("BLOCK_M", "BLOCK_R", "BLOCK_K"), "grad_h": ("BLOCK_M", "BLOCK_R", "BLOCK_N"),
             "weight_grad": ("BLOCK_K", "BLOCK_R", "BLOCK_M"), "grad_x": ("BLOCK_M", "BLOCK_K", "BLOCK_R")}
    seen = set()
    for entry in registry.all_kernels():
        short = entry.name.rsplit(".", 1)[-1]
        if short not in SEGMENTED_KERNELS:
            continue
        part = short.removeprefix("lora_mixture_").removesuffix("_kernel")
        for launch in entry.launches():
            if not efficiency.is_hot(entry.name, launch):
                continue
            kernel, reference = efficiency.reference_for(entry.name, launch)
            dropout_loop = launch.constexprs.get("DROPOUT", False) and part in ("shrink", "weight_grad")
            assert kernel is textbook.textbook_gemm_kernel and reference.constexprs["DROPOUT"] == dropout_loop
            assert tuple(reference.constexprs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) == \
                tuple(launch.constexprs[key] for key in tiles[part])
            seen.add((part, dropout_loop))
    assert seen == {("shrink", False), ("shrink", True), ("grad_h", False), ("weight_grad", False),
                    ("weight_grad", True), ("grad_x", False)}


@pytest.mark.parametrize("backend, dtype", [("reference", torch.bfloat16), ("triton", torch.float16),
                                            ("triton", torch.bfloat16)])
def test_autocast_with_fp32_parameters(request, backend, dtype):
    """Under autocast the op runs on the inputs cast to the autocast dtype (routing weights stay fp32),
    and the gradients reach the fp32 leaves in fp32."""
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    args = _inputs(10, 16, 8, 3, 2, 2, torch.float32)
    with padfree.use_backend(backend):
        with torch.autocast("cpu", dtype=dtype):
            y = lora_mixture_linear(**args)
        assert y.dtype == dtype
        y.float().sum().backward()
        rounded = _as(dtype, args, torch.float32)
        torch.testing.assert_close(y, lora_mixture_linear(**rounded), rtol=0, atol=0)
    for name in ("x", "bias", "lora_a", "lora_b", "top_k_weights"):
        assert args[name].grad.dtype == torch.float32, name


# ----------------------------------------------------------------------------- per-sequence adapters
LENGTHS = [5, 0, 7, 3, 6]
ADAPTERS = [2, 0, 2, 1, 0]   # adapter 3 is used by no sequence
PADDING = 2


def _packed_batch():
    total = sum(LENGTHS)
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(total + PADDING, 16)
    return x, cu_seqlens, torch.tensor(ADAPTERS)


def test_sequence_routing_sends_each_token_to_its_sequence_adapter():
    _, cu_seqlens, adapter_ids = _packed_batch()
    index, weights = sequence_routing(adapter_ids, cu_seqlens, sum(LENGTHS) + PADDING)
    expected = [a for a, n in zip(ADAPTERS, LENGTHS) for _ in range(n)]
    assert index[:, 0].tolist() == expected + [0] * PADDING
    assert weights[:, 0].tolist() == [1.0] * len(expected) + [0.0] * PADDING


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_adapters_packed_equals_each_adapter_alone(request, backend):
    """Two SGD steps of 4 adapters on one packed batch == each adapter trained by lora_linear on its
    own sequences: same losses, same adapter gradients and parameters, zero gradient for adapter 3."""
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    x, cu_seqlens, adapter_ids = _packed_batch()
    weight, bias = torch.randn(8, 16) / 4, torch.randn(8) * 0.1
    targets = torch.randn(x.shape[0], 8)
    lora_a, lora_b = torch.randn(4, 3, 16) / 4, torch.randn(4, 8, 3) / 2
    packed = [lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()]
    alone = [[lora_a[e].clone().requires_grad_(), lora_b[e].clone().requires_grad_()] for e in range(4)]
    bounds = cu_seqlens.tolist()
    with padfree.use_backend(backend):
        for _ in range(2):
            y = lora_per_sequence_linear(x, weight, bias, *packed, 2.0, adapter_ids, cu_seqlens)
            loss = ((y - targets) ** 2)[:sum(LENGTHS)].sum()
            loss.backward()
            base = x[-PADDING:] @ weight.t() + bias
            assert_close("padding", y[-PADDING:].detach(), base, None, factor=1)
            loss_alone = sum(((padfree.lora_linear(x[start:end], weight, bias, *alone[adapter], 2.0)
                               - targets[start:end]) ** 2).sum()
                             for adapter, start, end in zip(ADAPTERS, bounds[:-1], bounds[1:]))
            loss_alone.backward()
            assert_close("loss", loss.detach(), loss_alone.detach(), None, factor=1)
            assert packed[0].grad[3].abs().sum() == 0 and packed[1].grad[3].abs().sum() == 0
            for e in range(4):
                grads_alone = [p.grad if p.grad is not None else torch.zeros_like(p) for p in alone[e]]
                assert_close(f"dA{e}", packed[0].grad[e], grads_alone[0], None, factor=1)
                assert_close(f"dB{e}", packed[1].grad[e], grads_alone[1], None, factor=1)
            with torch.no_grad():
                # adapter 3 alone is never called: no gradient, no step
                for parameter in [*packed, *(p for pair in alone for p in pair if p.grad is not None)]:
                    parameter -= 0.05 * parameter.grad
                    parameter.grad = None
    for e in range(4):
        assert_close(f"A{e}", packed[0][e].detach(), alone[e][0].detach(), None, factor=1)
        assert_close(f"B{e}", packed[1][e].detach(), alone[e][1].detach(), None, factor=1)
    torch.testing.assert_close(packed[0][3].detach(), lora_a[3], rtol=0, atol=0)


def test_per_sequence_on_kernels_matches_float64(triton_cpu, kernel_calls):
    x, cu_seqlens, adapter_ids = _packed_batch()
    args = _inputs(x.shape[0], 16, 8, 4, 3, 1, torch.float16)
    args["top_k_index"], args["top_k_weights"] = sequence_routing(adapter_ids, cu_seqlens, x.shape[0])
    dy = torch.randn(x.shape[0], 8).half()
    # packed as HF hands it over: (1, total, hidden)
    out, grads = _run(lambda a: lora_per_sequence_linear(a["x"][None], a["weight"], a["bias"], a["lora_a"],
                                                         a["lora_b"], a["scaling"], adapter_ids, cu_seqlens)[0],
                      args, dy)
    _assert_kernels_ran(kernel_calls)
    oracle_out, oracle_grads = _run(lambda a: _loop(a, 0.0, 0), _as(torch.float64, args, torch.float64), dy.double())
    base_out, base_grads = _run(lambda a: _loop(a, 0.0, 0), args, dy)
    assert_close("y", out, oracle_out, base_out, factor=2)
    for name in ("x", "bias", "lora_a", "lora_b"):
        assert_close(f"d{name}", grads[name], oracle_grads[name], base_grads[name], factor=3)


# ----------------------------------------------------------------------------- custom op machinery
def _op_args(dropout_p, backend, bias=True):
    args = _inputs(9, 16, 12, 3, 2, 2, torch.float32, bias)
    seed = torch.tensor(77, dtype=torch.int64)
    return (args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 1.5, args["top_k_index"],
            args["top_k_weights"], dropout_p, seed, backend)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_forward(dropout_p, bias):
    torch.library.opcheck(mixture_ops._forward_op, _op_args(dropout_p, "reference", bias))


def test_opcheck_forward_triton(triton_cpu):
    torch.library.opcheck(mixture_ops._forward_op, _op_args(0.2, "triton"))


def test_opcheck_forward_triton_many_experts(triton_cpu):
    """The fake implementation gives the many-experts path's saved h its (capacity, r) shape."""
    x, weight, bias, _, _, scaling, index, weights, dropout_p, seed, backend = _op_args(0.2, "triton")
    lora_a, lora_b = torch.randn(20, 16, 16) / 4, torch.randn(20, 12, 16) / 4
    index = torch.randint(0, 20, (9, 2))
    torch.library.opcheck(mixture_ops._forward_op, (x, weight, bias, lora_a, lora_b, scaling, index, weights,
                                                    dropout_p, seed, backend))


@pytest.mark.parametrize("input_grad", [True, False])
def test_opcheck_backward(input_grad):
    x, weight, _, lora_a, lora_b, scaling, index, weights, dropout_p, seed, backend = _op_args(0.2, "reference")
    args = (torch.randn(9, 12), x.detach(), weight, torch.randn(9, 6), lora_a.detach(), lora_b.detach(), scaling,
            index, weights.detach(), dropout_p, seed, input_grad, backend)
    torch.library.opcheck(mixture_ops._backward_op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    args = _inputs(9, 16, 12, 3, 2, 2, torch.float32)
    names = _grad_names(args)

    def step(a):
        return lora_mixture_linear(**a, check=False).square().sum()

    with padfree.use_backend("reference"):
        expected = torch.autograd.grad(step(args), [args[n] for n in names])
        got = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(args),
                                  [args[n] for n in names])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------- bad input
def _good():
    return dict(x=torch.randn(3, 8), weight=torch.randn(5, 8), bias=torch.randn(5), lora_a=torch.randn(4, 2, 8),
                lora_b=torch.randn(4, 5, 2), scaling=1.0, top_k_index=torch.tensor([[0, 1], [2, 3], [1, 0]]),
                top_k_weights=torch.rand(3, 2))


@pytest.mark.parametrize("change, error, match", [
    (dict(lora_a=torch.randn(2, 8)), ValueError, r"lora_a must have shape \(num_experts, rank, in_features\)"),
    (dict(lora_a=torch.randn(4, 2, 9)), ValueError, r"lora_a must have shape \(num_experts >= 1, rank >= 1, 8\)"),
    (dict(lora_b=torch.randn(4, 5, 3)), ValueError, r"lora_b must have shape .* \(4, 5, 2\)"),
    (dict(lora_b=torch.randn(3, 5, 2)), ValueError, "lora_b must have shape"),
    (dict(weight=torch.randn(5, 9)), ValueError, "weight has in_features 9"),
    (dict(bias=torch.randn(6)), ValueError, r"bias must have shape \(5,\)"),
    (dict(top_k_index=torch.tensor([[0, 1], [2, 3]])), ValueError, r"top_k_index must have shape .* \(3, top_k"),
    (dict(top_k_index=torch.tensor([[0, 1], [2, 4], [1, 0]])), ValueError, "top_k_index holds expert 4"),
    (dict(top_k_index=torch.tensor([[0, 1], [2, -1], [1, 0]])), ValueError, "top_k_index holds expert -1"),
    (dict(top_k_index=torch.zeros(3, 2)), TypeError, "top_k_index must have dtype"),
    (dict(top_k_weights=torch.rand(3, 1)), ValueError, "top_k_weights must have the shape of top_k_index"),
    (dict(top_k_weights=torch.ones(3, 2, dtype=torch.int64)), TypeError, "top_k_weights must be a float tensor"),
    (dict(lora_b=torch.randn(4, 5, 2, dtype=torch.float16)), TypeError, "one dtype"),
    (dict(x=torch.randn(3, 8).numpy()), TypeError, "x must be a torch.Tensor"),
    (dict(scaling=float("inf")), TypeError, "scaling must be a finite float"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
])
def test_bad_input_raises_naming_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        lora_mixture_linear(**{**_good(), **change})


def _good_per_sequence():
    good = _good()
    del good["top_k_index"], good["top_k_weights"]
    return dict(good, adapter_ids=torch.tensor([3, 0]), cu_seqlens=torch.tensor([0, 1, 3], dtype=torch.int32))


@pytest.mark.parametrize("change, error, match", [
    (dict(adapter_ids=torch.tensor([3, 4])), ValueError, "adapter_ids holds adapter 4, outside 0..3"),
    (dict(adapter_ids=torch.tensor([0])), ValueError, "adapter_ids must have one entry per sequence"),
    (dict(adapter_ids=torch.tensor([0.0, 1.0])), TypeError, "adapter_ids must have dtype"),
    (dict(cu_seqlens=torch.tensor([0, 1, 3])), TypeError, "cu_seqlens must be int32"),
    (dict(cu_seqlens=torch.tensor([0, 2, 1], dtype=torch.int32)), ValueError, "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32)), ValueError, "exceeds the number of tokens 3"),
])
def test_per_sequence_bad_input_raises_naming_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        lora_per_sequence_linear(**{**_good_per_sequence(), **change})
