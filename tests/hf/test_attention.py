"""`padfree.hf.attention.attention_forward` on its own: every way it finds sequence boundaries, and
every per-layer option, against a float64 attention with an explicit mask in transformers'
semantics (sliding window W: query i sees keys i - W < j <= i)."""

from __future__ import annotations

import inspect

import pytest
import torch

from padfree.hf.attention import attention_forward

HEADS, KV_HEADS, DIM = 4, 2, 16


class Layer(torch.nn.Module):
    """What the adapter reads from a transformers attention module."""

    def __init__(self, is_causal=True, sliding_window=None):
        super().__init__()
        self.is_causal = is_causal
        if sliding_window is not None:
            self.sliding_window = sliding_window


def qkv(batch, q_len, kv_len=None):
    kv_len = q_len if kv_len is None else kv_len
    return (torch.randn(batch, HEADS, q_len, DIM), torch.randn(batch, KV_HEADS, kv_len, DIM),
            torch.randn(batch, KV_HEADS, kv_len, DIM))


def allowed(q_len, kv_len, causal=True, window=None):
    """(q_len, kv_len) bool in transformers' semantics, queries aligned to the last keys."""
    i = torch.arange(q_len)[:, None] + kv_len - q_len
    j = torch.arange(kv_len)[None, :]
    ok = j <= i if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
    if window is not None:
        ok = ok & (j > i - window) if causal else ok & ((j - i).abs() < window)
    return ok


def oracle(q, k, v, ok, scale=DIM ** -0.5, softcap=None):
    """One sequence: q (Hq, S, D), k/v (Hkv, Skv, D) -> (S, Hq, D) in float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = q @ k.transpose(1, 2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v).transpose(0, 1)


def packed_oracle(q, k, v, lengths, **options):
    """B == 1 row holding sequences of `lengths`: attention inside each one."""
    outs, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        outs.append(oracle(q[0, :, part], k[0, :, part], v[0, :, part], allowed(n, n, **{
            key: options[key] for key in ("causal", "window") if key in options}),
            **{key: options[key] for key in ("scale", "softcap") if key in options}))
        start += n
    return torch.cat(outs)[None]


def check(out, ref):
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


LENGTHS = [5, 1, 17, 3]


def cu_seqlens(lengths):
    return torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_flash_kwargs(backend):
    q, k, v = qkv(1, sum(LENGTHS))
    cu = cu_seqlens(LENGTHS)
    out, weights = attention_forward(Layer(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                     max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    assert weights is None and out.shape == (1, sum(LENGTHS), HEADS, DIM)
    check(out, packed_oracle(q, k, v, LENGTHS))


def test_packed_position_ids(backend):
    q, k, v = qkv(1, sum(LENGTHS))
    out, _ = attention_forward(Layer(), q, k, v, None, position_ids=positions(LENGTHS))
    check(out, packed_oracle(q, k, v, LENGTHS))


def test_position_ids_of_several_packed_rows():
    rows = [[5, 4], [2, 7]]
    q, k, v = qkv(2, 9)
    position_ids = torch.cat([positions(r) for r in rows])
    out, _ = attention_forward(Layer(), q, k, v, None, position_ids=position_ids)
    expected = torch.cat([packed_oracle(q[b:b + 1], k[b:b + 1], v[b:b + 1], r) for b, r in enumerate(rows)])
    check(out, expected)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask(backend, side):
    lengths, longest = [6, 2, 9], 9
    q, k, v = qkv(3, longest)
    mask = torch.zeros(3, longest, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    if side == "left":
        mask = mask.flip(1)
    out, _ = attention_forward(Layer(), q, k, v, mask)
    for row, n in enumerate(lengths):
        keep = mask[row]
        expected = oracle(q[row, :, keep], k[row, :, keep], v[row, :, keep], allowed(n, n))
        check(out[row, keep], expected)
        assert (out[row, ~keep] == 0).all()


def test_plain_batch_each_row_one_sequence(backend):
    q, k, v = qkv(2, 7)
    out, _ = attention_forward(Layer(), q, k, v, None)
    check(out, torch.stack([oracle(q[b], k[b], v[b], allowed(7, 7)) for b in range(2)]))


def test_decoding_with_a_cache_sees_the_whole_cache():
    """Fewer queries than keys (a KV cache): causal aligned to the last keys, as transformers' masks."""
    q, k, v = qkv(2, 3, kv_len=8)
    out, _ = attention_forward(Layer(), q, k, v, None, position_ids=torch.arange(5, 8)[None])
    check(out, torch.stack([oracle(q[b], k[b], v[b], allowed(3, 8)) for b in range(2)]))


