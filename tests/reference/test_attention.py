"""The attention reference is the oracle of every kernel test, so it is checked independently:
against torch SDPA with an explicit mask on each sequence, and its hand-derived backward against
autograd through its own forward."""

import pytest
import torch
import torch.nn.functional as F

from padfree.reference import attention as reference

OPTIONS = [
    dict(),
    dict(window_right=0),
    dict(window_left=3, window_right=1),
    dict(window_left=2),
    dict(softcap=2.0),
    dict(alibi=True),
    dict(dropout_p=0.25, seed=11),
]


def packed(lengths_q, lengths_k, heads_q=4, heads_k=2, dim=16, tail=2):
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]) + tail, heads_q, dim, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]) + tail, heads_k, dim, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]) + tail, heads_k, dim, dtype=torch.float64)
    return q, k, v, cu_q, cu_k


def options_for(opts, heads):
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(heads, dtype=torch.float64)
    return opts


@pytest.mark.parametrize("opts", [o for o in OPTIONS if "dropout_p" not in o and "softcap" not in o])
def test_matches_sdpa_with_explicit_mask(opts):
    lengths_q, lengths_k = [5, 1, 9, 0], [7, 3, 9, 2]
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k)
    opts = options_for(opts, q.shape[1])
    out, lse = reference.attention(q, k, v, cu_q, cu_k, 0.3, **opts)
    for b, (sq, sk) in enumerate(zip(lengths_q, lengths_k)):
        rows_q = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rows_k = slice(int(cu_k[b]), int(cu_k[b + 1]))
        allowed = reference.allowed_mask(sq, sk, opts.get("window_left", -1), opts.get("window_right", -1), q.device)
        bias = torch.zeros(q.shape[1], sq, sk, dtype=q.dtype)
        if "alibi_slopes" in opts:
            bias = reference.alibi_bias(opts["alibi_slopes"], sq, sk)
        bias = bias.masked_fill(~allowed, float("-inf"))
        qb, kb, vb = (t.transpose(0, 1) for t in (q[rows_q], k[rows_k], v[rows_k]))
        want = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=0.3, enable_gqa=True)
        has_key = allowed.any(-1)
        want = torch.where(has_key[None, :, None], want, 0.0).transpose(0, 1)
        torch.testing.assert_close(out[rows_q], want, rtol=1e-12, atol=1e-12)
        assert torch.isinf(lse[:, rows_q][:, ~has_key]).all()
    assert (out[int(cu_q[-1]):] == 0).all() and torch.isinf(lse[:, int(cu_q[-1]):]).all()


def test_causal_is_bottom_right_aligned():
    allowed = reference.allowed_mask(2, 4, -1, 0, torch.device("cpu"))
    assert allowed.tolist() == [[True, True, True, False], [True, True, True, True]]
    no_key = reference.allowed_mask(4, 2, -1, 0, torch.device("cpu"))
    assert no_key.tolist() == [[False, False], [False, False], [True, False], [True, True]]


@pytest.mark.parametrize("opts", OPTIONS)
def test_hand_derived_backward_matches_autograd(opts):
    q, k, v, cu_q, cu_k = packed([6, 0, 3, 8], [6, 2, 5, 4])
    opts = options_for(opts, q.shape[1])
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = reference.attention(*inputs, cu_q, cu_k, 0.4, **opts)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, inputs, dout)
    got = reference.attention_backward(dout, q, k, v, cu_q, cu_k, 0.4, **opts)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"d{name}")
        assert torch.isfinite(g).all()


def test_dropout_mask_is_reproducible_and_scaled():
    q, k, v, cu_q, cu_k = packed([40], [40], tail=0)
    first, _ = reference.attention(q, k, v, cu_q, cu_k, 0.3, dropout_p=0.5, seed=3)
    again, _ = reference.attention(q, k, v, cu_q, cu_k, 0.3, dropout_p=0.5, seed=3)
    other, _ = reference.attention(q, k, v, cu_q, cu_k, 0.3, dropout_p=0.5, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    keep = reference.dropout_keep(3, 0, 4, 40, 40, 0.5, q.device)
    assert 0.4 < keep.float().mean().item() < 0.6
