"""`lora_linear`: a frozen linear layer plus a LoRA update, fused; `lora_linear_shared` for several
projections (q/k/v, gate/up) that read the same input.

    y = x @ weight.T + bias + scaling * dropout(x) @ lora_a.T @ lora_b.T

Custom ops (opaque to `torch.compile`, with fake impls and autograd):
  padfree::lora_linear_fwd  (x, weights[], biases[], has_bias[], lora_a_cat, lora_bs[], rank_ends, scalings, ...)
                            -> [y_0, ..., y_{P-1}, xa]
  padfree::lora_linear_bwd  (dys[], x, weights[], t, lora_a_cat, rank_ends, ...) -> (dx, d lora_a_cat)

The A matrices of a group are concatenated (`torch.cat`, differentiable, R x K: small) so one
shrink GEMM computes every x @ A_p^T in one pass over x; xa (M, R) and the dropout seed are all
the forward saves beyond its inputs. The backward math (kernels/lora.py derives it):

    t_p   = scaling_p * dy_p @ B_p           dB_p = scaling_p * dy_p^T @ xa_p       (torch, small)
    dx, dA_cat = lora_linear_bwd(...)        dx = sum_p dy_p W_p + sum_p D_p(t_p A_p)  (skipped when x
                                             needs no gradient, e.g. the first layer's input)
    dW_p  = dy_p^T x, d bias_p = sum dy_p    only for a weight / bias that requires grad

The backend ("triton" or "reference") is chosen in Python before the op is called and passed as
an argument, so a compiled graph records the choice and the backward uses the same one.
Dropout: a seed is drawn on x's device from torch's default generator per call when dropout_p > 0
(an int64 tensor the kernels read, so a CUDA graph replay draws a new one); the mask is
a hash of (seed, projection index, element position), identical in the kernels and the reference
(`padfree.reference.lora.keep_mask`), and regenerated in backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from padfree import _backend, _checks
from padfree.ops import _autocast
from padfree.ops.attention import _dropout_seed
from padfree.reference import lora as reference

OP = "lora_linear"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 256


def _kernels():
    from padfree.kernels import lora

    return lora


def _impl(backend: str):
    return _kernels() if backend == "triton" else reference


def _expand_biases(biases: list[torch.Tensor], has_bias: list[bool]) -> list[torch.Tensor | None]:
    """The op takes only the biases that exist (a `Tensor?[]` holding None gets no gradient
    from torch.library's autograd), plus one flag per projection; this restores the full list."""
    present = iter(biases)
    return [next(present) if flag else None for flag in has_bias]


@torch.library.custom_op("padfree::lora_linear_fwd", mutates_args=())
@_autocast.disabled
def _forward_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], has_bias: list[bool],
                lora_a: torch.Tensor, lora_bs: list[torch.Tensor], rank_ends: list[int], scalings: list[float],
                dropout_p: float, seed: torch.Tensor, backend: str) -> list[torch.Tensor]:
    outputs, xa = _impl(backend).forward(x, list(weights), _expand_biases(biases, has_bias), lora_a, list(lora_bs),
                                         list(rank_ends), list(scalings), dropout_p, seed)
    return [*outputs, xa]


@_forward_op.register_fake
def _(x, weights, biases, has_bias, lora_a, lora_bs, rank_ends, scalings, dropout_p, seed, backend):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights] + [x.new_empty(x.shape[0], lora_a.shape[0])]


@torch.library.custom_op("padfree::lora_linear_bwd", mutates_args=())
@_autocast.disabled
def _backward_op(dys: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor], t: torch.Tensor,
                 lora_a: torch.Tensor, rank_ends: list[int], dropout_p: float, seed: torch.Tensor,
                 input_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).backward_input_and_a(list(dys), x, list(weights), t, lora_a, list(rank_ends), dropout_p,
                                               seed, input_grad)


@_backward_op.register_fake
def _(dys, x, weights, t, lora_a, rank_ends, dropout_p, seed, input_grad, backend):
    return (torch.empty_like(x) if input_grad else x.new_empty(0)), torch.empty_like(lora_a)


