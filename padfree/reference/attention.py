"""Plain-PyTorch varlen attention: the CPU implementation and the test oracle.

For every sequence b (queries cu_seqlens_q[b]:cu_seqlens_q[b+1], keys likewise in cu_seqlens_k),
query i and key j (positions inside the sequence, lengths sq and sk):

    s_ij = scale * q_i . k_j
    s_ij = softcap * tanh(s_ij / softcap)                     if softcap > 0
    s_ij = s_ij - slope_h * |i + sk - sq - j|                  if alibi_slopes is given
    allowed(i, j) = (left < 0 or j >= i + sk - sq - left) and (right < 0 or j <= i + sk - sq + right)
    p_ij = exp(s_ij - lse_i) over allowed j, lse_i = log sum_j exp(s_ij)   (lse_i = +inf if none)
    out_i = sum_j dropout(p_ij) v_j,   dropout(p) = p * keep / (1 - dropout_p)

Attention sinks (GPT-OSS `s_aux`, one logit per query head h): the softmax of every row gets one
more logit s_aux[h], neither scaled nor softcapped, whose value vector is zero:
    lse_i = log(sum_j exp(s_ij) + exp(s_aux[h]))   over allowed j, for a row with at least one key
A row with no allowed key still gets out = 0 and lse = +inf. v may have its own head dim Dv
(MLA); out then has Dv.

Causal attention is the window (left=-1, right=0): bottom-right aligned as in flash-attn 2.1+.
A query with no allowed key gets out_i = 0; tokens past cu_seqlens_q[-1] get out = 0.
GQA: query head h reads key/value head h // (Hq // Hkv).
"""

from __future__ import annotations

import torch


def allowed_mask(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int,
                 device: torch.device) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k): which keys each query may attend to (bottom-right aligned)."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = i + seqlen_k - seqlen_q
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        allowed &= j >= diagonal - window_left
    if window_right >= 0:
        allowed &= j <= diagonal + window_right
    return allowed