@pytest.mark.parametrize("where", ["argument", "module"])
def test_sliding_window_matches_transformers_semantics(backend, where):
    window = 4
    q, k, v = qkv(1, sum(LENGTHS))
    layer = Layer(sliding_window=window if where == "module" else None)
    argument = {"sliding_window": window} if where == "argument" else {}  # "module": the layer passes nothing
    out, _ = attention_forward(layer, q, k, v, None, **argument, position_ids=positions(LENGTHS))
    check(out, packed_oracle(q, k, v, LENGTHS, window=window))


def test_sliding_window_passed_none_is_full_attention_even_if_the_module_has_one():
    """Exaone4 / Kolibri1 full-attention layers pass sliding_window=None while carrying a window."""
    q, k, v = qkv(1, sum(LENGTHS))
    out, _ = attention_forward(Layer(sliding_window=4), q, k, v, None, sliding_window=None,
                               position_ids=positions(LENGTHS))
    check(out, packed_oracle(q, k, v, LENGTHS))


def test_sliding_window_argument_wins_over_the_module():
    q, k, v = qkv(1, 12)
    out, _ = attention_forward(Layer(sliding_window=8), q, k, v, None, sliding_window=3)
    check(out, packed_oracle(q, k, v, [12], window=3))


def test_softcap_and_scaling(backend):
    q, k, v = qkv(1, sum(LENGTHS))
    out, _ = attention_forward(Layer(), q, k, v, None, scaling=0.7, softcap=1.5, position_ids=positions(LENGTHS))
    check(out, packed_oracle(q, k, v, LENGTHS, scale=0.7, softcap=1.5))


def test_bidirectional_module_and_is_causal_keyword():
    q, k, v = qkv(1, sum(LENGTHS))
    out, _ = attention_forward(Layer(is_causal=False), q, k, v, None, position_ids=positions(LENGTHS))
    check(out, packed_oracle(q, k, v, LENGTHS, causal=False))
    out, _ = attention_forward(Layer(is_causal=True), q, k, v, None, is_causal=False, position_ids=positions(LENGTHS))
    check(out, packed_oracle(q, k, v, LENGTHS, causal=False))


def test_dropout_only_while_training():
    q, k, v = qkv(1, 16)
    layer = Layer()
    evaluated, _ = attention_forward(layer.eval(), q, k, v, None, dropout=0.5)
    check(evaluated, packed_oracle(q, k, v, [16]))
    trained, _ = attention_forward(layer.train(), q, k, v, None, dropout=0.5)
    assert not torch.allclose(trained, evaluated)


def test_gradients_flow_to_query_key_value(backend):
    q, k, v = (t.requires_grad_() for t in qkv(1, sum(LENGTHS)))
    out, _ = attention_forward(Layer(), q, k, v, None, position_ids=positions(LENGTHS))
    out.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    packed_oracle(*leaves, LENGTHS).square().sum().backward()
    for got, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    q, k, v = qkv(1, 6)
    with pytest.raises(ValueError, match="2D padding mask"):
        attention_forward(Layer(), q, k, v, torch.zeros(1, 1, 6, 6))
    with pytest.raises(ValueError, match="sliding_window"):
        attention_forward(Layer(), q, k, v, None, sliding_window=0)
    with pytest.raises(TypeError, match="max_length_q"):
        attention_forward(Layer(), q, k, v, None, cu_seq_lens_q=cu_seqlens([6]), max_length_q="6")


