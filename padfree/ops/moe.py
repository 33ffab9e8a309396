"""`moe_route` and `moe_experts`: MoE routing and gated experts as torch custom ops.

Custom ops (opaque to `torch.compile`, with fake impls and autograd):
  padfree::moe_route_fwd / moe_route_bwd      softmax|sigmoid -> (group-limited) top-k -> renormalise
  padfree::moe_experts_fwd / moe_experts_bwd  grouped gate_up GEMM (+ SiLU*up) -> grouped down GEMM
  padfree::moe_align                          (padfree._C, C++ on CPU / CUDA on GPU) the expert-sorted,
                                              block-padded pair list the grouped GEMMs walk

The backend ("triton" or "reference") is chosen in Python and passed to the ops as an argument,
so a compiled graph records the choice and the backward uses the same one. The Triton path copies
no device data to the host except the optional value checks (`check=`); the reference loops over
experts on the host (it is the CPU backend and the test oracle).
"""

from __future__ import annotations

import math

import torch

from padfree import _backend, _checks, _ext
from padfree.ops import _autocast
from padfree.reference import moe as reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROUTE_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu",)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_CUDA_ALIGN_EXPERTS = 1024  # csrc/moe_align.cpp kMaxCudaExperts


def _route_kernels():
    from padfree.kernels import moe_route

    return moe_route


def _experts_kernels():
    from padfree.kernels import moe

    return moe


# ---------------------------------------------------------------------------------------- align

def _align_fake(top_k_index, num_experts, block_size):
    num_pairs = top_k_index.numel()
    num_blocks = (num_pairs + num_experts * (block_size - 1) + block_size - 1) // block_size
    new = top_k_index.new_empty
    return (new(num_blocks * block_size, dtype=torch.int32), new(num_blocks, dtype=torch.int32),
            new(num_experts + 1, dtype=torch.int32), new(num_pairs, dtype=torch.int32))


_ext.register_fake("moe_align", _align_fake)


@torch.compiler.assume_constant_result
def _has_native_align(device: torch.device) -> bool:
    """`padfree._C` loaded, with moe_align (an older cached build may lack it) for this device."""
    return _ext.load() and hasattr(torch.ops.padfree, "moe_align") and _ext.has_kernel("moe_align", device)