def alibi_bias(slopes: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """(H, seqlen_q, seqlen_k) bias -slope_h * |i + sk - sq - j| (flash-attn's ALiBi)."""
    i = torch.arange(seqlen_q, device=slopes.device)[:, None]
    j = torch.arange(seqlen_k, device=slopes.device)[None, :]
    distance = (i + seqlen_k - seqlen_q - j).abs().to(slopes.dtype)
    return -slopes[:, None, None] * distance


def dropout_keep(seed: int, batch_index: int, num_heads: int, seqlen_q: int, seqlen_k: int,
                 dropout_p: float, device: torch.device) -> torch.Tensor:
    """Keep-mask of the reference backend for one sequence, regenerated from `seed` in backward.

    The Triton kernels draw their mask from Philox in-kernel; the two streams differ (tests feed
    the kernel's mask, from `padfree.kernels.attention.dropout_keep_mask`, to `attention` below).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed) * 1000003 + batch_index)
    keep = torch.rand(num_heads, seqlen_q, seqlen_k, generator=generator) >= dropout_p
    return keep.to(device)


def _sequence_scores(q_b, k_b, softmax_scale, window_left, window_right, softcap, slopes):
    """Scores (H, sq, sk) with -inf where not allowed, the allowed mask, and tanh(raw/softcap)."""
    seqlen_q, seqlen_k = q_b.shape[1], k_b.shape[1]
    scores = torch.matmul(q_b, k_b.transpose(1, 2)) * softmax_scale
    capped = None
    if softcap > 0:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    if slopes is not None:
        scores = scores + alibi_bias(slopes.to(scores.dtype), seqlen_q, seqlen_k)
    allowed = allowed_mask(seqlen_q, seqlen_k, window_left, window_right, q_b.device)
    return scores.masked_fill(~allowed, float("-inf")), allowed, capped


def _probabilities(scores, allowed, sinks=None):
    """Softmax over allowed keys (and the sink logit of each head, (H,), when given) and its
    log-normaliser; rows with no key get p = 0."""
    has_key = allowed.any(dim=-1)
    # Rows with no allowed key get finite scores for the logsumexp (their probabilities are zeroed
    # below): an all -inf row would back-propagate 0 * NaN.
    lse = torch.logsumexp(scores.masked_fill(~has_key[None, :, None], 0.0), dim=-1)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks[:, None])
    probs = torch.exp(scores - lse[..., None]).masked_fill(~allowed, 0.0)
    return probs, lse, has_key


def _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, compute):
    """Yield (b, q_b, k_b, v_b, slice_q, slice_k): heads-first views, k/v repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    offsets_q = cu_seqlens_q.tolist()
    offsets_k = cu_seqlens_k.tolist()
    for b in range(len(offsets_q) - 1):
        rows_q = slice(offsets_q[b], offsets_q[b + 1])
        rows_k = slice(offsets_k[b], offsets_k[b + 1])
        q_b = q[rows_q].to(compute).transpose(0, 1)
        k_b = k[rows_k].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        v_b = v[rows_k].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        yield b, q_b, k_b, v_b, rows_q, rows_k


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype


def _keep(b, num_heads, q_b, k_b, seed, dropout_p, dropout_masks):
    if dropout_masks is not None:
        return dropout_masks[b]
    return dropout_keep(seed, b, num_heads, q_b.shape[1], k_b.shape[1], dropout_p, q_b.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
              cu_seqlens_k: torch.Tensor, softmax_scale: float, window_left: int = -1,
              window_right: int = -1, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
              dropout_p: float = 0.0, seed: int = 0, dropout_masks: list[torch.Tensor] | None = None,
              upcast: bool = True, s_aux: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention, differentiable by autograd (s_aux included). Returns (out (total_q, Hq, Dv)
    in q's dtype, lse (Hq, total_q)).

    `upcast=True` computes in float32 for half inputs (the CPU backend); `upcast=False` computes
    in the input dtype (the low-precision baseline of the tolerance rule). float64 inputs compute
    in float64 and give a float64 lse (the oracle); otherwise lse is float32.
    `dropout_masks[b]` (Hq, sq, sk) overrides the reference's own keep-mask. `s_aux` (Hq,): the
    sink logits (module docstring), taken in the compute dtype.
    """
    total_q, num_heads, _ = q.shape
    sinks = None if s_aux is None else s_aux.to(_compute_dtype(q.dtype, upcast))
    compute = _compute_dtype(q.dtype, upcast)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(total_q, num_heads, v.shape[-1], dtype=compute)
    lse_all = torch.full((num_heads, total_q), float("inf"), dtype=lse_dtype, device=q.device)
    pieces_out, pieces_lse, rows = [], [], []
    for b, q_b, k_b, v_b, rows_q, _ in _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, compute):
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        scores, allowed, _ = _sequence_scores(q_b, k_b, softmax_scale, window_left, window_right, softcap, slopes)
        probs, lse, has_key = _probabilities(scores, allowed, sinks)
        if dropout_p > 0:
            keep = _keep(b, num_heads, q_b, k_b, seed, dropout_p, dropout_masks)
            probs = probs * keep.to(compute) / (1.0 - dropout_p)
        pieces_out.append(torch.matmul(probs, v_b).transpose(0, 1))
        lse = lse.to(lse_dtype)
        pieces_lse.append(torch.where(has_key[None, :], lse, torch.full_like(lse, float("inf"))))
        rows.append(rows_q)
    if rows:
        index = torch.cat([torch.arange(r.start, r.stop, device=q.device) for r in rows])
        out = out.index_copy(0, index, torch.cat(pieces_out, dim=0))
        lse_all = lse_all.index_copy(1, index, torch.cat(pieces_lse, dim=1))
    return out.to(q.dtype), lse_all


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, softmax_scale: float,
                       window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                       alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int = 0,
                       dropout_masks: list[torch.Tensor] | None = None, upcast: bool = True,
                       s_aux: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `attention` for upstream `dout`, derived by hand.

    With P the probabilities, Z = keep / (1 - dropout_p) (1 without dropout) and O = (P*Z) V:
        dV   = (P*Z)^T dO
        dP   = (dO V^T) * Z
        dS   = P * (dP - D),  D_i = sum_j P_ij dP_ij          (softmax backward)
        dS0  = dS * (1 - tanh^2(s0 / softcap))                 (softcap; dS0 = dS without it)
        dQ   = scale * dS0 K,   dK = scale * dS0^T Q           (summed over the GQA group)
    ALiBi and masking add constants to S, so they pass dS through unchanged (masked entries have
    P = 0). Padding tokens and rows with no key get zero gradients. With sinks, P is normalised
    by the lse that includes them and the formulas stand as written: the sink's value is zero, so
    its dP is 0 and it adds nothing to D. The sink's own gradient, d s_aux[h] = -sum_i P_i,sink D_i,
    is computed by the op from out and lse (padfree.ops.attention); autograd through `attention`
    gives it independently.
    """
    compute = _compute_dtype(q.dtype, upcast)
    sinks = None if s_aux is None else s_aux.to(compute)
    num_heads, group = q.shape[1], q.shape[1] // k.shape[1]
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute, device=q.device)
    for b, q_b, k_b, v_b, rows_q, rows_k in _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, compute):
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        scores, allowed, capped = _sequence_scores(q_b, k_b, softmax_scale, window_left, window_right, softcap, slopes)
        probs, _, _ = _probabilities(scores, allowed, sinks)
        dout_b = dout[rows_q].to(compute).transpose(0, 1)
        dropped, dprobs = probs, torch.matmul(dout_b, v_b.transpose(1, 2))
        if dropout_p > 0:
            scale_keep = _keep(b, num_heads, q_b, k_b, seed, dropout_p, dropout_masks).to(compute) / (1.0 - dropout_p)
            dropped, dprobs = probs * scale_keep, dprobs * scale_keep
        dv_b = torch.matmul(dropped.transpose(1, 2), dout_b)
        dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
        if capped is not None:
            dscores = dscores * (1 - capped * capped)
        dq_b = torch.matmul(dscores, k_b) * softmax_scale
        dk_b = torch.matmul(dscores.transpose(1, 2), q_b) * softmax_scale
        dq[rows_q] = dq_b.transpose(0, 1)
        fold = (k.shape[1], group, k_b.shape[1])
        dk[rows_k] = dk_b.reshape(*fold, k.shape[2]).sum(1).transpose(0, 1)
        dv[rows_k] = dv_b.reshape(*fold, v.shape[2]).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
