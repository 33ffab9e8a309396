"""padfree's ops under `torch.autocast` with fp32 parameters, as mixed-precision training runs them.

Each op runs in an autocast region on fp32 leaves (attention also gets the mixed q/k fp32, v low
precision that rotary embeddings and q/k norms produce), backward outside it. The output must be
in the autocast dtype and match a float64 oracle of the same op on the inputs rounded to that dtype
(tests/numerics.py's rule, against plain PyTorch run in that dtype); the gradients must reach the
fp32 parameters in fp32. A spy on the backend function proves padfree's implementation ran, on
inputs in the autocast dtype, with autocast off inside it (no second, inconsistent autocast).

The reference backend runs under bf16 and fp16 autocast; the Triton kernels (interpreted) under
fp16 autocast, since the interpreter's bf16 `tl.dot` is broken (triton#11584).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import padfree
from padfree.reference import attention as reference_attention
from padfree.reference import lora as reference_lora
from padfree.reference import moe as reference_moe
from tests.numerics import assert_close

CASES = [pytest.param("reference", torch.bfloat16, id="reference-bf16"),
         pytest.param("reference", torch.float16, id="reference-fp16"),
         pytest.param("triton", torch.float16, id="triton-fp16")]


@pytest.fixture
def backend(request):
    """Indirect parameter: run the test's ops on this backend (Triton: interpreted on CPU)."""
    if request.param == "triton":
        request.getfixturevalue("triton_cpu")
        yield "triton"
        return
    with padfree.use_backend(request.param):
        yield request.param


def _kernel_module(name: str):
    return importlib.import_module(f"padfree.kernels.{name}")


class Spy:
    """Wraps module.<function> for one test: records each call's float tensor dtypes and whether
    CPU autocast was enabled while it ran."""

    def __init__(self, monkeypatch, module, name):
        self.calls = []
        original = getattr(module, name)

        def spied(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            self.calls.append(({t.dtype for t in tensors if t.is_floating_point()},
                               torch.is_autocast_enabled("cpu")))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spied)

    def assert_ran_in(self, dtype, allowed=(torch.float32,)):
        """Ran at least once, with autocast off, on `dtype` inputs (plus `allowed` side inputs)."""
        assert self.calls, "padfree's implementation did not run"
        for dtypes, autocast_on in self.calls:
            assert not autocast_on, "autocast was still enabled inside padfree's op"
            assert dtype in dtypes and dtypes <= {dtype, *allowed}, f"inputs {dtypes}, expected {dtype}"


def spies(monkeypatch, backend, reference_module, reference_names, kernel_module, kernel_names):
    if backend == "triton":
        return [Spy(monkeypatch, _kernel_module(kernel_module), name) for name in kernel_names]
    return [Spy(monkeypatch, reference_module, name) for name in reference_names]


def autograd_run(fn, inputs, dout):
    """fn(*inputs) and the gradients of its float inputs for upstream `dout`, by autograd."""
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


def check_op(out, grads, formula, inputs, dout, dtype, dtype_of=None):
    """out and the fp32 grads of the op vs float64 autograd of `formula` on `inputs` rounded to
    `dtype` (input i rounded to `dtype_of[i]` when given); the tolerance baseline is `formula` run
    in that precision. grads[i] None: input i gets no gradient from the op (not compared)."""
    dtype_of = dtype_of or [dtype] * len(inputs)
    low = [t.detach().to(d) if t.is_floating_point() else t for t, d in zip(inputs, dtype_of)]
    oracle, oracle_grads = autograd_run(formula, [t.double() if t.is_floating_point() else t for t in low], dout)
    baseline, baseline_grads = autograd_run(formula, low, dout)
    assert out.dtype == dtype
    assert_close("out", out, oracle, baseline, factor=2)
    for index, (grad, want, base) in enumerate(zip(grads, oracle_grads, baseline_grads)):
        if grad is not None:
            assert grad.dtype == inputs[index].dtype
            assert_close(f"grad of input {index}", grad.to(base.dtype), want, base, factor=3)


@pytest.mark.parametrize("backend, dtype", CASES, indirect=["backend"])
def test_attention_under_autocast(backend, dtype, monkeypatch):
    watched = spies(monkeypatch, backend, reference_attention, ("attention", "attention_backward"),
                    "attention", ("forward", "backward"))
    lengths = [7, 1, 12]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    q = torch.randn(20, 4, 16, requires_grad=True)
    k = torch.randn(20, 2, 16, requires_grad=True)
    v = torch.randn(20, 2, 16).to(dtype).requires_grad_()  # what a projection gives under autocast
    with torch.autocast("cpu", dtype):
        out = padfree.varlen_attention(q, k, v, cu, cu, 12, 12, causal=True, softmax_scale=0.3)
    dout = torch.randn(out.shape)
    out.backward(dout.to(out.dtype))
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, dtype)
    for spy in watched:
        spy.assert_ran_in(dtype)

    def formula(q, k, v):
        return reference_attention.attention(q, k, v, cu, cu, 0.3, -1, 0, upcast=False)[0]

    check_op(out.detach(), [q.grad, k.grad, v.grad], formula, [q, k, v], dout, dtype)


