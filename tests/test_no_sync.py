"""No op copies device data to the host in its forward or backward on the GPU code path.

A host sync (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `nonzero`, boolean-mask indexing,
`bincount`, ...) stalls the CPU until the GPU drains, breaks CUDA graph capture and forces a
graph break in `torch.compile`. On a GPU `torch.cuda.set_sync_debug_mode("error")` catches them
(the gpu-marked tests use it); on CPU this guard catches the same calls while the Triton kernels
run in the interpreter, with value checks off (PADFREE_CHECKS=0), as in training.

The guard is a TorchDispatchMode that fails on the aten ops that read tensor data on the host,
plus the two Python-level reads that bypass the dispatcher (`Tensor.tolist`, `Tensor.numpy`).
padfree's custom ops are re-entered with the guard on, so the code inside them is watched too.
An interpreted kernel launch stands in for an asynchronous GPU launch: the interpreter's own
reads of its arguments are not syncs, so the guard pauses inside it.
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import padfree
from padfree.ops import lora as lora_ops
from padfree.ops.lora_mixture import lora_mixture_linear
from padfree.ops import moe as moe_ops
from tests.conftest import INTERPRETING

aten = torch.ops.aten

# aten ops whose result depends on tensor data the host must read (on CUDA: a device sync)
SYNCING_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
               aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten._unique2.default,
               aten.unique_dim.default, aten.unique_consecutive.default, aten.nonzero_numpy.default}


class HostSyncError(AssertionError):
    pass


def _is_mask_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _syncs(func, args, kwargs) -> bool:
    if func in SYNCING_OPS:
        return True
    packet = func.overloadpacket
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return _is_mask_index(args[1])  # boolean-mask indexing runs nonzero to size its result
    return False


def _where() -> str:
    """The innermost padfree frames of the current stack, where the sync was asked for."""
    frames = [f for f in traceback.extract_stack() if "/padfree/" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.line}"
                       for f in reversed(frames[-3:])) or "test code"


class HostSyncGuard(TorchDispatchMode):
    """Raise HostSyncError on any device->host read inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.paused = 0
        self.custom_ops: set[str] = set()  # what ran, so a test can show it watched the right path
        self.launches = 0

    def fail(self, what: str):
        raise HostSyncError(f"host sync: {what} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and _syncs(func, args, kwargs):
            self.fail(str(func))
        if func.namespace not in ("aten", "prim", "prims"):
            self.custom_ops.add(f"{func.namespace}::{func._opname}")
            # a custom op's body: run its CPU kernel with the guard still on (autograd is above us)
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def no_host_sync():
    with pytest.MonkeyPatch.context() as monkeypatch, _guarded(monkeypatch) as guard:
        yield guard


@contextlib.contextmanager
def _guarded(monkeypatch):
    guard = HostSyncGuard()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def flagged(self, *args, _original=original, _name=name, **kwargs):
            if not guard.paused:
                guard.fail(f"Tensor.{_name}()")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, flagged)
    if INTERPRETING:
        from triton.runtime import interpreter

        launch = interpreter.GridExecutor.__call__

        def paused_launch(self, *args, **kwargs):
            guard.launches += 1
            with guard.pause():
                return launch(self, *args, **kwargs)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", paused_launch)
    with guard:
        yield guard


@torch.library.custom_op("padfree_test::reads_a_value", mutates_args=())
def _reads_a_value(x: torch.Tensor) -> torch.Tensor:
    return x * int(x.sum())


DELIBERATE_SYNCS = {
    "item": lambda t: t[0].item(),
    "int": lambda t: int(t[0]),
    "float": lambda t: float(t.sum()),
    "bool": lambda t: bool(t[0] > 0),
    "if_tensor": lambda t: 1 if (t > 0).any() else 0,
    "index_by_tensor": lambda t: [1, 2, 3][t[0].long().clamp(0, 2)],
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "nonzero": lambda t: t.nonzero(),
    "mask_index": lambda t: t[t > 0],
    "mask_assign": lambda t: t.clone().__setitem__(t > 0, 0.0),
    "bincount": lambda t: torch.bincount(t.long().abs()),
    "unique": lambda t: t.unique(),
    "equal": lambda t: torch.equal(t, t),
    "repeat_interleave": lambda t: torch.repeat_interleave(t.long().abs()),
    "inside_a_custom_op": lambda t: torch.ops.padfree_test.reads_a_value(t),
}


