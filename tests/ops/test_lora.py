"""padfree.lora_linear / lora_linear_shared: kernels (interpreter) and reference vs a float64 oracle.

The oracle is plain autograd in float64 on the defining formula, with the dropout mask from
`padfree.reference.lora.keep_mask` and the seed the op draws; the baseline for the low-precision
tolerance is the same formula run by PyTorch in the input dtype.
"""

import pytest
import torch

import padfree
from padfree.ops import lora as lora_ops
from padfree.reference import lora as reference
from tests.numerics import assert_close


def _params(k, out_features, ranks, dtype, bias, weight_grad=False):
    """Random (weight, bias, lora_a, lora_b) per projection, scaled like a trained layer."""
    projections = []
    for n, rank in zip(out_features, ranks):
        weight = (torch.randn(n, k) / k**0.5).to(dtype).requires_grad_(weight_grad)
        b = (torch.randn(n) * 0.1).to(dtype).requires_grad_() if bias else None
        lora_a = (torch.randn(rank, k) / k**0.5).to(dtype).requires_grad_()
        lora_b = (torch.randn(n, rank) / rank**0.5).to(dtype).requires_grad_()
        projections.append((weight, b, lora_a, lora_b))
    return projections


def _formula(x, projections, scalings, dropout_p, seed):
    """The op's definition, run by autograd in x's dtype (independent of the hand backward)."""
    x2d = x.reshape(-1, x.shape[-1])
    outputs = []
    for stream, ((weight, bias, lora_a, lora_b), scaling) in enumerate(zip(projections, scalings)):
        dropped = x2d
        if dropout_p > 0:
            keep = reference.keep_mask(seed, stream, x2d.shape[0], x2d.shape[1], dropout_p).to(x.dtype)
            dropped = x2d * keep / (1 - dropout_p)
        y = x2d @ weight.t() + scaling * (dropped @ lora_a.t()) @ lora_b.t()
        if bias is not None:
            y = y + bias
        outputs.append(y.view(*x.shape[:-1], -1))
    return outputs


def _leaves(x, projections):
    tensors = [x] if x.requires_grad else []
    for projection in projections:
        tensors += [t for t in projection if t is not None and t.requires_grad]
    return tensors


def _names(projections, input_grad=True):
    names = ["x"] if input_grad else []
    for index, (weight, bias, _, _) in enumerate(projections):
        names += [f"weight{index}"] if weight.requires_grad else []
        names += [f"bias{index}"] if bias is not None else []
        names += [f"lora_a{index}", f"lora_b{index}"]
    return names


def _run(fn, x, projections, grads_out):
    outputs = fn(x, projections)
    leaves = _leaves(x, projections)
    grads = torch.autograd.grad(outputs, leaves, grads_out)
    return [o.detach() for o in outputs], list(grads)