def moe_align(top_k_index: torch.Tensor, num_experts: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, choice) pairs by expert into a block-padded list; no device->host copy.

    Returns int32 (sorted_pairs, block_expert, padded_offsets, pair_position), see
    `padfree.reference.moe.align`. Runs `padfree::moe_align` from `padfree._C` (C++ on CPU, CUDA on
    GPU); without `_C` the PyTorch version runs and a warning says so once.
    """
    cuda_limit = top_k_index.device.type == "cuda" and num_experts > MAX_CUDA_ALIGN_EXPERTS
    if _has_native_align(top_k_index.device) and not cuda_limit:
        return torch.ops.padfree.moe_align(top_k_index, num_experts, block_size)
    _backend.warn_once("moe_align", f"padfree.moe_align: no padfree._C kernel for {top_k_index.device.type} "
                                    "tensors; using the PyTorch version")
    return reference.align(top_k_index, num_experts, block_size)


# ---------------------------------------------------------------------------------------- route

@torch.library.custom_op("padfree::moe_route_fwd", mutates_args=())
@_autocast.disabled
def _route_forward_op(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, scoring: str,
                      normalize: bool, n_group: int, topk_group: int, routed_scaling_factor: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _route_kernels().forward(router_logits, correction_bias, top_k, scoring, normalize, n_group,
                                        topk_group, routed_scaling_factor)
    weights, index = reference.route(router_logits, top_k, scoring, normalize, correction_bias, n_group,
                                     topk_group, routed_scaling_factor)
    return weights.float(), index


@_route_forward_op.register_fake
def _(router_logits, correction_bias, top_k, scoring, normalize, n_group, topk_group, routed_scaling_factor,
      backend):
    num_tokens = router_logits.shape[0]
    return (router_logits.new_empty(num_tokens, top_k, dtype=torch.float32),
            router_logits.new_empty(num_tokens, top_k, dtype=torch.int64))


@torch.library.custom_op("padfree::moe_route_bwd", mutates_args=())
@_autocast.disabled
def _route_backward_op(grad_weights: torch.Tensor, router_logits: torch.Tensor, weights: torch.Tensor,
                       index: torch.Tensor, scoring: str, normalize: bool, routed_scaling_factor: float,
                       backend: str) -> torch.Tensor:
    if backend == "triton":
        return _route_kernels().backward(grad_weights, router_logits, weights, index, scoring, normalize,
                                         routed_scaling_factor)
    return reference.route_backward(grad_weights, router_logits, weights, index, scoring, normalize,
                                    routed_scaling_factor)


@_route_backward_op.register_fake
def _(grad_weights, router_logits, weights, index, scoring, normalize, routed_scaling_factor, backend):
    return torch.empty_like(router_logits)


def _route_setup_context(ctx, inputs, output):
    router_logits, _, _, scoring, normalize, _, _, routed_scaling_factor, backend = inputs
    weights, index = output
    ctx.save_for_backward(router_logits, weights, index)
    ctx.options = (scoring, normalize, routed_scaling_factor, backend)
    ctx.mark_non_differentiable(index)


@_autocast.disabled
def _route_backward(ctx, grad_weights, grad_index):
    router_logits, weights, index = ctx.saved_tensors
    scoring, normalize, routed_scaling_factor, backend = ctx.options
    grad_logits = _route_backward_op(grad_weights.contiguous(), router_logits, weights, index, scoring, normalize,
                                     routed_scaling_factor, backend)
    return grad_logits, None, None, None, None, None, None, None, None


_route_forward_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def _validate_route(router_logits, top_k, scoring, correction_bias, n_group, topk_group, routed_scaling_factor):
    _checks.expect_tensor("router_logits", router_logits)
    _checks.expect_dim("router_logits", router_logits, 2, "(num_tokens, num_experts)")
    _checks.expect_dtype("router_logits", router_logits, ROUTE_LOGIT_DTYPES)
    num_experts = router_logits.shape[1]
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in 1..num_experts ({num_experts}), got {top_k!r}")
    if not isinstance(n_group, int) or n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group must be a positive int dividing num_experts ({num_experts}), got {n_group!r}")
    if n_group > 1 and num_experts // n_group < 2:
        raise ValueError(f"group-limited routing scores a group by its two best experts: num_experts / n_group "
                         f"must be >= 2, got {num_experts} / {n_group}")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be an int in 1..n_group ({n_group}), got {topk_group!r}")
    if n_group > 1 and topk_group * (num_experts // n_group) < top_k:
        raise ValueError(f"topk_group={topk_group} groups of {num_experts // n_group} experts hold fewer than "
                         f"top_k={top_k} experts")
    if not isinstance(routed_scaling_factor, (int, float)) or not math.isfinite(routed_scaling_factor):
        raise ValueError(f"routed_scaling_factor must be a finite number, got {routed_scaling_factor!r}")
    if correction_bias is not None:
        _checks.expect_tensor("correction_bias", correction_bias)
        _checks.expect_same_device(router_logits=router_logits, correction_bias=correction_bias)
        if not correction_bias.dtype.is_floating_point:
            raise TypeError(f"correction_bias must be a float tensor, got {correction_bias.dtype}")
        if tuple(correction_bias.shape) != (num_experts,):
            raise ValueError(f"correction_bias must have shape ({num_experts},), got {tuple(correction_bias.shape)}")


def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", normalize: bool = True,
              correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
              routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts: scores -> (group-limited) top-k -> renormalised weights, one kernel.

    Args:
        router_logits: (N, E) fp16/bf16/fp32 gate logits (any strides along N).
        top_k: experts per token, 1..E.
        scoring: "softmax" (Mixtral, Qwen-MoE, OLMoE) or "sigmoid" (DeepSeek-V3).
        normalize: divide the k weights by their sum (+1e-20).
        correction_bias: optional (E,) float added to the scores for the choice only
            (DeepSeek-V3's e_score_correction_bias); the weights use the unbiased scores.
        n_group, topk_group: group-limited routing: the E experts form n_group groups, a group
            scores the sum of its two best (biased) scores, and only the topk_group best groups
            are eligible.
        routed_scaling_factor: multiplies the final weights.

    Autocast changes nothing here: the logits are taken in the dtype they come in (a router
    linear under autocast gives bf16/fp16 ones) and the scores and weights are always computed
    and returned in fp32, inside autocast or not (transformers' routers also softmax in fp32).

    Returns:
        (top_k_weights (N, k) float32, top_k_index (N, k) int64), choices in descending score
        order. Differentiable w.r.t. router_logits through the weights (the choice itself is
        piecewise constant); derivation in `padfree.reference.moe`.
    """
    _validate_route(router_logits, top_k, scoring, correction_bias, n_group, topk_group, routed_scaling_factor)
    backend = _backend.resolve("moe_route", router_logits.device,
                               triton_unsupported=lambda: _route_triton_unsupported(router_logits, top_k, n_group))
    if correction_bias is not None:
        correction_bias = correction_bias.float().contiguous()
    return _route_forward_op(router_logits, correction_bias, top_k, scoring, bool(normalize), n_group, topk_group,
                             float(routed_scaling_factor), backend)