@pytest.mark.parametrize("backend, dtype", CASES, indirect=["backend"])
def test_lora_linear_under_autocast(backend, dtype, monkeypatch):
    watched = spies(monkeypatch, backend, reference_lora, ("forward", "backward_input_and_a"),
                    "lora", ("forward", "backward_input_and_a"))
    x = torch.randn(2, 9, 32, requires_grad=True)
    weight = torch.randn(24, 32) / 32 ** 0.5
    bias = torch.randn(24) * 0.1
    lora_a = (torch.randn(4, 32) / 32 ** 0.5).requires_grad_()
    lora_b = (torch.randn(24, 4) / 2).requires_grad_()
    with torch.autocast("cpu", dtype):
        out = padfree.lora_linear(x, weight, bias, lora_a, lora_b, 2.0)
    dout = torch.randn(out.shape)
    out.backward(dout.to(out.dtype))
    assert {t.grad.dtype for t in (x, lora_a, lora_b)} == {torch.float32}
    for spy in watched:
        spy.assert_ran_in(dtype)

    def formula(x, weight, bias, lora_a, lora_b):
        return x @ weight.t() + bias + 2.0 * (x @ lora_a.t()) @ lora_b.t()

    check_op(out.detach(), [x.grad, None, None, lora_a.grad, lora_b.grad], formula, [x, weight, bias, lora_a, lora_b],
             dout, dtype)


@pytest.mark.parametrize("backend, dtype", CASES, indirect=["backend"])
def test_moe_under_autocast(backend, dtype, monkeypatch):
    """The router linear gives autocast-dtype logits; moe_route keeps its weights fp32 (it always
    computes them in fp32); moe_experts runs the experts in the autocast dtype."""
    route_spies = spies(monkeypatch, backend, reference_moe, ("route", "route_backward"),
                        "moe_route", ("forward", "backward"))
    expert_spies = spies(monkeypatch, backend, reference_moe, ("experts", "experts_backward"),
                         "moe", ("forward", "backward"))
    num_tokens, hidden, inter, num_experts = 13, 16, 8, 4
    x = torch.randn(num_tokens, hidden, requires_grad=True)
    router = (torch.randn(num_experts, hidden) / hidden ** 0.5).requires_grad_()
    gate_up = (torch.randn(num_experts, 2 * inter, hidden) / hidden ** 0.5).requires_grad_()
    down = (torch.randn(num_experts, hidden, inter) / inter ** 0.5).requires_grad_()
    with torch.autocast("cpu", dtype):
        logits = torch.nn.functional.linear(x, router)
        weights, index = padfree.moe_route(logits, 2)
        out = padfree.moe_experts(x, index, weights, gate_up, down)
    assert logits.dtype == dtype and weights.dtype == torch.float32 and out.dtype == dtype
    dout = torch.randn(out.shape)
    out.backward(dout.to(out.dtype))
    assert {t.grad.dtype for t in (x, router, gate_up, down)} == {torch.float32}
    for spy in route_spies:
        spy.assert_ran_in(dtype)
    for spy in expert_spies:
        spy.assert_ran_in(dtype)

    def formula(x, weights, gate_up, down):
        return reference_moe.experts(x, index, weights, gate_up, down)

    # The routing weights reach the experts in fp32, as the op got them; dx also flows through the
    # router, so only the expert weights' gradients are compared here.
    check_op(out.detach(), [None, None, gate_up.grad, down.grad], formula, [x, weights, gate_up, down], dout, dtype,
             dtype_of=[dtype, torch.float32, dtype, dtype])


def test_mixed_dtypes_outside_autocast_are_a_type_error():
    cu = torch.tensor([0, 5], dtype=torch.int32)
    q, k = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    v = torch.randn(5, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="one dtype"):
        padfree.varlen_attention(q, k, v, cu, cu, 5, 5)
    with pytest.raises(TypeError, match="one dtype"):
        padfree.lora_linear(torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(4, 8), None, torch.randn(2, 8),
                            torch.randn(4, 2), 1.0)
    index = torch.zeros(5, 1, dtype=torch.int64)
    with pytest.raises(TypeError, match="one dtype"):
        padfree.moe_experts(torch.randn(5, 8, dtype=torch.bfloat16), index, torch.ones(5, 1),
                            torch.randn(2, 6, 8), torch.randn(2, 8, 3))