def _setup_context(ctx, inputs, output):
    x, weights, biases, has_bias, lora_a, lora_bs, rank_ends, scalings, dropout_p, seed, backend = inputs
    ctx.count = len(weights)
    ctx.options = (list(rank_ends), list(scalings), dropout_p, backend)
    ctx.weight_grad = [w.requires_grad for w in weights]
    ctx.bias_grad = [b.requires_grad for b in biases]
    ctx.has_bias = list(has_bias)
    ctx.save_for_backward(x, lora_a, output[-1], seed, *weights, *lora_bs)
    ctx.mark_non_differentiable(output[-1])


@_autocast.disabled
def _backward(ctx, grads):
    x, lora_a, xa, seed, *rest = ctx.saved_tensors
    weights, lora_bs = rest[:ctx.count], rest[ctx.count:]
    rank_ends, scalings, dropout_p, backend = ctx.options
    dys = [dy.contiguous() if dy is not None else x.new_zeros(x.shape[0], w.shape[0])
           for dy, w in zip(grads[:ctx.count], weights)]
    starts = [0, *rank_ends[:-1]]
    t = torch.cat([scaling * (dy @ lora_b) for dy, lora_b, scaling in zip(dys, lora_bs, scalings)], dim=1)
    d_lora_bs = [scaling * (dy.t() @ xa[:, start:end])
                 for dy, scaling, start, end in zip(dys, scalings, starts, rank_ends)]
    input_grad = ctx.needs_input_grad[0]
    dx, d_lora_a = _backward_op(dys, x, list(weights), t, lora_a, rank_ends, dropout_p, seed, input_grad, backend)
    d_weights = [dy.t() @ x if needed else None for dy, needed in zip(dys, ctx.weight_grad)]
    dys_with_bias = [dy for dy, flag in zip(dys, ctx.has_bias) if flag]
    d_biases = [dy.sum(0) if needed else None for dy, needed in zip(dys_with_bias, ctx.bias_grad)]
    return (dx if input_grad else None), d_weights, d_biases, None, d_lora_a, d_lora_bs, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, weights, biases, lora_as, lora_bs, scalings, dropout_p) -> None:
    _checks.expect_tensor("x", x)
    _checks.expect_dtype("x", x, DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., in_features), got {tuple(x.shape)}")
    lists = {"weights": weights, "biases": biases, "lora_as": lora_as, "lora_bs": lora_bs, "scalings": scalings}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple, got {type(value).__name__}")
    if not weights:
        raise ValueError("weights must name at least one projection")
    if len({len(v) for v in lists.values()}) != 1:
        lengths = ", ".join(f"{name} {len(v)}" for name, v in lists.items())
        raise ValueError(f"weights, biases, lora_as, lora_bs and scalings must have one entry per projection, "
                         f"got {lengths}")
    in_features = x.shape[-1]
    single = len(weights) == 1
    for index, (weight, bias, lora_a, lora_b, scaling) in enumerate(zip(weights, biases, lora_as, lora_bs, scalings)):
        suffix = "" if single else f"[{index}]"
        names = {k: f"{k}{suffix}" for k in ("weight", "bias", "lora_a", "lora_b", "scaling")}
        for key, tensor in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
            _checks.expect_tensor(names[key], tensor)
        _checks.expect_dim(names["weight"], weight, 2, "(out_features, in_features)")
        _checks.expect_dim(names["lora_a"], lora_a, 2, "(rank, in_features)")
        _checks.expect_dim(names["lora_b"], lora_b, 2, "(out_features, rank)")
        if weight.shape[1] != in_features:
            raise ValueError(f"{names['weight']} has in_features {weight.shape[1]} but x has {in_features} "
                             f"(x {tuple(x.shape)}, {names['weight']} {tuple(weight.shape)})")
        if lora_a.shape[1] != in_features:
            raise ValueError(f"{names['lora_a']} has in_features {lora_a.shape[1]} but x has {in_features}")
        if lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"rank mismatch: {names['lora_a']} is {tuple(lora_a.shape)} (rank {lora_a.shape[0]}) "
                             f"but {names['lora_b']} is {tuple(lora_b.shape)} (rank {lora_b.shape[1]})")
        if lora_b.shape[0] != weight.shape[0]:
            raise ValueError(f"{names['lora_b']} has out_features {lora_b.shape[0]} but {names['weight']} has "
                             f"{weight.shape[0]}")
        if not 1 <= lora_a.shape[0] <= MAX_RANK:
            raise ValueError(f"{names['lora_a']} rank must be in 1..{MAX_RANK}, got {lora_a.shape[0]}")
        tensors = {"x": x, names["weight"]: weight, names["lora_a"]: lora_a, names["lora_b"]: lora_b}
        if bias is not None:
            _checks.expect_tensor(names["bias"], bias)
            if tuple(bias.shape) != (weight.shape[0],):
                raise ValueError(f"{names['bias']} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
            tensors[names["bias"]] = bias
        _checks.expect_same_dtype(**tensors)
        _checks.expect_same_device(**tensors)
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
            raise TypeError(f"{names['scaling']} must be a finite float, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def lora_linear_shared(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                       lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor], scalings: Sequence[float],
                       dropout_p: float = 0.0) -> list[torch.Tensor]:
    """Several LoRA linear layers on the same input (q/k/v of one attention, gate/up of one MLP).

    Returns [lora_linear(x, weights[p], biases[p], lora_as[p], lora_bs[p], scalings[p], dropout_p)
    for each p], computing every x @ lora_as[p].T in one pass over x. Each projection gets its own
    dropout mask (independent, as with one PEFT dropout module per layer). Arguments as in
    `lora_linear`, one list entry per projection, autocast included; the Triton kernels fuse up
    to 3 projections (more run on the reference, with a warning).
    """
    x, weights, biases, lora_as, lora_bs = _autocast.cast_inputs(x, weights, biases, lora_as, lora_bs)
    _validate(x, weights, biases, lora_as, lora_bs, scalings, dropout_p)
    leading = x.shape[:-1]
    x2d = _row_major(x.reshape(-1, x.shape[-1]))
    weights = [_row_major(w) for w in weights]
    lora_bs = [_row_major(b) for b in lora_bs]
    has_bias = [b is not None for b in biases]
    present_biases = [b.contiguous() for b in biases if b is not None]
    lora_a = _row_major(torch.cat(list(lora_as), dim=0)) if len(lora_as) > 1 else _row_major(lora_as[0])
    rank_ends = []
    for a in lora_as:
        rank_ends.append((rank_ends[-1] if rank_ends else 0) + a.shape[0])
    dropout_p = float(dropout_p)
    seed = _dropout_seed(dropout_p, x.device)
    backend = _backend.resolve(OP, x.device, triton_unsupported=lambda: _triton_unsupported(x2d, len(weights)))
    outputs = _forward_op(x2d, weights, present_biases, has_bias, lora_a, lora_bs, rank_ends,
                          [float(s) for s in scalings], dropout_p, seed, backend)
    return [y.view(*leading, y.shape[-1]) for y in outputs[:-1]]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """A frozen linear layer plus its LoRA update, in one fused pass.

        y = x @ weight.T + bias + scaling * dropout(x) @ lora_a.T @ lora_b.T

    Args:
        x: (..., in_features), any leading shape; fp16, bf16 or fp32.
        weight: (out_features, in_features), usually frozen (its gradient is computed only when it
            requires grad); bias: (out_features,) or None.
        lora_a: (rank, in_features), lora_b: (out_features, rank), rank in 1..256.
        scaling: the LoRA scale (alpha / rank in PEFT).
        dropout_p: dropout on the LoRA input, in [0, 1). A fresh seed is drawn on x's device from
            torch's default generator per call (and per CUDA graph replay); the backward
            regenerates the mask from it (nothing of the mask's size is saved). Pass 0 in eval mode.
    All tensors share x's dtype and device. Only metadata is checked (no device -> host copy).
    Inside `torch.autocast` every tensor is first cast to the autocast dtype (as `F.linear` does
    under autocast, so fp32 weights with bf16 activations are fine); gradients reach fp32
    parameters in fp32.

    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast). Gradients flow to
        x, lora_a, lora_b, and to weight / bias when they require grad. lora_b @ lora_a is never
        formed.
    """
    return lora_linear_shared(x, [weight], [bias], [lora_a], [lora_b], [scaling], dropout_p)[0]


def _triton_unsupported(x: torch.Tensor, num_projections: int) -> str | None:
    from padfree.kernels import runtime

    if not runtime.HAS_TRITON:
        return "triton is not installed"
    return _kernels().unsupported_reason(x, num_projections)