def test_kwargs_boundaries_are_value_checked_once_per_batch(monkeypatch):
    from padfree import _checks
    from padfree.hf import attention as adapter

    calls = []
    original = _checks.check_cu_seqlens

    def counting(name, *args, values=True, **kwargs):
        calls.append(values)
        return original(name, *args, values=values, **kwargs)

    monkeypatch.setattr(_checks, "check_cu_seqlens", counting)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    query = torch.randn(1, 4, 8, 16)
    key = value = torch.randn(1, 2, 8, 16)
    module = torch.nn.Module()
    module.is_causal = True
    for _ in range(3):  # three layers of one forward
        adapter.attention_forward(module, query, key, value, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                  max_length_q=5, max_length_k=5)
    assert calls == [True, True] + [False, False] * 2
    bad = torch.tensor([0, 9, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        adapter.attention_forward(module, query, key, value, None, cu_seq_lens_q=bad, cu_seq_lens_k=bad,
                                  max_length_q=9, max_length_k=9)


def _varlen_attention_takes(name: str) -> bool:
    from padfree.ops.attention import varlen_attention

    return name in inspect.signature(varlen_attention).parameters


needs_sinks = pytest.mark.skipif(not _varlen_attention_takes("s_aux"),
                                 reason="padfree.varlen_attention has no s_aux yet (the ops change)")


@needs_sinks
def test_attention_sinks_are_forwarded(backend):
    """GPT-OSS: a per-head sink logit joins every row's softmax and takes probability, no value."""
    q, k, v = qkv(1, sum(LENGTHS))
    sinks = torch.randn(HEADS)
    out, _ = attention_forward(Layer(), q, k, v, None, s_aux=sinks, position_ids=positions(LENGTHS))
    expected, start = [], 0
    for n in LENGTHS:
        part = slice(start, start + n)
        qs, ks, vs = q[0, :, part].double(), k[0, :, part].double(), v[0, :, part].double()
        ks, vs = ks.repeat_interleave(HEADS // KV_HEADS, 0), vs.repeat_interleave(HEADS // KV_HEADS, 0)
        scores = (qs @ ks.transpose(1, 2) * DIM ** -0.5).masked_fill(~allowed(n, n), float("-inf"))
        sink = sinks.double()[:, None, None].expand(HEADS, n, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        expected.append((probs @ vs).transpose(0, 1))
        start += n
    check(out, torch.cat(expected)[None])


@needs_sinks
def test_value_head_dim_unlike_the_query_is_forwarded(backend):
    """Multi-head latent attention: values of head dim 8 with queries/keys of 16."""
    q, k, v = qkv(1, sum(LENGTHS))
    v = v[..., :8].contiguous()
    out, _ = attention_forward(Layer(), q, k, v, None, position_ids=positions(LENGTHS))
    assert out.shape == (1, sum(LENGTHS), HEADS, 8)
    check(out, packed_oracle(q, k, v, LENGTHS))


def test_position_boundaries_are_computed_once_per_batch(monkeypatch):
    """Every layer gets the same position_ids tensor: cu_seqlens is derived from it once, and again
    only when it changes in place."""
    from padfree.ops import seqlens

    calls = []
    original = seqlens.cu_seqlens_from_position_ids
    monkeypatch.setattr(seqlens, "cu_seqlens_from_position_ids", lambda p: calls.append(1) or original(p))
    q, k, v = qkv(1, sum(LENGTHS))
    position_ids = positions(LENGTHS)
    for _ in range(3):  # three layers of one forward
        out, _ = attention_forward(Layer(), q, k, v, None, position_ids=position_ids)
        check(out, packed_oracle(q, k, v, LENGTHS))
    assert len(calls) == 1
    position_ids.copy_(positions([sum(LENGTHS)]))  # the next batch reuses the buffer: one sequence
    out, _ = attention_forward(Layer(), q, k, v, None, position_ids=position_ids)
    assert len(calls) == 2
    check(out, packed_oracle(q, k, v, [sum(LENGTHS)]))


def test_mask_boundaries_are_computed_once_per_batch(monkeypatch):
    """The padding mask's nonzero and host-side maxima run once per forward, not once per layer."""
    from padfree.hf import attention as adapter

    calls = []
    original = adapter._mask_boundaries
    monkeypatch.setattr(adapter, "_mask_boundaries", lambda *a: calls.append(1) or original(*a))
    lengths = [6, 2, 9]
    q, k, v = qkv(3, 9)
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    for _ in range(3):
        out, _ = attention_forward(Layer(), q, k, v, mask)
    assert len(calls) == 1
    for row, n in enumerate(lengths):
        check(out[row, :n], oracle(q[row, :, :n], k[row, :, :n], v[row, :, :n], allowed(n, n)))
    attention_forward(Layer(), q, k, v, mask.clone())  # a new batch: a new tensor
    assert len(calls) == 2
