"""lora_mixture_linear_shared: mixture-of-LoRA-experts projections reading one x (q/k/v, gate/up).

The oracle is padfree.reference.lora_mixture.forward (the loop over experts) run per projection by
autograd in float64, projection p with the mask of stream p of the seed the op draws
(`stream_seed`); the baseline for the low-precision tolerance is the same loops in the input dtype.
The fused Triton path shrinks x once for every projection's experts (counted below) and runs one
dx / dA for the group, so agreement tests the group's concatenated-rank identity too.
"""

import pytest
import torch

import padfree
from padfree import _backend
from padfree.kernels import lora as lora_kernels
from padfree.kernels import lora_mixture as mixture_kernels
from padfree.ops import lora_mixture as mixture_ops
from padfree.ops.lora_mixture import lora_mixture_linear, lora_mixture_linear_shared
from padfree.reference import lora as lora_reference
from padfree.reference import lora_mixture as reference
from tests.numerics import assert_close
from tests.ops.test_lora_mixture import SEGMENTED_KERNELS, Counter, LaunchCounter

SEED = 4321
IN_FEATURES = 24
# (out_features, experts, rank, top_k, bias) per projection: different in every field
QKV = [(20, 4, 3, 2, True), (8, 3, 5, 1, False), (12, 2, 4, 2, True)]
GATE_UP = [(20, 4, 2, 2, False), (14, 4, 3, 2, True)]
PROJECTION_KEYS = ("weight", "bias", "lora_a", "lora_b", "scaling", "top_k_index", "top_k_weights")


def _projection(m, k, n, experts, rank, top_k, bias, dtype, scaling):
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(m)]) if m else torch.zeros(0, top_k).long()
    return dict(weight=(torch.randn(n, k) / k**0.5).to(dtype),
                bias=(torch.randn(n) * 0.1).to(dtype).requires_grad_() if bias else None,
                lora_a=(torch.randn(experts, rank, k) / k**0.5).to(dtype).requires_grad_(),
                lora_b=(torch.randn(experts, n, rank) / rank**0.5).to(dtype).requires_grad_(),
                scaling=scaling, top_k_index=index, top_k_weights=torch.rand(m, top_k).softmax(-1).requires_grad_())


def _group(m, shapes, dtype, k=IN_FEATURES):
    x = torch.randn(m, k).to(dtype).requires_grad_()
    return x, [_projection(m, k, *shape, dtype, 1.5 - 0.5 * p) for p, shape in enumerate(shapes)]


def _leaves(x, projections):
    """(name, tensor) of every tensor that requires grad: x, each projection's bias, experts and gates."""
    leaves = [("x", x)] if x.requires_grad else []
    for p, proj in enumerate(projections):
        leaves += [(f"{name}[{p}]", proj[name]) for name in ("bias", "lora_a", "lora_b", "top_k_weights")
                   if proj[name] is not None and proj[name].requires_grad]
    return leaves


def _shared(x, projections, dropout_p, **kwargs):
    lists = [[proj[key] for proj in projections] for key in PROJECTION_KEYS]
    return lora_mixture_linear_shared(x, *lists, dropout_p, **kwargs)


def _loops(x, projections, dropout_p, seed):
    """The oracle: each projection's loop over experts with the mask of stream p."""
    return [reference.forward(x, *(proj[key] for key in PROJECTION_KEYS), dropout_p,
                              lora_reference.stream_seed(seed, p))[0]
            for p, proj in enumerate(projections)]


def _run(fn, x, projections, dys):
    outputs = fn(x, projections)
    leaves = _leaves(x, projections)
    loss = sum((y * dy).sum() for y, dy in zip(outputs, dys))
    grads = torch.autograd.grad(loss, [t for _, t in leaves])
    return [y.detach() for y in outputs], dict(zip([name for name, _ in leaves], grads))


def _as(dtype, x, projections):
    def convert(value, to):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        return value.detach().to(to).requires_grad_(value.requires_grad)
    # the routing weights stay fp32 (as a router's softmax), float64 in the oracle
    gates = torch.float64 if dtype == torch.float64 else torch.float32
    return convert(x, dtype), [{name: convert(value, gates if name == "top_k_weights" else dtype)
                                for name, value in proj.items()} for proj in projections]


def _drawn_seed(dropout_p):
    """The seed the op draws after torch.manual_seed(SEED) (as padfree.ops.attention._dropout_seed)."""
    torch.manual_seed(SEED)
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) if dropout_p > 0 else 0


