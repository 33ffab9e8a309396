"""Attention sinks (`s_aux`, GPT-OSS) in padfree.varlen_attention, reference and interpreted Triton.

The oracle is the reference with the sink added to its softmax, run by autograd in float64: it
gives d s_aux independently of the op's formula from (out', lse') (`_add_sinks`), and d q/k/v
independently of the unchanged kernels' backward the Triton path relies on. Lengths include a
query with no key (sq > sk under causal) and a sequence of one token; tiles are 16 x 16 so the
lengths cross tile edges.
"""

from __future__ import annotations

import pytest
import torch

import padfree
from padfree.reference import attention as reference
from tests.numerics import assert_close

LENGTHS_Q = [17, 1, 9, 0, 6]
LENGTHS_K = [17, 1, 4, 2, 6]  # 9 queries on 4 keys: 5 rows with no key under causal


def packed(heads_q=4, heads_k=2, dim=16, value_dim=None, dtype=torch.float32, tail=2):
    cu_q = torch.tensor([0, *LENGTHS_Q]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *LENGTHS_K]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]) + tail, heads_q, dim).to(dtype)
    k = torch.randn(int(cu_k[-1]) + tail, heads_k, dim).to(dtype)
    v = torch.randn(int(cu_k[-1]) + tail, heads_k, value_dim or dim).to(dtype)
    return q, k, v, cu_q, cu_k


def check_against_float64(q, k, v, cu_q, cu_k, s_aux=None, scale=0.3, window=(-1, -1), softcap=0.0):
    """padfree.varlen_attention forward + backward (q, k, v and s_aux) vs float64 autograd through
    the reference, with the reference run in the inputs' dtype as the tolerance baseline."""
    max_q, max_k = max(LENGTHS_Q), max(LENGTHS_K)
    inputs = [t for t in (q, k, v, s_aux) if t is not None]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = padfree.varlen_attention(*leaves[:3], cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                        window_size=window, softcap=softcap, return_lse=True,
                                        s_aux=leaves[3] if s_aux is not None else None)
    dout = torch.randn(out.shape).to(out.dtype)
    out.backward(dout)

    def run_reference(tensors, upcast):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        sinks = tensors[3] if s_aux is not None else None
        want, want_lse = reference.attention(*tensors[:3], cu_q, cu_k, scale, window[0], window[1], softcap,
                                             upcast=upcast, s_aux=sinks)
        want.backward(dout.to(want.dtype))
        return want.detach(), want_lse, [t.grad for t in tensors]

    oracle, oracle_lse, oracle_grads = run_reference([t.double() for t in inputs], True)
    baseline, baseline_grads = (None, [None] * len(inputs))
    if q.dtype != torch.float32:
        baseline, _, baseline_grads = run_reference(inputs, False)
    assert out.shape == oracle.shape
    assert_close("out", out.detach(), oracle, baseline, factor=2)
    for name, leaf, want, base in zip(("dq", "dk", "dv", "d s_aux"), leaves, oracle_grads, baseline_grads):
        assert leaf.grad.dtype == leaf.dtype
        assert_close(name, leaf.grad, want, base, factor=3)
    finite = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isinf(lse), ~finite), "lse must be +inf exactly on rows with no key"
    assert (lse[finite].double() - oracle_lse[finite]).abs().max().item() < 1e-4
    return out, lse


CASES = {
    "gqa": dict(),
    "causal_window": dict(window=(3, 0)),
    "causal_softcap": dict(window=(-1, 0), softcap=2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sinks_against_float64(backend, case, dtype):
    q, k, v, cu_q, cu_k = packed(dtype=dtype)
    s_aux = torch.randn(4).to(dtype)  # transformers' flash integration hands s_aux over in q's dtype
    options = CASES[case]
    out, lse = check_against_float64(q, k, v, cu_q, cu_k, s_aux, **options)
    without = padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, softmax_scale=0.3,
                                       window_size=options.get("window", (-1, -1)),
                                       softcap=options.get("softcap", 0.0))
    assert (out.float() - without.float()).abs().max() > 1e-2, "the sinks changed nothing"


def test_fp32_sinks_with_half_attention(backend):
    """GPT-OSS keeps its sinks fp32 under autocast: accepted as they are, gradient in fp32."""
    q, k, v, cu_q, cu_k = packed(dtype=torch.float16)
    s_aux = torch.randn(4, requires_grad=True)
    out = padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, causal=True, s_aux=s_aux)
    out.float().sum().backward()
    assert out.dtype == torch.float16 and s_aux.grad.dtype == torch.float32
    half = s_aux.detach().half().requires_grad_()
    padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, causal=True, s_aux=half).float().sum().backward()
    torch.testing.assert_close(s_aux.grad, half.grad.float(), rtol=2e-3, atol=2e-3)