def _tiny_llama():
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def _step(model, batch, autocast_dtype=None):
    """Loss, logits of the real tokens and every gradient of one step; backward outside autocast."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(**batch)
    out.loss.backward()
    logits = out.logits.detach()
    mask = batch.get("attention_mask")
    logits = logits[mask.bool()] if mask is not None else logits[0]
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return [out.loss.detach(), logits.float(), *grads.values()]


def test_llama_trains_under_bf16_autocast_like_sdpa(monkeypatch):
    """The failure this fixes: under bf16 autocast a transformers model's rotary embedding hands
    attention fp32 q/k and a bf16 v. A patched tiny Llama (fp32 weights, packed batch) must run
    forward + backward there and be as close to its fp32 result as sdpa under the same autocast
    (padded batch) is: within 2x sdpa's error + bf16's floor, for loss, logits and every gradient."""
    from tests.numerics import FLOOR, relative_error

    forward = Spy(monkeypatch, reference_attention, "attention")
    backward = Spy(monkeypatch, reference_attention, "attention_backward")
    sdpa = _tiny_llama()
    lengths = (6, 11, 3)
    sequences = [torch.randint(3, 128, (n,)) for n in lengths]
    padded_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded_ids)
    for row, ids in enumerate(sequences):
        padded_ids[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    padded = dict(input_ids=padded_ids, attention_mask=mask, labels=padded_ids.masked_fill(mask == 0, -100))
    labels = torch.cat([torch.cat([torch.tensor([-100]), ids[1:]]) for ids in sequences])
    packed = dict(input_ids=torch.cat(sequences)[None], labels=labels[None],
                  position_ids=torch.cat([torch.arange(n) for n in lengths])[None])

    exact = _step(sdpa, padded)
    sdpa_autocast = _step(sdpa, padded, torch.bfloat16)
    patched = sdpa
    with padfree.use_backend("reference"):
        padfree.patch(patched, lora=False, moe=False)
        padfree_autocast = _step(patched, packed, torch.bfloat16)
    forward.assert_ran_in(torch.bfloat16)
    backward.assert_ran_in(torch.bfloat16)
    assert len(forward.calls) == len(backward.calls) == 2  # both layers, forward and backward
    for index, (got, baseline, want) in enumerate(zip(padfree_autocast, sdpa_autocast, exact)):
        err, base_err = relative_error(got, want), relative_error(baseline, want)
        assert err <= 2 * base_err + FLOOR[torch.bfloat16], (
            f"item {index} (0: loss, 1: logits, then gradients): error {err:.2e} vs sdpa's {base_err:.2e}")


def test_backward_inside_the_autocast_region_gives_the_same_gradients():
    """The ops' backwards run with autocast off, so calling backward() inside the region (which
    some training loops do) changes nothing, bit for bit."""
    cu = torch.tensor([0, 6, 15], dtype=torch.int32)
    q, k, v = (torch.randn(15, heads, 16, requires_grad=True) for heads in (4, 2, 2))
    x = torch.randn(15, 32)
    weight, lora_a, lora_b = torch.randn(8, 32), torch.randn(4, 32, requires_grad=True), torch.randn(8, 4)
    lora_b.requires_grad_()
    leaves = (q, k, v, lora_a, lora_b)

    def grads(backward_inside):
        with torch.autocast("cpu", torch.bfloat16):
            out = padfree.varlen_attention(q, k, v, cu, cu, 9, 9, causal=True)
            y = padfree.lora_linear(x, weight, None, lora_a, lora_b, 2.0)
            loss = out.float().square().sum() + y.float().square().sum()
            if backward_inside:
                return torch.autograd.grad(loss, leaves)
        return torch.autograd.grad(loss, leaves)

    with padfree.use_backend("reference"):
        for inside, outside in zip(grads(True), grads(False)):
            assert torch.equal(inside, outside)


def test_compiles_under_autocast_without_graph_break(monkeypatch):
    """torch.compile(fullgraph=True) of the ops inside an autocast region: same gradients as eager.
    The ops never call torch.amp.is_autocast_available (made to fail here): Dynamo of torch 2.11
    cannot trace it, which broke the graph at every op on the H200 run."""

    def untraceable(device_type):
        raise AssertionError("torch.amp.is_autocast_available called per op call")

    importlib.import_module("padfree.ops.attention")  # which asks once, at import
    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, heads, 16, requires_grad=True) for heads in (4, 2, 2))
    sinks = torch.randn(4, requires_grad=True)
    lora_a, lora_b = torch.randn(4, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    weight = torch.randn(16, 16)
    leaves = (q, k, v, sinks, lora_a, lora_b)

    def step(q, k, v, sinks, lora_a, lora_b):
        with torch.autocast("cpu", torch.bfloat16):
            out = padfree.varlen_attention(q, k, v, cu, cu, 7, 7, causal=True, s_aux=sinks)
            y = padfree.lora_linear(out.reshape(12, -1)[:, :16], weight, None, lora_a, lora_b, 2.0)
        return y.float().square().sum()

    with padfree.use_backend("reference"):
        compiled = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves), leaves)
        eager = torch.autograd.grad(step(*leaves), leaves)
    for got, want in zip(compiled, eager):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