def _check(x, projections, dropout_p, dys=None):
    """The op (active backend) against the float64 loops, the loops in the input dtype as the baseline."""
    dtype = x.dtype
    m = x.shape[0]
    dys = dys or [torch.randn(m, proj["weight"].shape[0]).to(dtype) for proj in projections]
    torch.manual_seed(SEED)
    out, grads = _run(lambda x_, ps: _shared(x_, ps, dropout_p), x, projections, dys)
    seed = _drawn_seed(dropout_p)
    x64, proj64 = _as(torch.float64, x, projections)
    oracle_out, oracle_grads = _run(lambda x_, ps: _loops(x_, ps, dropout_p, seed), x64, proj64,
                                    [dy.double() for dy in dys])
    base_out, base_grads = _run(lambda x_, ps: _loops(x_, ps, dropout_p, seed), x, projections, dys)
    assert len(out) == len(projections)
    for p, (y, oracle, base) in enumerate(zip(out, oracle_out, base_out)):
        assert y.dtype == dtype
        assert_close(f"y[{p}]", y, oracle, base, factor=2)
    assert set(grads) == set(oracle_grads) == {name for name, _ in _leaves(x, projections)}
    for name in grads:
        if name.startswith("top_k_weights"):
            assert grads[name].dtype == torch.float32
        # the routing weights' gradient is held to the rule of the input dtype (as in test_lora_mixture)
        assert_close(f"d{name}", grads[name].to(dtype), oracle_grads[name], base_grads[name].to(dtype), factor=3)
    return out, grads


@pytest.fixture
def launches(monkeypatch):
    """Launch counters on the fused-LoRA kernels and the many-experts ones, and call counters on the
    fused-LoRA launchers."""
    counters = {name: LaunchCounter(monkeypatch, lora_kernels, name)
                for name in ("lora_shrink_kernel", "lora_forward_kernel", "lora_dx_kernel", "lora_da_kernel")}
    counters |= {name: LaunchCounter(monkeypatch, mixture_kernels, name) for name in SEGMENTED_KERNELS}
    counters |= {name: Counter(monkeypatch, lora_kernels, name) for name in ("shrink", "backward_input_and_a")}
    return counters


