"""`varlen_attention`: packed (padding-free) attention with flash-attn's varlen signature.

Custom ops (opaque to `torch.compile`, with fake impls and autograd):
  padfree::varlen_attention_fwd  (q, k, v, cu_seqlens_q, cu_seqlens_k, ...) -> (out, lse)
  padfree::varlen_attention_bwd  (dout, q, k, v, out, lse, ...) -> (dq, dk, dv)

The backend ("triton" or "reference") is chosen in Python before the op is called and passed as
an argument, so a compiled graph records the choice and the backward uses the same one.
"""

from __future__ import annotations

import math

import torch

from padfree import _backend, _checks
from padfree.reference import attention as reference

OP = "varlen_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _kernels():
    from padfree.kernels import attention

    return attention


@torch.library.custom_op("padfree::varlen_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                dropout_p: float, seed: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels().forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  softmax_scale, window_left, window_right, softcap, alibi_slopes,
                                  dropout_p, seed)
    out, lse = reference.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
                                   window_right, softcap, alibi_slopes, dropout_p, seed)
    return out, lse.float()


@_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, softcap, alibi_slopes, dropout_p, seed, backend):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("padfree::varlen_attention_bwd", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                 max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int,
                 window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                 seed: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels().backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   softmax_scale, window_left, window_right, softcap,
                                   alibi_slopes, dropout_p, seed)
    return reference.attention_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
                                        window_right, softcap, alibi_slopes, dropout_p, seed)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, softcap, alibi_slopes, dropout_p, seed, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_OPTION_NAMES = ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "window_left", "window_right",
                 "softcap", "dropout_p", "backend")


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
     window_right, softcap, alibi_slopes, dropout_p, seed, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed)
    ctx.options = (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                   dropout_p, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, dropout_p,
     backend) = ctx.options
    dq, dk, dv = _backward_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                              softcap, alibi_slopes, dropout_p, seed, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
              window_size, softcap, alibi_slopes, check):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.expect_tensor(name, t)
        _checks.expect_dim(name, t, 3, f"(total_{'q' if name == 'q' else 'k'}, heads, head_dim)")
        _checks.expect_dtype(name, t, DTYPES)
    _checks.expect_same_dtype(q=q, k=k, v=v)
    _checks.expect_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               alibi_slopes=alibi_slopes)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if not 1 <= q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[2]}")
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


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                     return_lse: bool = False, *, check: bool | None = None):
    """Attention over packed sequences, same meaning as `flash_attn_varlen_func`.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D) with Hq % Hkv == 0 (GQA/MQA); fp16, bf16 or
            fp32, all one dtype and device; D in 1..256.
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
            differentiable).
        check: run the checks that copy `cu_seqlens` to the host (None: on unless the
            environment sets PADFREE_CHECKS=0; they are skipped inside torch.compile). Shape,
            dtype and device checks always run.

    Returns:
        out (total_q, Hq, D) in q's dtype, and lse when `return_lse`. A query with no key to
        attend to gets out = 0.
    """
    del deterministic
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
              window_size, softcap, alibi_slopes, check)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    window_left, window_right = window_size
    if causal:
        window_right = 0
    seed = _dropout_seed(dropout_p, q.device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    backend = _backend.resolve(OP, q.device, triton_unsupported=lambda: _triton_unsupported(q, dropout_p))
    out, lse = _forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                           window_left, window_right, float(softcap), alibi_slopes, float(dropout_p), seed,
                           backend)
    return (out, lse) if return_lse else out


def _dropout_seed(dropout_p: float, device: torch.device) -> torch.Tensor:
    """The dropout seed, an int64 tensor on the inputs' device drawn by its generator: the kernels
    read it there, so a captured CUDA graph draws a new seed (a new mask) on every replay, and the
    backward reads the one the forward saved. Without dropout it is never read (nothing is drawn)."""
    if dropout_p > 0:
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    return torch.empty((), dtype=torch.int64, device=device)


def _triton_unsupported(q: torch.Tensor, dropout_p: float) -> str | None:
    from padfree.kernels import runtime

    if not runtime.HAS_TRITON:
        return "triton is not installed"
    return _kernels().unsupported_reason(q, dropout_p)