def test_very_negative_sinks_change_nothing_and_get_no_gradient(backend):
    q, k, v, cu_q, cu_k = packed()
    s_aux = torch.full((4,), -200.0, requires_grad=True)
    with_sinks = padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, causal=True, s_aux=s_aux)
    with_sinks.sum().backward()
    plain = padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, causal=True)
    torch.testing.assert_close(with_sinks, plain, rtol=1e-6, atol=1e-6)
    assert s_aux.grad.abs().max() == 0


def test_matches_gpt_oss_eager_attention():
    """Same numbers as transformers' GPT-OSS eager attention (its own definition of the sinks) on a
    causal batch of one sequence: scaling applies to q.k, not to the sinks."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    seq, heads_q, heads_k, dim = 11, 4, 2, 16
    q, k, v = torch.randn(1, heads_q, seq, dim), torch.randn(1, heads_k, seq, dim), torch.randn(1, heads_k, seq, dim)
    sinks = torch.randn(heads_q) * 2
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=heads_q // heads_k, training=False)
    causal_mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    want, _ = eager_attention_forward(module, q, k, v, causal_mask, scaling=0.2)
    cu = torch.tensor([0, seq], dtype=torch.int32)
    with padfree.use_backend("reference"):
        got = padfree.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                       seq, seq, softmax_scale=0.2, causal=True, s_aux=sinks)
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_sinks_rescale_the_output_and_lse(backend, dropout_p):
    """out' = out exp(lse - lse'), lse' = logaddexp(lse, s_aux) on rows with a key, with dropout too
    (the same generator state draws the same mask); rows with no key keep out = 0, lse = +inf."""
    q, k, v, cu_q, cu_k = packed()
    s_aux = torch.randn(4)

    def run(sinks):
        torch.manual_seed(5)
        return padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, dropout_p=dropout_p, causal=True,
                                        return_lse=True, s_aux=sinks)

    (plain, lse), (out, lse_sink) = run(None), run(s_aux)
    has_key = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(lse_sink), has_key)
    torch.testing.assert_close(lse_sink[has_key], torch.logaddexp(lse, s_aux[:, None])[has_key])
    factor = torch.where(has_key, torch.exp(lse - lse_sink), 0.0).t()[:, :, None]
    torch.testing.assert_close(out, plain * factor, rtol=1e-5, atol=1e-6)


def test_opcheck_with_sinks(backend):
    """The custom op's schema, fake impl and autograd registration with s_aux (torch.library)."""
    q, k, v, cu_q, cu_k = packed(heads_q=2, heads_k=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    s_aux = torch.randn(2, requires_grad=True)
    seed = torch.tensor(3, dtype=torch.int64)
    args = (q, k, v, cu_q, cu_k, 17, 17, 0.25, -1, 0, 0.0, None, 0.0, seed, backend, s_aux)
    torch.library.opcheck(torch.ops.padfree.varlen_attention_fwd, args)


def test_compiles_without_graph_break():
    q, k, v, cu_q, cu_k = packed()
    s_aux = torch.randn(4)
    leaves = [t.requires_grad_() for t in (q, k, v, s_aux)]

    def step(q, k, v, s_aux):
        return padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, causal=True, s_aux=s_aux).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(step(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("s_aux, error, match", [
    (torch.randn(2), ValueError, r"s_aux must have shape \(4,\)"),
    (torch.randn(4, 1), ValueError, "s_aux must have shape"),
    (torch.zeros(4, dtype=torch.int64), TypeError, "s_aux must have dtype"),
    ([0.0] * 4, TypeError, "s_aux must be a torch.Tensor"),
])
def test_bad_sinks(s_aux, error, match):
    q, k, v, cu_q, cu_k = packed()
    with pytest.raises(error, match=match):
        padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, s_aux=s_aux)