def _counts(counters):
    return {name: c.count for name, c in counters.items() if c.count}


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget the one-time warnings already given in this process, so this test sees its own."""
    monkeypatch.setattr(_backend, "_warned", set())


# ----------------------------------------------------------------------------- fused group vs float64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_qkv_group_matches_float64_with_one_shrink(triton_cpu, launches, dtype):
    # 3 projections of different out sizes, expert counts, ranks and top_k; K = 24, 33 tokens
    x, projections = _group(33, QKV, dtype)
    _check(x, projections, 0.0)
    # x is shrunk once for the group; one expand per projection, one dx for the group
    assert _counts(launches) == {"shrink": 1, "lora_shrink_kernel": 1, "lora_forward_kernel": 3,
                                 "backward_input_and_a": 1, "lora_dx_kernel": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_gate_up_group_with_dropout_matches_float64(triton_cpu, launches, dtype):
    x, projections = _group(33, GATE_UP, dtype)
    _check(x, projections, 0.25)
    # with dropout the group's dA is one lora_da_kernel (each projection's rows with its own stream)
    assert _counts(launches) == {"shrink": 1, "lora_shrink_kernel": 1, "lora_forward_kernel": 2,
                                 "backward_input_and_a": 1, "lora_dx_kernel": 1, "lora_da_kernel": 1}


def test_kernels_qkv_group_with_dropout_matches_float64(triton_cpu, launches):
    x, projections = _group(20, QKV, torch.float32)
    _check(x, projections, 0.3)
    assert launches["lora_shrink_kernel"].count == 1 and launches["lora_dx_kernel"].count == 1


def test_kernels_frozen_input_skips_dx(triton_cpu, launches):
    x, projections = _group(20, GATE_UP, torch.float32)
    x.requires_grad_(False)
    _, grads = _check(x, projections, 0.2)
    assert "x" not in grads and launches["lora_dx_kernel"].count == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_reference_backend_matches_float64(dtype, dropout_p):
    x, projections = _group(21, QKV, dtype)
    with padfree.use_backend("reference"):
        _check(x, projections, dropout_p)


def test_leading_shape(triton_cpu):
    x, projections = _group(12, GATE_UP, torch.float32)
    flat = _shared(x, projections, 0.0)
    shaped = _shared(x.view(3, 4, IN_FEATURES), projections, 0.0)
    assert [y.shape for y in shaped] == [(3, 4, 20), (3, 4, 14)]
    for y, y_flat in zip(shaped, flat):
        torch.testing.assert_close(y.view(12, -1), y_flat, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_tokens(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    x, projections = _group(0, GATE_UP, torch.float32)
    with padfree.use_backend(backend):
        out, grads = _run(lambda x_, ps: _shared(x_, ps, 0.2), x, projections, [torch.randn(0, 20), torch.randn(0, 14)])
    assert [y.shape for y in out] == [(0, 20), (0, 14)] and grads["x"].shape == (0, IN_FEATURES)
    for p in range(2):
        assert grads[f"top_k_weights[{p}]"].shape == (0, 2)
        assert not grads[f"lora_a[{p}]"].any() and not grads[f"lora_b[{p}]"].any()


# ----------------------------------------------------------------------------- dropout masks
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_first_projection_draws_the_single_call_mask(request, backend):
    """Projection 0 of a group is lora_mixture_linear from the same generator state: same mask,
    same output and gradients (the later projections' masks are streams 1, 2 of that seed, which
    the float64 checks above compare)."""
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    x, projections = _group(20, GATE_UP, torch.float32)
    dys = [torch.randn(20, 20), torch.zeros(20, 14)]
    with padfree.use_backend(backend):
        torch.manual_seed(SEED)
        out, grads = _run(lambda x_, ps: _shared(x_, ps, 0.4), x, projections, dys)
        torch.manual_seed(SEED)
        single, single_grads = _run(lambda x_, ps: [lora_mixture_linear(x_, *(ps[0][k] for k in PROJECTION_KEYS),
                                                                        0.4)],
                                    x, projections[:1], dys[:1])
    torch.testing.assert_close(out[0], single[0], rtol=1e-6, atol=1e-6)
    for name, grad in single_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-6)


def test_stream_seed_gives_the_stream_mask():
    for seed in (0, 77, 2**31 - 2):
        for stream in (1, 2):
            assert torch.equal(lora_reference.keep_mask(lora_reference.stream_seed(seed, stream), 0, 5, 9, 0.5),
                               lora_reference.keep_mask(seed, stream, 5, 9, 0.5))


def test_projections_are_dropped_out_independently(triton_cpu):
    """Two projections with the same weights, experts and routing: equal without dropout, different
    with it (each draws its own mask)."""
    x, (proj,) = _group(16, GATE_UP[:1], torch.float32)
    same = [proj, dict(proj)]
    first, second = _shared(x, same, 0.0)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    first, second = _shared(x, same, 0.5)
    assert (first - second).abs().max() > 1e-3


# ----------------------------------------------------------------------------- groups the kernels do not fuse
@pytest.mark.parametrize("shapes, reason", [
    ([(20, 4, 2, 2, False), (16, 9, 32, 1, True)], r"projection\(s\) \[1\] have num_experts \* rank > 256"),
    ([(8, 2, 2, 1, False), (6, 3, 2, 2, True), (10, 2, 3, 2, False), (4, 2, 2, 1, True)],
     "the kernels fuse at most 3 projections, got 4"),
])
def test_unfused_group_runs_each_projection_and_warns(triton_cpu, launches, fresh_warnings, shapes, reason):
    x, projections = _group(10, shapes, torch.float32)
    with pytest.warns(_backend.PadfreeFallbackWarning, match=reason + ".*each projection runs as its own"):
        _check(x, projections, 0.25)
    few = [p for p, (_, e, r, _, _) in enumerate(shapes) if e * r <= 256]
    assert launches["lora_shrink_kernel"].count == len(few)
    assert launches["lora_mixture_shrink_kernel"].count == len(shapes) - len(few)


def test_one_projection_does_not_warn(triton_cpu, fresh_warnings, recwarn):
    x, projections = _group(10, [(16, 20, 16, 2, True)], torch.float32)
    _shared(x, projections, 0.0)
    assert not [w for w in recwarn if issubclass(w.category, _backend.PadfreeFallbackWarning)]


# ----------------------------------------------------------------------------- autocast, custom op machinery
def test_autocast_with_fp32_parameters(triton_cpu):
    x, projections = _group(10, GATE_UP, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        outputs = _shared(x, projections, 0.0)
    assert all(y.dtype == torch.float16 for y in outputs)
    sum(y.float().sum() for y in outputs).backward()
    rounded_x, rounded = _as(torch.float16, x, projections)
    for y, expected in zip(outputs, _shared(rounded_x, rounded, 0.0)):
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    for name, leaf in _leaves(x, projections):
        assert leaf.grad.dtype == torch.float32, name


def _op_args(dropout_p, backend):
    x, projections = _group(9, GATE_UP, torch.float32)
    biases = [p["bias"] for p in projections if p["bias"] is not None]
    lists = {key: [p[key] for p in projections] for key in PROJECTION_KEYS}
    return (x, lists["weight"], biases, [b is not None for b in lists["bias"]], lists["lora_a"], lists["lora_b"],
            lists["scaling"], lists["top_k_index"], lists["top_k_weights"], dropout_p,
            torch.tensor(77, dtype=torch.int64), backend)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_forward(dropout_p):
    torch.library.opcheck(mixture_ops._shared_forward_op, _op_args(dropout_p, "reference"))


def test_opcheck_forward_triton(triton_cpu):
    torch.library.opcheck(mixture_ops._shared_forward_op, _op_args(0.2, "triton"))


@pytest.mark.parametrize("input_grad", [True, False])
def test_opcheck_backward(input_grad):
    x, weights, _, _, lora_as, lora_bs, scalings, indices, gates, dropout_p, seed, backend = _op_args(0.2, "reference")
    dys = [torch.randn(9, w.shape[0]) for w in weights]
    h = torch.randn(9, sum(a.shape[0] * a.shape[1] for a in lora_as))
    torch.library.opcheck(mixture_ops._shared_backward_op,
                          (dys, x.detach(), weights, h, [a.detach() for a in lora_as], [b.detach() for b in lora_bs],
                           scalings, indices, [g.detach() for g in gates], dropout_p, seed, input_grad, backend))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, projections = _group(9, QKV, torch.float32)
    leaves = [t for _, t in _leaves(x, projections)]

    def step(x_):
        return sum(y.square().sum() for y in _shared(x_, projections, 0.0, check=False))

    with padfree.use_backend("reference"):
        expected = torch.autograd.grad(step(x), leaves)
        got = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(x), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------- bad input
def _good():
    x = torch.randn(3, 8)
    return dict(x=x, weights=[torch.randn(5, 8), torch.randn(4, 8)], biases=[None, torch.randn(4)],
                lora_as=[torch.randn(4, 2, 8), torch.randn(3, 2, 8)],
                lora_bs=[torch.randn(4, 5, 2), torch.randn(3, 4, 2)], scalings=[1.0, 2.0],
                top_k_indices=[torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.tensor([[2], [0], [1]])],
                top_k_weights=[torch.rand(3, 2), torch.rand(3, 1)])


@pytest.mark.parametrize("change, error, match", [
    (dict(weights=torch.randn(5, 8)), TypeError, "weights must be a list or tuple"),
    (dict(weights=[]), ValueError, "weights must name at least one projection"),
    (dict(scalings=[1.0]), ValueError, "must have one entry per projection, got weights 2, .* scalings 1"),
    (dict(top_k_indices=[torch.tensor([[0, 1], [2, 3], [1, 0]])]), ValueError, "top_k_indices 1"),
    (dict(lora_as=[torch.randn(4, 2, 8), torch.randn(3, 2, 9)]), ValueError, r"lora_as\[1\] must have shape"),
    (dict(lora_bs=[torch.randn(4, 5, 2), torch.randn(3, 5, 2)]), ValueError,
     r"lora_bs\[1\] must have shape .* \(3, 4, 2\)"),
    (dict(biases=[None, torch.randn(5)]), ValueError, r"biases\[1\] must have shape \(4,\)"),
    (dict(top_k_indices=[torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.tensor([[2], [3], [1]])]), ValueError,
     r"top_k_indices\[1\] holds expert 3, outside 0..2"),
    (dict(top_k_weights=[torch.rand(3, 2), torch.rand(3, 2)]), ValueError,
     r"top_k_weights\[1\] must have the shape of top_k_indices\[1\]"),
    (dict(weights=[torch.randn(5, 8), torch.randn(4, 7)]), ValueError, r"weights\[1\] has in_features 7"),
    (dict(lora_bs=[torch.randn(4, 5, 2), torch.randn(3, 4, 2).half()]), TypeError, r"lora_bs\[1\]"),
    (dict(scalings=[1.0, float("nan")]), TypeError, r"scalings\[1\] must be a finite float"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_raises_naming_the_argument(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        lora_mixture_linear_shared(**args)


def test_bad_dropout_raises():
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        lora_mixture_linear_shared(**_good(), dropout_p=1.0)

