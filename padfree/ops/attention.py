"""`varlen_attention`: packed (padding-free) attention with flash-attn's varlen signature.

Custom ops (opaque to `torch.compile`, with fake impls and autograd):
  padfree::varlen_attention_fwd  (q, k, v, cu_seqlens_q, cu_seqlens_k, ..., s_aux) -> (out, lse)
  padfree::varlen_attention_bwd  (dout, q, k, v, out, lse, ..., s_aux) -> (dq, dk, dv)
The sink gradient d s_aux is computed by the autograd backward from (dout, out, lse), see
`_add_sinks`. The reference backend takes a value head dim Dv != D natively; the Triton kernels
take one head dim, and `varlen_attention` zero-pads for them (`_common_head_dim`).

The backend ("triton" or "reference") is chosen in Python before the op is called and passed as
an argument, so a compiled graph records the choice and the backward uses the same one.
"""

from __future__ import annotations

import math

import torch

from padfree import _backend, _checks
from padfree.ops import _autocast
from padfree.reference import attention as reference

OP = "varlen_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _kernels():
    from padfree.kernels import attention

    return attention


@torch.library.custom_op("padfree::varlen_attention_fwd", mutates_args=())
@_autocast.disabled
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                dropout_p: float, seed: torch.Tensor, backend: str,
                s_aux: torch.Tensor | None = None, cache_tables: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache_tables`: whether the Triton kernels may keep their block tables on `cu_seqlens` for
    the next layer (`kernels.attention.block_table`); the public op passes False inside
    torch.compile."""
    if backend == "triton":
        out, lse = _kernels().forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      softmax_scale, window_left, window_right, softcap, alibi_slopes,
                                      dropout_p, seed, cache_tables=cache_tables)
        return _add_sinks(out, lse, s_aux)
    out, lse = reference.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
                                   window_right, softcap, alibi_slopes, dropout_p, seed, s_aux=s_aux)
    return out, lse.float()


@_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, softcap, alibi_slopes, dropout_p, seed, backend, s_aux=None, cache_tables=True):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("padfree::varlen_attention_bwd", mutates_args=())
@_autocast.disabled
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                 max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int,
                 window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                 seed: torch.Tensor, backend: str, s_aux: torch.Tensor | None = None,
                 cache_tables: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With sinks, `out` and `lse` are the forward's (sink-corrected) ones: the Triton backward
    then needs nothing else (see `_add_sinks`), the reference recomputes P with `s_aux`."""
    if backend == "triton":
        return _kernels().backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   softmax_scale, window_left, window_right, softcap,
                                   alibi_slopes, dropout_p, seed, cache_tables=cache_tables)
    return reference.attention_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
                                        window_right, softcap, alibi_slopes, dropout_p, seed, s_aux=s_aux)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, softcap, alibi_slopes, dropout_p, seed, backend, s_aux=None, cache_tables=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _add_sinks(out: torch.Tensor, lse: torch.Tensor, s_aux: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the kernels' (out, lse) without sinks into those with one sink logit per query head.

    Sinks (GPT-OSS): row i of head h gets one more logit s = s_aux[h] in its softmax, with a zero
    value vector. With S_ij the (scaled, softcapped, biased) scores and lse_i = log sum_j exp(S_ij):

        lse'_i = log(exp(lse_i) + exp(s)) = logaddexp(lse_i, s)
        P'_ij  = exp(S_ij - lse'_i) = P_ij exp(lse_i - lse'_i),  P'_i,sink = exp(s - lse'_i)
        out'_i = sum_j P'_ij v_j = out_i exp(lse_i - lse'_i)          (dropout scales P, same factor)

    Backward: the softmax now runs over the keys and the sink; the sink's dP is 0 (zero value), so

        D_i        = sum_j P'_ij dP_ij = dO_i . out'_i                   (no sink term)
        dS_ij      = P'_ij (dP_ij - D_i)        for keys: the standard flash backward, which
                     recomputes P' = exp(S - lse') and D from out', exact when given (out', lse')
        d s_aux[h] = sum_i dS_i,sink = -sum_i exp(s - lse'_i) D_i       (`_sink_gradient`)

    So the unchanged kernels' backward, called with the saved (out', lse'), gives dq, dk, dv of the
    sink softmax. A row with no key keeps out = 0 and lse' = +inf (the no-key convention; out' =
    out there, and its exp(s - lse') = 0 adds nothing to d s_aux). Computed in fp32.
    """
    if s_aux is None:
        return out, lse
    lse_sink = torch.logaddexp(lse, s_aux.float()[:, None])
    factor = torch.where(torch.isfinite(lse), torch.exp(lse - lse_sink), 1.0)
    return (out.float() * factor.t()[:, :, None]).to(out.dtype), lse_sink


def _sink_gradient(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, s_aux: torch.Tensor) -> torch.Tensor:
    """d s_aux[h] = -sum_i exp(s_aux[h] - lse'_ih) (dO_i . out'_i) from the sink-corrected out and
    lse (`_add_sinks` derives it), in fp32, returned in s_aux's dtype."""
    delta = (dout.float() * out.float()).sum(-1).t()
    sink_probs = torch.exp(s_aux.float()[:, None] - lse)
    return (-(sink_probs * delta).sum(1)).to(s_aux.dtype)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
     window_right, softcap, alibi_slopes, dropout_p, seed, backend, s_aux, cache_tables) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, s_aux)
    ctx.options = (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                   dropout_p, backend, cache_tables)
    ctx.mark_non_differentiable(lse)


@_autocast.disabled
def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, s_aux = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, dropout_p,
     backend, cache_tables) = ctx.options
    dout = dout.contiguous()
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                              softcap, alibi_slopes, dropout_p, seed, backend, s_aux, cache_tables)
    ds_aux = _sink_gradient(dout, out, lse, s_aux) if s_aux is not None and ctx.needs_input_grad[15] else None
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, ds_aux, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
              window_size, softcap, alibi_slopes, s_aux, check):
    forms = {"q": "(total_q, heads, head_dim)", "k": "(total_k, heads, head_dim)",
             "v": "(total_k, heads, head_dim_v)"}
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.expect_tensor(name, t)
        _checks.expect_dim(name, t, 3, forms[name])
        _checks.expect_dtype(name, t, DTYPES)
    _checks.expect_same_dtype(q=q, k=k, v=v)
    _checks.expect_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               alibi_slopes=alibi_slopes)
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same tokens and heads (total_k, Hkv, ...), got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if not 1 <= q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[2]}")
    if not 1 <= v.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"v's head_dim must be in 1..{MAX_HEAD_DIM}, got {v.shape[2]}")
    if s_aux is not None:
        _checks.expect_tensor("s_aux", s_aux)
        _checks.expect_dtype("s_aux", s_aux, DTYPES)
        _checks.expect_same_device(q=q, s_aux=s_aux)
        if tuple(s_aux.shape) != (q.shape[1],):
            raise ValueError(f"s_aux must have shape ({q.shape[1]},) (one sink logit per query head), "
                             f"got {tuple(s_aux.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[1]})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    if len(window_size) != 2 or any(not isinstance(w, int) or w < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with ints >= -1 (-1 = unlimited), got {window_size}")
    values = _checks.value_checks_enabled(check)
    _checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", values=values)
    _checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", values=values)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"shapes {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    if alibi_slopes is not None:
        _checks.expect_dtype("alibi_slopes", alibi_slopes, (torch.float32,))
        batch = cu_seqlens_q.shape[0] - 1
        if tuple(alibi_slopes.shape) not in ((q.shape[1],), (batch, q.shape[1])):
            raise ValueError(f"alibi_slopes must have shape ({q.shape[1]},) or ({batch}, {q.shape[1]}), "
                             f"got {tuple(alibi_slopes.shape)}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _common_head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v zero-padded (differentiably) to one head dim, max(D, Dv), for the Triton kernels,
    which take one; the caller slices out back to Dv.

    Dv < D (MLA: DeepSeek-V2/V3 192 / 128): v gets D - Dv zero columns, so out's extra columns are
    0; sliced off, their dO is 0, which leaves D_i = dO . O and every gradient unchanged.
    Dv > D: q and k get Dv - D zero columns, which leave every score q . k unchanged (the softmax
    scale was already taken from the true D).
    The cost until a kernel takes two head dims: the P V products (Dv < D) or the Q K^T products
    (Dv > D) do max(D, Dv) / Dv, resp. / D, times their work, plus the copies of the padding.
    """
    width = max(q.shape[-1], v.shape[-1])

    def pad(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t

    return pad(q), pad(k), pad(v)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                     return_lse: bool = False, *, s_aux: torch.Tensor | None = None, check: bool | None = None):
    """Attention over packed sequences, same meaning as `flash_attn_varlen_func`.

    Args:
        q, k: (total_q, Hq, D), (total_k, Hkv, D) with Hq % Hkv == 0 (GQA/MQA); v: (total_k, Hkv,
            Dv); fp16, bf16 or fp32, all one dtype and device; D and Dv in 1..256. Dv may differ
            from D (MLA: DeepSeek-V2/V3, MiniCPM3): the reference computes it as is, the Triton
            kernels get the smaller side zero-padded, which costs max(D, Dv) / min(D, Dv) times
            the work of the padded product (`_common_head_dim`).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) offsets of each sequence in the packed tokens.
            Tokens past cu_seqlens_q[-1] are padding: output 0, gradient 0.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence. The kernels do not need them for
            their grid, so a changing value never recompiles anything.
        dropout_p: attention dropout; a fresh seed is drawn on q's device from torch's default
            generator each call (also on every replay of a captured CUDA graph) and the backward
            regenerates the same mask.
        softmax_scale: defaults to D ** -0.5.
        causal: bottom-right aligned (query i sees key j <= i + sk - sq), as flash-attn >= 2.1.
        window_size: (left, right) sliding window, -1 = unlimited; causal sets right = 0.
        softcap: > 0 applies softcap * tanh(s / softcap) to the scaled scores (Gemma 2).
        alibi_slopes: fp32 (Hq,) or (B, Hq); adds -slope * |i + sk - sq - j|.
        deterministic: accepted for flash-attn compatibility; padfree's backward never uses
            atomics, so it is always bitwise reproducible.
        return_lse: also return lse (Hq, total_q) fp32, +inf on rows with no key (not
            differentiable); with sinks, the log-normaliser including them.
        s_aux: attention sinks (GPT-OSS), (Hq,) fp32/fp16/bf16, one logit per query head added to
            every row's softmax with a zero value vector, neither scaled nor softcapped:
            p_ij = exp(s_ij) / (sum_l exp(s_il) + exp(s_aux[h])). Differentiable (a trainable
            parameter); its gradient has its dtype. Rows with no key still give out = 0.
        check: run the checks that copy `cu_seqlens` to the host (None: on unless the
            environment sets PADFREE_CHECKS=0; they are skipped inside torch.compile). Shape,
            dtype and device checks always run.

    Autocast: inside `torch.autocast`, q, k and v (fp32 or half, mixed allowed: rotary embeddings
    and q/k norms hand over fp32 q/k next to a bf16 v) are cast to the autocast dtype first and
    the attention runs in it; gradients reach fp32 inputs in fp32 (padfree/ops/_autocast.py says
    why the cast is done here rather than by a torch.library autocast rule). Outside autocast,
    mixed dtypes are a TypeError.

    Returns:
        out (total_q, Hq, Dv) in q's dtype (the autocast dtype under autocast), and lse when
        `return_lse`. A query with no key to attend to gets out = 0.
    """
    del deterministic
    q, k, v = _autocast.cast_inputs(q, k, v)
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
              window_size, softcap, alibi_slopes, s_aux, check)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    window_left, window_right = window_size
    if causal:
        window_right = 0
    seed = _dropout_seed(dropout_p, q.device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    backend = _backend.resolve(OP, q.device, triton_unsupported=lambda: _triton_unsupported(q))
    value_dim = v.shape[-1]
    if backend == "triton" and value_dim != q.shape[-1]:
        q, k, v = _common_head_dim(q, k, v)
    # Inside torch.compile no block table is cached on cu_seqlens: CUDA-graph trees
    # (mode="reduce-overhead") warm a graph up with its allocations in the graph's private pool,
    # where a cached table would outlive the run (torch raises) or reach eager code later.
    out, lse = _forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                           window_left, window_right, float(softcap), alibi_slopes, float(dropout_p), seed,
                           backend, s_aux, not torch.compiler.is_compiling())
    out = out[..., :value_dim] if out.shape[-1] != value_dim else out
    return (out, lse) if return_lse else out


def _dropout_seed(dropout_p: float, device: torch.device) -> torch.Tensor:
    """The dropout seed, an int64 tensor on the inputs' device drawn by its generator: the kernels
    read it there, so a captured CUDA graph draws a new seed (a new mask) on every replay, and the
    backward reads the one the forward saved. Without dropout it is never read (nothing is drawn)."""
    if dropout_p > 0:
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    return torch.empty((), dtype=torch.int64, device=device)


def _triton_unsupported(q: torch.Tensor) -> str | None:
    from padfree.kernels import runtime

    if not runtime.HAS_TRITON:
        return "triton is not installed"
    return _kernels().unsupported_reason(q)