@pytest.mark.parametrize("name", list(DELIBERATE_SYNCS))
def test_guard_catches_a_deliberate_sync(name):
    values = torch.randn(8)
    with pytest.raises(HostSyncError, match="host sync"):
        with no_host_sync():
            DELIBERATE_SYNCS[name](values)


def asynchronous_work(values):
    out = torch.where(values > 0, values, 0.0).cumsum(0)[torch.tensor([1, 3, 3, 0, 2, 7, 6, 5])]
    out = out + torch.repeat_interleave(values[:4], torch.tensor([2] * 4), output_size=8)
    return torch.zeros(8).scatter_add_(0, torch.sort(out, stable=True).indices, out)


def test_guard_lets_asynchronous_work_through():
    values = torch.randn(8)
    with no_host_sync():
        got = asynchronous_work(values)
    assert torch.equal(got, asynchronous_work(values))


# ------------------------------------------------------------------------------------------- ops


def _packed(lengths, heads_q=4, heads_k=2, dim=16):
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, h, dim, requires_grad=True) for h in (heads_q, heads_k, heads_k))
    return q, k, v, cu, max(lengths)


ATTENTION_OPTIONS = {
    "plain": dict(),
    "causal_return_lse": dict(causal=True, return_lse=True),
    "window": dict(window_size=(3, 1)),
    "softcap_alibi": dict(softcap=2.0, alibi_slopes="heads"),
    "mha": dict(heads=(2, 2)),
    "dropout": dict(dropout_p=0.2),
}


def _attention(opts):
    opts = dict(opts)
    heads = opts.pop("heads", (4, 2))
    q, k, v, cu, max_len = _packed([7, 1, 18], *heads)
    if opts.get("alibi_slopes") == "heads":
        opts["alibi_slopes"] = torch.rand(heads[0])
    return (q, k, v), lambda: padfree.varlen_attention(q, k, v, cu, cu, max_len, max_len, **opts)


def _lora(dropout_p, shared):
    x = torch.randn(3, 5, 24, requires_grad=True)
    weights = [torch.randn(20, 24), torch.randn(12, 24)]
    biases = [torch.randn(20, requires_grad=True), None]
    lora_as = [torch.randn(4, 24, requires_grad=True), torch.randn(8, 24, requires_grad=True)]
    lora_bs = [torch.randn(20, 4, requires_grad=True), torch.randn(12, 8, requires_grad=True)]
    leaves = (x, lora_as[0], lora_bs[0])
    if shared:
        return leaves, lambda: lora_ops.lora_linear_shared(x, weights, biases, lora_as, lora_bs, [2.0, 0.5], dropout_p)
    return leaves, lambda: padfree.lora_linear(x, weights[0], biases[0], lora_as[0], lora_bs[0], 2.0, dropout_p)


def _route(scoring, n_group):
    logits = torch.randn(30, 8, requires_grad=True)
    bias = torch.randn(8) * 0.1 if scoring == "sigmoid" else None
    return (logits,), lambda: padfree.moe_route(logits, 2, scoring=scoring, correction_bias=bias, n_group=n_group,
                                                topk_group=1)


def _mixture(experts, rank):
    """A mixture of LoRA experts behind a router: gated single LoRA (E * r <= 256) or the
    many-experts pair kernels (E * r > 256, moe_align)."""
    logits = torch.randn(14, experts, requires_grad=True)
    x = torch.randn(14, 24, requires_grad=True)
    lora_a = torch.randn(experts, rank, 24, requires_grad=True)
    lora_b = torch.randn(experts, 20, rank, requires_grad=True)
    weight, bias = torch.randn(20, 24), torch.randn(20)

    def layer():
        weights, index = padfree.moe_route(logits, 2)
        return lora_mixture_linear(x, weight, bias, lora_a, lora_b, 2.0, index, weights, dropout_p=0.2)

    return (logits, x, lora_a, lora_b), layer


