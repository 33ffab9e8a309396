"""`lora_mixture_linear`: a frozen linear layer plus a mixture of LoRA experts chosen per token by a
router; `lora_per_sequence_linear`: one LoRA adapter per packed sequence (many fine-tunes trained
in one padding-free pass).

    y_m = x_m W^T + b + scaling * sum_j w_mj * dropout(x_m) A_{e_mj}^T B_{e_mj}^T

Custom ops (opaque to `torch.compile`, with fake impls and autograd):
  padfree::lora_mixture_fwd (x, weight, bias?, lora_a, lora_b, scaling, top_k_index, top_k_weights,
                             dropout_p, seed, backend) -> (y, h)
  padfree::lora_mixture_bwd (dy, x, weight, h, lora_a, lora_b, scaling, top_k_index, top_k_weights,
                             dropout_p, seed, input_grad, backend) -> (dx, d lora_a, d lora_b, d top_k_weights)

  padfree::lora_mixture_shared_fwd (x, weights[], biases[], has_bias[], lora_as[], lora_bs[], scalings[],
                                    top_k_indices[], top_k_weights[], dropout_p, seed, backend) -> [y_0.., h]
  padfree::lora_mixture_shared_bwd (dys[], x, weights[], h, lora_as[], ..., input_grad, backend)
                                    -> [dx, d lora_a_p.., d lora_b_p.., d top_k_weights_p..]
The shared pair is `lora_mixture_linear_shared`'s fused group (projections reading one x, h the
concatenation of their intermediates); `lora_mixture_linear` and a group the kernels cannot fuse
run the single pair per projection.

h (the LoRA intermediate dropout(x) A_e^T: (M, E * r) for the reference and few experts, one row
per sorted token-expert pair for many experts, see kernels/lora_mixture.saved_shape) and the dropout
seed are all the forward saves beyond its inputs. The backward math is derived in
padfree/reference/lora_mixture.py (the loop over experts) and padfree/kernels/lora_mixture.py (one
gated LoRA of rank E * r; segmented GEMMs over token-expert pairs sorted by expert); the frozen
weight's and the bias's gradients (dW = dy^T x, db = sum dy) are computed here, only when they
require grad. The backend ("triton" or "reference") is chosen in Python before the op is called
and passed as an argument, so a compiled graph records the choice and the backward uses the same
one. Dropout draws its seed as `lora_linear` does (one mask on x, shared by the experts; projection p
of a group takes stream p of the seed, as in `lora_linear_shared`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from padfree import _backend, _checks
from padfree.ops import _autocast
from padfree.ops.attention import _dropout_seed
from padfree.ops.lora import _expand_biases
from padfree.reference import lora as lora_reference
from padfree.reference import lora_mixture as reference

OP = "lora_mixture_linear"
SHARED_OP = "lora_mixture_linear_shared"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _kernels():
    from padfree.kernels import lora_mixture

    return lora_mixture


def _impl(backend: str):
    return _kernels() if backend == "triton" else reference


@torch.library.custom_op("padfree::lora_mixture_fwd", mutates_args=())
@_autocast.disabled
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                dropout_p: float, seed: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).forward(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p,
                                  seed)


@_forward_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed, backend):
    num_experts, rank = lora_a.shape[:2]
    if backend == "triton":
        saved = _kernels().saved_shape(x.shape[0], top_k_index.shape[1], num_experts, rank)
    else:
        saved = (x.shape[0], num_experts * rank)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(saved)


@torch.library.custom_op("padfree::lora_mixture_bwd", mutates_args=())
@_autocast.disabled
def _backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 dropout_p: float, seed: torch.Tensor, input_grad: bool, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).backward(dy, x, weight, h, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p,
                                   seed, input_grad)


@_backward_op.register_fake
def _(dy, x, weight, h, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed, input_grad, backend):
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(top_k_weights)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed, backend = inputs
    ctx.options = (scaling, dropout_p, backend)
    ctx.weight_grad = weight.requires_grad
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.save_for_backward(x, weight, output[1], lora_a, lora_b, top_k_index, top_k_weights, seed)
    ctx.mark_non_differentiable(output[1])


@_autocast.disabled
def _backward(ctx, dy, _):
    x, weight, h, lora_a, lora_b, top_k_index, top_k_weights, seed = ctx.saved_tensors
    scaling, dropout_p, backend = ctx.options
    dy = dy.contiguous()
    input_grad = ctx.needs_input_grad[0]
    dx, d_lora_a, d_lora_b, d_weights = _backward_op(dy, x, weight, h, lora_a, lora_b, scaling, top_k_index,
                                                     top_k_weights, dropout_p, seed, input_grad, backend)
    d_weight = dy.t() @ x if ctx.weight_grad else None
    d_bias = dy.sum(0) if ctx.bias_grad else None
    return ((dx if input_grad else None), d_weight, d_bias, d_lora_a, d_lora_b, None, None, d_weights, None, None,
            None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("padfree::lora_mixture_shared_fwd", mutates_args=())
@_autocast.disabled
def _shared_forward_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], has_bias: list[bool],
                       lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], scalings: list[float],
                       top_k_indices: list[torch.Tensor], top_k_weights: list[torch.Tensor], dropout_p: float,
                       seed: torch.Tensor, backend: str) -> list[torch.Tensor]:
    outputs, h = _impl(backend).forward_shared(x, list(weights), _expand_biases(biases, has_bias), list(lora_as),
                                               list(lora_bs), list(scalings), list(top_k_indices),
                                               list(top_k_weights), dropout_p, seed)
    return [*outputs, h]


@_shared_forward_op.register_fake
def _(x, weights, biases, has_bias, lora_as, lora_bs, scalings, top_k_indices, top_k_weights, dropout_p, seed,
      backend):
    total_rank = sum(a.shape[0] * a.shape[1] for a in lora_as)
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights] + [x.new_empty(x.shape[0], total_rank)]


@torch.library.custom_op("padfree::lora_mixture_shared_bwd", mutates_args=())
@_autocast.disabled
def _shared_backward_op(dys: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor], h: torch.Tensor,
                        lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], scalings: list[float],
                        top_k_indices: list[torch.Tensor], top_k_weights: list[torch.Tensor], dropout_p: float,
                        seed: torch.Tensor, input_grad: bool, backend: str) -> list[torch.Tensor]:
    return _impl(backend).backward_shared(list(dys), x, list(weights), h, list(lora_as), list(lora_bs), list(scalings),
                                          list(top_k_indices), list(top_k_weights), dropout_p, seed, input_grad)


@_shared_backward_op.register_fake
def _(dys, x, weights, h, lora_as, lora_bs, scalings, top_k_indices, top_k_weights, dropout_p, seed, input_grad,
      backend):
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    return ([dx] + [torch.empty_like(a) for a in lora_as] + [torch.empty_like(b) for b in lora_bs]
            + [torch.empty_like(w) for w in top_k_weights])


def _shared_setup_context(ctx, inputs, output):
    x, weights, biases, has_bias, lora_as, lora_bs, scalings, top_k_indices, top_k_weights, dropout_p, seed, \
        backend = inputs
    ctx.count = len(weights)
    ctx.options = (list(scalings), dropout_p, backend)
    ctx.weight_grad = [w.requires_grad for w in weights]
    ctx.bias_grad = [b.requires_grad for b in biases]
    ctx.has_bias = list(has_bias)
    ctx.save_for_backward(x, output[-1], seed, *weights, *lora_as, *lora_bs, *top_k_indices, *top_k_weights)
    ctx.mark_non_differentiable(output[-1])


@_autocast.disabled
def _shared_backward(ctx, grads):
    x, h, seed, *rest = ctx.saved_tensors
    count = ctx.count
    weights, lora_as, lora_bs, top_k_indices, top_k_weights = (rest[i * count:(i + 1) * count] for i in range(5))
    scalings, dropout_p, backend = ctx.options
    dys = [dy.contiguous() if dy is not None else x.new_zeros(x.shape[0], w.shape[0])
           for dy, w in zip(grads[:count], weights)]
    input_grad = ctx.needs_input_grad[0]
    dx, *rest = _shared_backward_op(dys, x, list(weights), h, list(lora_as), list(lora_bs), scalings,
                                    list(top_k_indices), list(top_k_weights), dropout_p, seed, input_grad, backend)
    d_lora_as, d_lora_bs, d_top_k_weights = (rest[i * count:(i + 1) * count] for i in range(3))
    d_weights = [dy.t() @ x if needed else None for dy, needed in zip(dys, ctx.weight_grad)]
    dys_with_bias = [dy for dy, flag in zip(dys, ctx.has_bias) if flag]
    d_biases = [dy.sum(0) if needed else None for dy, needed in zip(dys_with_bias, ctx.bias_grad)]
    return ((dx if input_grad else None), d_weights, d_biases, None, d_lora_as, d_lora_bs, None, [None] * count,
            d_top_k_weights, None, None, None)


_shared_forward_op.register_autograd(_shared_backward, setup_context=_shared_setup_context)


def _validate_projection(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, check,
                         suffix: str = "") -> None:
    """Projection checks; `suffix` ("" for `lora_mixture_linear`, "[p]" in a group) follows the
    argument's name in the messages (lora_as[1], top_k_indices[1], ...)."""
    plural = {"weight": "weights", "bias": "biases", "lora_a": "lora_as", "lora_b": "lora_bs", "scaling": "scalings",
              "top_k_index": "top_k_indices", "top_k_weights": "top_k_weights"}
    names = {key: f"{group}{suffix}" if suffix else key for key, group in plural.items()}
    for key, value in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("top_k_index", top_k_index),
                       ("top_k_weights", top_k_weights)):
        _checks.expect_tensor(names[key], value)
    _checks.expect_dim(names["weight"], weight, 2, "(out_features, in_features)")
    _checks.expect_dim(names["lora_a"], lora_a, 3, "(num_experts, rank, in_features)")
    _checks.expect_dim(names["lora_b"], lora_b, 3, "(num_experts, out_features, rank)")
    _checks.expect_dim(names["top_k_index"], top_k_index, 2, "(num_tokens, top_k)")
    _checks.expect_dim(names["top_k_weights"], top_k_weights, 2, "(num_tokens, top_k)")
    _checks.expect_dtype(names["top_k_index"], top_k_index, INDEX_DTYPES)
    if not top_k_weights.dtype.is_floating_point:
        raise TypeError(f"{names['top_k_weights']} must be a float tensor, got {top_k_weights.dtype}")
    tensors = {"x": x, names["weight"]: weight, names["lora_a"]: lora_a, names["lora_b"]: lora_b}
    if bias is not None:
        _checks.expect_tensor(names["bias"], bias)
        tensors[names["bias"]] = bias
    _checks.expect_same_dtype(**tensors)
    _checks.expect_same_device(**tensors, **{names["top_k_index"]: top_k_index,
                                             names["top_k_weights"]: top_k_weights})
    in_features = x.shape[-1]
    num_tokens = x.numel() // in_features if in_features else 0
    out_features = weight.shape[0]
    num_experts, rank, a_in = lora_a.shape
    if weight.shape[1] != in_features:
        raise ValueError(f"{names['weight']} has in_features {weight.shape[1]} but x has {in_features} "
                         f"(x {tuple(x.shape)}, {names['weight']} {tuple(weight.shape)})")
    if a_in != in_features or num_experts < 1 or rank < 1:
        raise ValueError(f"{names['lora_a']} must have shape (num_experts >= 1, rank >= 1, {in_features}), "
                         f"got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (num_experts, out_features, rank):
        raise ValueError(f"{names['lora_b']} must have shape (num_experts, out_features, rank) = "
                         f"({num_experts}, {out_features}, {rank}) to match {names['lora_a']} {tuple(lora_a.shape)} "
                         f"and {names['weight']} {tuple(weight.shape)}, got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{names['bias']} must have shape ({out_features},), got {tuple(bias.shape)}")
    if top_k_index.shape[0] != num_tokens or top_k_index.shape[1] < 1:
        raise ValueError(f"{names['top_k_index']} must have shape (num_tokens, top_k) = ({num_tokens}, top_k >= 1) "
                         f"for x {tuple(x.shape)}, got {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"{names['top_k_weights']} must have the shape of {names['top_k_index']} "
                         f"{tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise TypeError(f"{names['scaling']} must be a finite float, got {scaling!r}")
    if _checks.value_checks_enabled(check) and top_k_index.numel():
        low, high = int(top_k_index.min()), int(top_k_index.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"{names['top_k_index']} holds expert {low if low < 0 else high}, "
                             f"outside 0..{num_experts - 1}")


_LISTS = ("weights", "biases", "lora_as", "lora_bs", "scalings", "top_k_indices", "top_k_weights")


def _validate(x, lists: dict, dropout_p, check) -> None:
    """`lists`: the group's per-projection lists by argument name (_LISTS); a one-projection group is
    `lora_mixture_linear`, whose messages name its own arguments."""
    _checks.expect_tensor("x", x)
    _checks.expect_dtype("x", x, DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., in_features), got {tuple(x.shape)}")
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple, got {type(value).__name__}")
    if not lists["weights"]:
        raise ValueError("weights must name at least one projection")
    if len({len(v) for v in lists.values()}) != 1:
        lengths = ", ".join(f"{name} {len(v)}" for name, v in lists.items())
        raise ValueError(f"{', '.join(_LISTS)} must have one entry per projection, got {lengths}")
    single = len(lists["weights"]) == 1
    for index, layer in enumerate(zip(*lists.values())):
        _validate_projection(x, *layer, check, "" if single else f"[{index}]")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def lora_mixture_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                        lora_b: torch.Tensor, scaling: float, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        dropout_p: float = 0.0, *, check: bool | None = None) -> torch.Tensor:
    """A frozen linear layer plus a mixture of LoRA experts, routed per token.

        y_m = x_m @ weight.T + bias + scaling * sum_j w_mj * dropout(x_m) @ lora_a[e_mj].T @ lora_b[e_mj].T
        with e_mj = top_k_index[m, j], w_mj = top_k_weights[m, j]

    Args:
        x: (..., in_features), any leading shape (M tokens in all); fp16, bf16 or fp32.
        weight: (out_features, in_features), usually frozen (its gradient is computed only when it
            requires grad); bias: (out_features,) or None.
        lora_a: (num_experts, rank, in_features), lora_b: (num_experts, out_features, rank).
        scaling: the LoRA scale shared by the experts (alpha / rank in PEFT).
        top_k_index: (M, k) int32/int64 experts in 0..num_experts-1 (a repeated expert adds its weights).
        top_k_weights: (M, k) any float dtype (e.g. `padfree.moe_route`'s); the gate math runs in
            fp32, its gradient has its dtype (so a router trains).
        dropout_p: dropout on the LoRA input in [0, 1), one mask on x shared by the experts, drawn as
            in `lora_linear` (seed on x's device, mask regenerated in backward). Pass 0 in eval mode.
        check: run the check that copies top_k_index's range to the host (None: on unless
            PADFREE_CHECKS=0; skipped inside torch.compile). Shape/dtype/device checks always run.
    weight, bias, lora_a and lora_b share x's dtype and device. Inside `torch.autocast` they and x are
    cast to the autocast dtype first (as `F.linear` is); the routing weights keep their dtype.

    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast). Gradients flow to x,
        lora_a, lora_b and top_k_weights, and to weight / bias when they require grad. An expert no
        token chose gets a zero gradient.

    Backends: the Triton path (padfree/kernels/lora_mixture.py) runs the fused-LoRA kernels as one
    LoRA of rank num_experts * rank with a per-token gate when num_experts * rank <= 256, and beyond
    that segmented low-rank GEMMs over the token-expert pairs sorted by expert (`padfree.moe_align`),
    with no host sync in either. This is `lora_mixture_linear_shared` with one projection.
    """
    return lora_mixture_linear_shared(x, [weight], [bias], [lora_a], [lora_b], [scaling], [top_k_index],
                                      [top_k_weights], dropout_p, check=check)[0]


def lora_mixture_linear_shared(x: torch.Tensor, weights: Sequence[torch.Tensor],
                               biases: Sequence[torch.Tensor | None], lora_as: Sequence[torch.Tensor],
                               lora_bs: Sequence[torch.Tensor], scalings: Sequence[float],
                               top_k_indices: Sequence[torch.Tensor], top_k_weights: Sequence[torch.Tensor],
                               dropout_p: float = 0.0, *, check: bool | None = None) -> list[torch.Tensor]:
    """Several mixture-of-LoRA-experts linear layers on the same input (q/k/v of one attention,
    gate/up of one MLP), each with its own frozen layer, experts, scaling and routing.

    Returns [lora_mixture_linear(x, weights[p], biases[p], lora_as[p], lora_bs[p], scalings[p],
    top_k_indices[p], top_k_weights[p], dropout_p) for each p], arguments as there, one list entry
    per projection (the experts' count, rank, out_features and top_k may differ between
    projections; autocast and `check` as there). Each projection gets its own dropout mask
    (independent, as with one PEFT dropout module per layer): projection p's is stream p of the
    call's seed (`padfree.reference.lora.stream_seed`), so projection 0 draws the mask
    `lora_mixture_linear` draws from the same generator state.

    On the Triton backend a group of at most 3 projections that all take the few-experts path
    (num_experts * rank <= 256 each) runs fused: one shrink kernel reads x once for every
    projection's experts, then a gated expand per projection, and the backward runs one
    lora_dx_kernel and one dA for the group (padfree/kernels/lora_mixture.py). Any other group (more
    than 3 projections, or a projection with many experts) runs each projection as its own
    `lora_mixture_linear` (same results and masks, x read once per projection), with a one-time
    PadfreeFallbackWarning naming the reason. The reference backend computes each projection by
    its loop over experts.
    """
    lists = dict(zip(_LISTS, (weights, biases, lora_as, lora_bs, scalings, top_k_indices, top_k_weights)))
    x, lists["weights"], lists["biases"], lists["lora_as"], lists["lora_bs"] = _autocast.cast_inputs(
        x, weights, biases, lora_as, lora_bs)
    _validate(x, lists, dropout_p, check)
    leading = x.shape[:-1]
    x2d = _row_major(x.reshape(-1, x.shape[-1]))
    weights = [_row_major(w) for w in lists["weights"]]
    biases = [None if b is None else b.contiguous() for b in lists["biases"]]
    lora_as = [a.contiguous() for a in lists["lora_as"]]
    lora_bs = [b.contiguous() for b in lists["lora_bs"]]
    scalings = [float(s) for s in lists["scalings"]]
    top_k_indices = [index.long() for index in lists["top_k_indices"]]
    top_k_weights = [w.float() for w in lists["top_k_weights"]]
    dropout_p = float(dropout_p)
    seed = _dropout_seed(dropout_p, x.device)
    backend = _backend.resolve(OP, x.device, triton_unsupported=lambda: _triton_unsupported(x2d, lora_as[0]))
    unfused = None
    if backend == "triton":
        unfused = _kernels().group_unfused_reason([a.shape[0] for a in lora_as], [a.shape[1] for a in lora_as])
    if len(weights) == 1 or unfused is not None:
        if len(weights) > 1:
            _backend.warn_once(SHARED_OP, f"padfree.{SHARED_OP}: {unfused}; each projection runs as its own "
                                          f"{OP} (x is read once per projection)")
        outputs = [_forward_op(x2d, *layer, dropout_p, lora_reference.stream_seed(seed, p), backend)[0]
                   for p, layer in enumerate(zip(weights, biases, lora_as, lora_bs, scalings, top_k_indices,
                                                 top_k_weights))]
    else:
        present_biases = [b for b in biases if b is not None]
        outputs = _shared_forward_op(x2d, weights, present_biases, [b is not None for b in biases], lora_as, lora_bs,
                                     scalings, top_k_indices, top_k_weights, dropout_p, seed, backend)[:-1]
    return [y.view(*leading, y.shape[-1]) for y in outputs]


def _triton_unsupported(x: torch.Tensor, lora_a: torch.Tensor) -> str | None:
    from padfree.kernels import runtime

    if not runtime.HAS_TRITON:
        return "triton is not installed"
    return _kernels().unsupported_reason(x, lora_a.shape[0], lora_a.shape[1])


def sequence_routing(adapter_ids: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index (num_tokens, 1) int64, top_k_weights (num_tokens, 1) fp32) sending every token
    of packed sequence i to adapter adapter_ids[i] with weight 1; tokens at or past cu_seqlens[-1]
    get weight 0 (adapter 0, which then adds nothing). Computed on the device, no host sync."""
    positions = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    inside = sequence < adapter_ids.shape[0]
    adapter = adapter_ids.long()[sequence.clamp_max(adapter_ids.shape[0] - 1)]
    index = torch.where(inside, adapter, torch.zeros_like(adapter))
    return index[:, None], inside.to(torch.float32)[:, None]


def lora_per_sequence_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, scaling: float, adapter_ids: torch.Tensor,
                             cu_seqlens: torch.Tensor, dropout_p: float = 0.0, *,
                             check: bool | None = None) -> torch.Tensor:
    """A frozen linear layer with one LoRA adapter per packed sequence.

        y_m = x_m @ weight.T + bias + scaling * dropout(x_m) @ lora_a[a].T @ lora_b[a].T,
        a = adapter_ids[i] for token m of sequence i (cu_seqlens[i] <= m < cu_seqlens[i + 1])

    Tokens at or past cu_seqlens[-1] (padding) get the base output x @ weight.T + bias only. Each
    adapter's gradient comes only from its own sequences; an adapter no sequence uses gets zero.

    Args:
        x: (..., in_features), the packed tokens (any leading shape, e.g. (1, total, in_features)).
        weight, bias, lora_a (num_adapters, rank, in_features), lora_b (num_adapters, out_features,
            rank), scaling, dropout_p: as in `lora_mixture_linear`.
        adapter_ids: (batch,) int32/int64 adapters in 0..num_adapters-1, one per packed sequence.
        cu_seqlens: (batch + 1,) int32 sequence offsets (flash-attn convention).
        check: run the checks that copy cu_seqlens and adapter_ids to the host (None: on unless
            PADFREE_CHECKS=0; skipped inside torch.compile); the routing itself never syncs.

    This is `lora_mixture_linear` with top-1 routing of weight 1 built from cu_seqlens on the device
    (`sequence_routing`); the routing weights are constants and get no gradient.
    """
    _checks.expect_tensor("x", x)
    _checks.expect_tensor("adapter_ids", adapter_ids)
    _checks.expect_dtype("adapter_ids", adapter_ids, INDEX_DTYPES)
    _checks.expect_dim("adapter_ids", adapter_ids, 1, "(batch,)")
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., in_features), got {tuple(x.shape)}")
    num_tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    values = _checks.value_checks_enabled(check)
    _checks.check_cu_seqlens("cu_seqlens", cu_seqlens, num_tokens, num_tokens, "num_tokens", values=values)
    if adapter_ids.shape[0] != cu_seqlens.shape[0] - 1:
        raise ValueError(f"adapter_ids must have one entry per sequence ({cu_seqlens.shape[0] - 1} for cu_seqlens "
                         f"{tuple(cu_seqlens.shape)}), got {tuple(adapter_ids.shape)}")
    _checks.expect_same_device(x=x, adapter_ids=adapter_ids, cu_seqlens=cu_seqlens)
    if values and isinstance(lora_a, torch.Tensor) and lora_a.dim() == 3:
        low, high = int(adapter_ids.min()), int(adapter_ids.max())
        if low < 0 or high >= lora_a.shape[0]:
            raise ValueError(f"adapter_ids holds adapter {low if low < 0 else high}, "
                             f"outside 0..{lora_a.shape[0] - 1}")
    top_k_index, top_k_weights = sequence_routing(adapter_ids, cu_seqlens, num_tokens)
    return lora_mixture_linear(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p,
                               check=False)