def _route_triton_unsupported(router_logits: torch.Tensor, top_k: int, n_group: int) -> str | None:
    from padfree.kernels import runtime

    if not runtime.HAS_TRITON:
        return "triton is not installed"
    return _route_kernels().unsupported_reason(router_logits, top_k, n_group)


# -------------------------------------------------------------------------------------- experts

@torch.library.custom_op("padfree::moe_experts_fwd", mutates_args=())
@_autocast.disabled
def _experts_forward_op(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        gate_up_proj: torch.Tensor, down_proj: torch.Tensor, sorted_pairs: torch.Tensor,
                        block_expert: torch.Tensor, padded_offsets: torch.Tensor, pair_position: torch.Tensor,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _experts_kernels().forward(hidden_states, gate_up_proj, down_proj,
                                          top_k_weights.reshape(-1).contiguous(), top_k_index.shape[1],
                                          sorted_pairs, block_expert)
    out = reference.experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    return out, hidden_states.new_empty(0, gate_up_proj.shape[1])


@_experts_forward_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, sorted_pairs, block_expert,
      padded_offsets, pair_position, backend):
    saved_rows = sorted_pairs.shape[0] if backend == "triton" else 0
    return torch.empty_like(hidden_states), hidden_states.new_empty(saved_rows, gate_up_proj.shape[1])