def _mixture_shared():
    """q/k/v-like mixtures reading one x, each behind its own router: one fused group."""
    x = torch.randn(14, 24, requires_grad=True)
    shapes = [(20, 4, 8), (12, 2, 4), (12, 3, 4)]  # (out_features, experts, rank)
    logits = [torch.randn(14, e, requires_grad=True) for _, e, _ in shapes]
    lora_as = [torch.randn(e, r, 24, requires_grad=True) for _, e, r in shapes]
    lora_bs = [torch.randn(e, n, r, requires_grad=True) for n, e, r in shapes]
    weights = [torch.randn(n, 24) for n, _, _ in shapes]

    def layer():
        routes = [padfree.moe_route(scores, 2) for scores in logits]
        return padfree.lora_mixture_linear_shared(x, weights, [None] * 3, lora_as, lora_bs, [2.0, 1.0, 0.5],
                                                  [index for _, index in routes], [w for w, _ in routes],
                                                  dropout_p=0.2)

    return (x, *logits, *lora_as, *lora_bs), layer


def _experts():
    logits = torch.randn(70, 6, requires_grad=True)
    x = torch.randn(70, 16, requires_grad=True)
    gate_up = (torch.randn(6, 48, 16) / 4).requires_grad_()
    down = (torch.randn(6, 16, 24) / 5).requires_grad_()

    def layer():
        weights, index = padfree.moe_route(logits, 2)
        return padfree.moe_experts(x, index, weights, gate_up, down)

    return (logits, x, gate_up, down), layer


OPS = {
    **{f"attention_{name}": (lambda opts=opts: _attention(opts)) for name, opts in ATTENTION_OPTIONS.items()},
    "lora": lambda: _lora(0.0, False),
    "lora_dropout": lambda: _lora(0.25, False),
    "lora_shared": lambda: _lora(0.0, True),
    "lora_shared_dropout": lambda: _lora(0.25, True),
    "route_softmax": lambda: _route("softmax", 1),
    "route_sigmoid_groups": lambda: _route("sigmoid", 2),
    "mixture_few_experts": lambda: _mixture(4, 8),
    "mixture_many_experts": lambda: _mixture(20, 16),
    "mixture_shared": _mixture_shared,
    "experts_native_align": _experts,
    "experts_pytorch_align": _experts,
}


def _backward(outputs, leaves):
    outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs]) if o.requires_grad]
    grads = [torch.ones_like(o) for o in outputs]
    return torch.autograd.grad(outputs, leaves, grads, allow_unused=True)


@pytest.mark.parametrize("name", list(OPS))
def test_forward_and_backward_of_every_op_never_sync(triton_cpu, monkeypatch, name):
    monkeypatch.setenv("PADFREE_CHECKS", "0")
    pytorch_align = []
    if name == "experts_pytorch_align":
        monkeypatch.setattr(moe_ops, "_has_native_align", lambda device: False)
        monkeypatch.setattr(padfree._backend, "warn_once", lambda key, message: None)
        align = moe_ops.reference.align
        monkeypatch.setattr(moe_ops.reference, "align", lambda *args: pytorch_align.append(1) or align(*args))
    leaves, call = OPS[name]()
    with no_host_sync() as guard:
        grads = _backward(call(), leaves)
    assert guard.launches > 0, "no Triton kernel ran"
    family = {"attention": "varlen_attention", "lora": "lora_linear", "route": "moe_route", "experts": "moe_experts",
              "mixture": "lora_mixture"}
    op = "lora_mixture_shared" if name == "mixture_shared" else family[name.split('_')[0]]
    assert {f"padfree::{op}_{part}" for part in ("fwd", "bwd")} <= guard.custom_ops
    if name in ("experts_native_align", "mixture_many_experts"):
        assert "padfree::moe_align" in guard.custom_ops
    assert pytorch_align == ([1] if name == "experts_pytorch_align" else [])
    assert grads[0] is not None and torch.isfinite(grads[0]).all()