def _as(dtype, x, projections):
    def convert(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
    return convert(x), [tuple(convert(t) for t in projection) for projection in projections]


def _check(leading, k, out_features, ranks, dtype, bias, dropout_p, weight_grad=False, input_grad=True):
    x = torch.randn(*leading, k).to(dtype).requires_grad_(input_grad)
    projections = _params(k, out_features, ranks, dtype, bias, weight_grad)
    scalings = [2.0, 0.5, 1.5][:len(projections)]
    grads_out = [torch.randn(*leading, n).to(dtype) for n in out_features]

    def op(x_, projections_):
        weights, biases, lora_as, lora_bs = (list(p) for p in zip(*projections_))
        if len(weights) == 1:
            return [padfree.lora_linear(x_, weights[0], biases[0], lora_as[0], lora_bs[0], scalings[0], dropout_p)]
        return lora_ops.lora_linear_shared(x_, weights, biases, lora_as, lora_bs, scalings, dropout_p)

    torch.manual_seed(1234)
    outputs, grads = _run(op, x, projections, grads_out)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) if dropout_p > 0 else 0

    def formula(x_, projections_):
        return _formula(x_, projections_, scalings, dropout_p, seed)

    x64, p64 = _as(torch.float64, x, projections)
    oracle_out, oracle_grads = _run(formula, x64, p64, [g.double() for g in grads_out])
    base_out, base_grads = _run(formula, x, projections, grads_out)
    for index, (out, oracle, base) in enumerate(zip(outputs, oracle_out, base_out)):
        assert out.dtype == dtype
        assert_close(f"y{index}", out, oracle, base, factor=2)
    names = _names(projections, input_grad)
    assert len(names) == len(grads) == len(oracle_grads)
    for name, grad, oracle, base in zip(names, grads, oracle_grads, base_grads):
        assert_close(f"d{name}", grad, oracle, base, factor=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 3, 8, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_kernels_match_float64(triton_cpu, dtype, rank, bias):
    # M = 6 * 11 = 66, K = 65, N = 67: one past the 64 tiles of the "small" configuration
    _check((6, 11), 65, [67], [rank], dtype, bias, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [3, 16])
def test_kernels_dropout_match_float64_with_the_same_mask(triton_cpu, dtype, rank):
    _check((2, 3, 11), 33, [40], [rank], dtype, True, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_kernels_shared_input_match_float64(triton_cpu, dtype, dropout_p):
    # q/k/v-like: three projections of different widths and ranks on one x
    _check((37,), 48, [33, 17, 17], [8, 3, 5], dtype, True, dropout_p)


@pytest.mark.parametrize("ranks, dropout_p", [([256], 0.0), ([100, 60], 0.2)])
def test_kernels_large_ranks_span_several_column_blocks(triton_cpu, ranks, dropout_p):
    # rank 256 takes two 128-wide shrink blocks; with [100, 60] the blocks straddle the two streams
    _check((9,), 20, [12, 7][:len(ranks)], ranks, torch.float32, False, dropout_p)


def test_kernels_large_tiles_and_frozen_weight_grad(triton_cpu):
    # M >= 1024 and N >= 256 select the 128x128x64 configuration; weight requires grad here
    _check((1030,), 70, [257], [16], torch.float16, True, 0.0, weight_grad=True)


@pytest.mark.parametrize("launcher, index",
                         [("lora_forward", i) for i in range(6)] + [("lora_dx", i) for i in range(3)])
def test_every_tuning_candidate_matches_float64(triton_cpu, launcher, index):
    """On a GPU the large-problem configuration is picked by timing; each candidate must be right."""
    from padfree.kernels import lora as kernels
    from padfree.kernels import runtime

    assert len(kernels.FORWARD_TILES.choices((2, "large"))) == 6 and len(kernels.DX_TILES.choices((2, "large"))) == 3
    with runtime.force_choice(launcher, index):
        # M >= 1024 and N, K >= 256 select the large candidates for both the forward and dx
        _check((1030,), 260, [257], [16], torch.float16, True, 0.2 if launcher == "lora_dx" else 0.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_input_without_grad_skips_the_dx_gemm(triton_cpu, monkeypatch, backend, dropout_p):
    """A first layer's input needs no gradient: the LoRA grads stay right and no dx is computed."""
    from padfree.kernels import lora as kernels

    module = kernels if backend == "triton" else reference
    original, seen = module.backward_input_and_a, []

    def spy(*args):
        dx, da = original(*args)
        seen.append((args[-1], dx.numel()))
        return dx, da

    monkeypatch.setattr(module, "backward_input_and_a", spy)
    with padfree.use_backend(backend):
        _check((13,), 24, [10, 6], [4, 2], torch.float32, True, dropout_p, input_grad=False)
    assert seen == [(False, 0)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_backend_matches_float64(dropout_p):
    with padfree.use_backend("reference"):
        _check((3, 7), 20, [9], [4], torch.float32, True, dropout_p, weight_grad=True)
        _check((13,), 24, [10, 12], [2, 6], torch.float16, False, dropout_p)


def test_keep_mask_rate_and_streams():
    keep = reference.keep_mask(11, 0, 256, 300, 0.2)
    assert abs(keep.float().mean().item() - 0.8) < 0.01
    other_stream = reference.keep_mask(11, 1, 256, 300, 0.2)
    other_seed = reference.keep_mask(12, 0, 256, 300, 0.2)
    assert 0.6 < (keep == other_stream).float().mean().item() < 0.75
    assert 0.6 < (keep == other_seed).float().mean().item() < 0.75
    assert reference.keep_mask(11, 0, 256, 300, 0.0).all()


def test_leading_shape_and_non_contiguous_input(triton_cpu):
    x = torch.randn(20, 2, 3).transpose(0, 2)  # (3, 2, 20), last dim strided
    weight, lora_a, lora_b = torch.randn(7, 20), torch.randn(2, 20), torch.randn(7, 2)
    y = padfree.lora_linear(x, weight, None, lora_a, lora_b, 0.5)
    expected = x @ weight.t() + 0.5 * (x @ lora_a.t()) @ lora_b.t()
    assert y.shape == (3, 2, 7)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _op_args(dropout_p, backend, bias=True):
    x = torch.randn(9, 16)
    weights = [torch.randn(12, 16), torch.randn(5, 16)]
    biases = [torch.randn(12, requires_grad=True)] if bias else []
    lora_a = torch.randn(7, 16, requires_grad=True)
    lora_bs = [torch.randn(12, 3, requires_grad=True), torch.randn(5, 4, requires_grad=True)]
    seed = torch.tensor(77, dtype=torch.int64)
    return (x.requires_grad_(), weights, biases, [bias, False], lora_a, lora_bs, [3, 7], [2.0, 0.5], dropout_p, seed,
            backend)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_forward(dropout_p):
    torch.library.opcheck(lora_ops._forward_op, _op_args(dropout_p, "reference"))


def test_opcheck_forward_triton(triton_cpu):
    torch.library.opcheck(lora_ops._forward_op, _op_args(0.2, "triton"))


def test_opcheck_forward_without_bias():
    torch.library.opcheck(lora_ops._forward_op, _op_args(0.0, "reference", bias=False))


@pytest.mark.parametrize("input_grad", [True, False])
def test_opcheck_backward(input_grad):
    dys = [torch.randn(9, 12), torch.randn(9, 5)]
    args = (dys, torch.randn(9, 16), [torch.randn(12, 16), torch.randn(5, 16)], torch.randn(9, 7),
            torch.randn(7, 16), [3, 7], 0.2, torch.tensor(5, dtype=torch.int64), input_grad, "reference")
    torch.library.opcheck(lora_ops._backward_op, args)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    x = torch.randn(2, 5, 16, requires_grad=True)
    weight, bias = torch.randn(12, 16), torch.randn(12)
    lora_a, lora_b = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    gate, up = torch.randn(6, 16), torch.randn(6, 16)
    gate_a, up_a = torch.randn(2, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    gate_b, up_b = torch.randn(6, 2, requires_grad=True), torch.randn(6, 3, requires_grad=True)

    def step(x_):
        y = padfree.lora_linear(torch.relu(x_), weight, bias, lora_a, lora_b, 2.0)
        g, u = lora_ops.lora_linear_shared(x_, [gate, up], [None, None], [gate_a, up_a], [gate_b, up_b],
                                           [1.0, 0.5])
        return y.sum() + (g * u).sum()

    leaves = [x, lora_a, lora_b, gate_a, up_a, gate_b, up_b]
    with padfree.use_backend("reference"):
        expected = step(x)
        expected_grads = torch.autograd.grad(expected, leaves)
        compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
        got = compiled(x)
        got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_compile_with_dropout_draws_a_fresh_mask_each_call():
    torch._dynamo.reset()
    x = torch.randn(8, 16)
    weight, lora_a, lora_b = torch.zeros(4, 16), torch.randn(2, 16), torch.randn(4, 2)
    compiled = torch.compile(lambda x_: padfree.lora_linear(x_, weight, None, lora_a, lora_b, 1.0, 0.5),
                             fullgraph=True, backend="aot_eager")
    with padfree.use_backend("reference"):
        first, second = compiled(x), compiled(x)
    assert not torch.equal(first, second)


def _good():
    return dict(x=torch.randn(3, 8), weight=torch.randn(5, 8), bias=torch.randn(5), lora_a=torch.randn(2, 8),
                lora_b=torch.randn(5, 2), scaling=1.0)


@pytest.mark.parametrize("change, error, match", [
    (dict(lora_b=torch.randn(5, 3)), ValueError, "rank mismatch"),
    (dict(weight=torch.randn(5, 9)), ValueError, "in_features"),
    (dict(lora_a=torch.randn(2, 9)), ValueError, "lora_a has in_features"),
    (dict(lora_b=torch.randn(6, 2)), ValueError, "out_features"),
    (dict(bias=torch.randn(6)), ValueError, "bias must have shape"),
    (dict(lora_a=torch.randn(2, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(lora_b=torch.randn(5, 2, dtype=torch.float16)), TypeError, "one dtype"),
    (dict(x=torch.randn(3, 8).numpy()), TypeError, "x must be a torch.Tensor"),
    (dict(lora_a=torch.randn(300, 8), lora_b=torch.randn(5, 300)), ValueError, "rank must be in"),
    (dict(scaling=float("nan")), TypeError, "scaling"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(weight=torch.randn(5)), ValueError, r"weight must have shape \(out_features, in_features\)"),
])
def test_bad_input_raises_naming_the_argument(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        padfree.lora_linear(**args)


def test_shared_bad_input_names_the_projection():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"rank mismatch: lora_a\[1\]"):
        lora_ops.lora_linear_shared(x, [torch.randn(4, 8)] * 2, [None, None], [torch.randn(2, 8)] * 2,
                                    [torch.randn(4, 2), torch.randn(4, 5)], [1.0, 1.0])
    with pytest.raises(ValueError, match="one entry per projection"):
        lora_ops.lora_linear_shared(x, [torch.randn(4, 8)] * 2, [None], [torch.randn(2, 8)] * 2,
                                    [torch.randn(4, 2)] * 2, [1.0, 1.0])