@torch.library.custom_op("padfree::moe_experts_bwd", mutates_args=())
@_autocast.disabled
def _experts_backward_op(grad_out: torch.Tensor, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                         gate_up: torch.Tensor, sorted_pairs: torch.Tensor, block_expert: torch.Tensor,
                         padded_offsets: torch.Tensor, pair_position: torch.Tensor, expert_grads: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Without `expert_grads` (frozen experts, e.g. LoRA elsewhere) the two weight-gradient kernels
    do not run and d gate_up_proj / d down_proj come back empty."""
    if backend == "triton":
        grad_x, grad_weights, grad_gate_up, grad_down = _experts_kernels().backward(
            grad_out, hidden_states, gate_up_proj, down_proj, top_k_weights.reshape(-1).contiguous(), gate_up,
            top_k_index.shape[1], sorted_pairs, block_expert, padded_offsets, pair_position, expert_grads)
        return grad_x, grad_weights.view(top_k_weights.shape), grad_gate_up, grad_down
    grads = reference.experts_backward(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    if expert_grads:
        return grads
    return grads[0], grads[1], gate_up_proj.new_empty(0), down_proj.new_empty(0)


@_experts_backward_op.register_fake
def _(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up, sorted_pairs,
      block_expert, padded_offsets, pair_position, expert_grads, backend):
    if not expert_grads:
        return (torch.empty_like(hidden_states), torch.empty_like(top_k_weights), gate_up_proj.new_empty(0),
                down_proj.new_empty(0))
    return (torch.empty_like(hidden_states), torch.empty_like(top_k_weights),
            gate_up_proj.new_empty(gate_up_proj.shape), down_proj.new_empty(down_proj.shape))


def _experts_setup_context(ctx, inputs, output):
    (hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, sorted_pairs, block_expert,
     padded_offsets, pair_position, backend) = inputs
    ctx.save_for_backward(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, output[1],
                          sorted_pairs, block_expert, padded_offsets, pair_position)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


@_autocast.disabled
def _experts_backward(ctx, grad_out, grad_gate_up):
    (hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up, sorted_pairs, block_expert,
     padded_offsets, pair_position) = ctx.saved_tensors
    expert_grads = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    grads = _experts_backward_op(grad_out.contiguous(), hidden_states, top_k_index, top_k_weights, gate_up_proj,
                                 down_proj, gate_up, sorted_pairs, block_expert, padded_offsets, pair_position,
                                 expert_grads, ctx.backend)
    grad_x, grad_weights, grad_gate_up_proj, grad_down = grads
    if not expert_grads:
        grad_gate_up_proj = grad_down = None
    return grad_x, None, grad_weights, grad_gate_up_proj, grad_down, None, None, None, None, None


_experts_forward_op.register_autograd(_experts_backward, setup_context=_experts_setup_context)


def _validate_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, check):
    for name, value in (("hidden_states", hidden_states), ("top_k_index", top_k_index),
                        ("top_k_weights", top_k_weights), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        _checks.expect_tensor(name, value)
    _checks.expect_dim("hidden_states", hidden_states, 2, "(num_tokens, hidden)")
    _checks.expect_dim("top_k_index", top_k_index, 2, "(num_tokens, top_k)")
    _checks.expect_dim("top_k_weights", top_k_weights, 2, "(num_tokens, top_k)")
    _checks.expect_dim("gate_up_proj", gate_up_proj, 3, "(num_experts, 2 * intermediate, hidden)")
    _checks.expect_dim("down_proj", down_proj, 3, "(num_experts, hidden, intermediate)")
    _checks.expect_dtype("hidden_states", hidden_states, DTYPES)
    _checks.expect_dtype("top_k_index", top_k_index, INDEX_DTYPES)
    if not top_k_weights.dtype.is_floating_point:
        raise TypeError(f"top_k_weights must be a float tensor, got {top_k_weights.dtype}")
    _checks.expect_same_dtype(hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj)
    _checks.expect_same_device(hidden_states=hidden_states, top_k_index=top_k_index, top_k_weights=top_k_weights,
                               gate_up_proj=gate_up_proj, down_proj=down_proj)
    num_tokens, hidden = hidden_states.shape
    num_experts, double_inter, weight_hidden = gate_up_proj.shape
    if top_k_index.shape[0] != num_tokens or top_k_index.shape[1] < 1:
        raise ValueError(f"top_k_index must have shape ({num_tokens}, top_k) with top_k >= 1, "
                         f"got {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_weights must have the shape of top_k_index {tuple(top_k_index.shape)}, "
                         f"got {tuple(top_k_weights.shape)}")
    if weight_hidden != hidden or double_inter % 2 or double_inter == 0:
        raise ValueError(f"gate_up_proj must have shape (num_experts, 2 * intermediate, {hidden}), "
                         f"got {tuple(gate_up_proj.shape)}")
    if tuple(down_proj.shape) != (num_experts, hidden, double_inter // 2):
        raise ValueError(f"down_proj must have shape ({num_experts}, {hidden}, {double_inter // 2}) to match "
                         f"gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if _checks.value_checks_enabled(check) and top_k_index.numel():
        low, high = int(top_k_index.min()), int(top_k_index.max())
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            raise ValueError(f"top_k_index holds expert {bad}, outside 0..{num_experts - 1}")


def moe_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str = "silu", *,
                check: bool | None = None) -> torch.Tensor:
    """Gated MoE experts in transformers-5 layout, dropless, deterministic (no atomics).

    out[t] = sum_j top_k_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = top_k_index[t, j].

    Args:
        hidden_states: (N, H) fp16/bf16/fp32.
        top_k_index: (N, k) int32/int64 experts in 0..E-1.
        top_k_weights: (N, k) any float dtype; computed in fp32, its gradient has its dtype.
        gate_up_proj: (E, 2I, H) = [gate; up] rows, hidden_states' dtype, any strides.
        down_proj: (E, H, I), any strides.
        activation: "silu".
        check: run the check that copies top_k_index's range to the host (None: on unless
            PADFREE_CHECKS=0; skipped inside torch.compile). Shape/dtype/device checks always run.

    Autocast: inside `torch.autocast`, hidden_states, gate_up_proj and down_proj are cast to the
    autocast dtype first (fp32 expert weights with bf16 activations are fine), the routing weights
    stay fp32 as always, and gradients reach fp32 parameters in fp32.

    Returns (N, H) in hidden_states' dtype (the autocast dtype under autocast). Differentiable
    w.r.t. hidden_states, top_k_weights, gate_up_proj and down_proj; experts with no token get a
    zero gradient. The backward keeps only the gate/up pre-activations of the forward and
    recomputes the SiLU product.
    """
    hidden_states, gate_up_proj, down_proj = _autocast.cast_inputs(hidden_states, gate_up_proj, down_proj)
    _validate_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, check)
    if hidden_states.stride(-1) != 1:
        hidden_states = hidden_states.contiguous()
    backend = _backend.resolve("moe_experts", hidden_states.device,
                               triton_unsupported=lambda: _experts_triton_unsupported(hidden_states))
    weights = top_k_weights.float()
    num_experts = gate_up_proj.shape[0]
    if backend == "triton":
        block = _experts_kernels().ALIGN_BLOCK
        sorted_pairs, block_expert, padded_offsets, pair_position = moe_align(top_k_index, num_experts, block)
    else:
        sorted_pairs, block_expert, padded_offsets, pair_position = (
            top_k_index.new_empty(0, dtype=torch.int32) for _ in range(4))
    out, _ = _experts_forward_op(hidden_states, top_k_index, weights, gate_up_proj, down_proj, sorted_pairs,
                                 block_expert, padded_offsets, pair_position, backend)
    return out


def _experts_triton_unsupported(hidden_states: torch.Tensor) -> str | None:
    from padfree.kernels import runtime

    if not runtime.HAS_TRITON:
        return "triton is not installed"
    return _experts_kernels().unsupported_reason(hidden_states)
