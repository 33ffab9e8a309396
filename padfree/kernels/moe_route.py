"""Triton kernels of `padfree.moe_route`: scores -> (group-limited) top-k -> renormalise, one pass.

Each program holds BLOCK_T tokens x all E experts (E padded to BLOCK_E) in registers.

Forward (math in `padfree.reference.moe`):
    p = softmax(logits) or sigmoid(logits) in fp32;  c = p + bias (bias: zeros unless given)
    group-limited (n_group > 1): group score = max1 + max2 of c in the group; the topk_group best
    groups stay, other experts get c = -inf
    k times: i_j = argmax c (lowest index on ties), w_j = p[i_j], c[i_j] = -inf
    a NaN c counts as +inf: a NaN logit makes p NaN, and no expert would equal a NaN maximum (the
    pick would be the out-of-range BLOCK_E with weight 0, a row the experts never write); so the
    row picks real experts and its NaN weight reaches the output
    w = s * w / (sum w + 1e-20) when normalising, else s * w.
Backward (the choice is constant almost everywhere, so only w carries gradient):
    dp[i_j] = (s dw_j - sum_l dw_l w_l) / S  (normalised; S = sum_l p[i_l] + 1e-20)  or  s dw_j
    softmax: dlogits = p (dp - sum_e dp_e p_e)      [d p_e / d x_f = p_e (delta_ef - p_f)]
    sigmoid: dlogits = dp p (1 - p)
top_k, n_group, topk_group, scoring and normalize are runtime arguments (k and groups loop at run
time), so only BLOCK_E specialises the code; num_tokens, which changes every batch, is
`do_not_specialize`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from padfree.kernels import registry, runtime
from padfree.kernels.common import DTYPES

MAX_TOP_K = 16
MAX_GROUPS = 16
MAX_EXPERTS = 512
BLOCK_ES = (16, 64, 256, 512)
ELEMENTS_PER_PROGRAM = 1024
NORMALIZE_EPS = 1e-20


@triton.jit
def _scores(logits_ptr, rows, cols, row_ok, col_ok, stride_row, sigmoid):
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if sigmoid:
        p = tl.sigmoid(x)
    else:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
    return tl.where(col_ok[None, :], p, 0.0)


@triton.jit(do_not_specialize=["num_tokens"])
def moe_route_kernel(logits_ptr, bias_ptr, weights_ptr, index_ptr, num_tokens, num_experts, stride_row, top_k,
                     sigmoid, normalize, n_group, topk_group, scale,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, MAX_K: tl.constexpr, MAX_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    p = _scores(logits_ptr, rows, cols, row_ok, col_ok, stride_row, sigmoid)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    choice = p + bias[None, :]
    choice = tl.where(choice != choice, float("inf"), choice)
    choice = tl.where(col_ok[None, :], choice, float("-inf"))
    if n_group > 1:
        group_size = num_experts // n_group
        group_of = cols // group_size
        group_ids = tl.arange(0, MAX_G)
        group_score = tl.full((BLOCK_T, MAX_G), float("-inf"), tl.float32)
        for g in range(0, n_group):
            in_group = (group_of == g)[None, :] & col_ok[None, :]
            member = tl.where(in_group, choice, float("-inf"))
            best = tl.max(member, axis=1)
            first = tl.min(tl.where(member == best[:, None], cols[None, :], BLOCK_E), axis=1)
            second = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), member), axis=1)
            group_score = tl.where(group_ids[None, :] == g, (best + second)[:, None], group_score)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in range(0, topk_group):
            best = tl.max(group_score, axis=1)
            chosen = tl.min(tl.where(group_score == best[:, None], group_ids[None, :], MAX_G), axis=1)
            group_score = tl.where(group_ids[None, :] == chosen[:, None], float("-inf"), group_score)
            keep = keep | (group_of[None, :] == chosen[:, None])
        choice = tl.where(keep, choice, float("-inf"))
    slots = tl.arange(0, MAX_K)
    weights = tl.zeros((BLOCK_T, MAX_K), dtype=tl.float32)
    index = tl.zeros((BLOCK_T, MAX_K), dtype=tl.int32)
    for j in range(0, top_k):
        best = tl.max(choice, axis=1)
        chosen = tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == chosen[:, None]
        weights = tl.where(slots[None, :] == j, tl.sum(tl.where(hit, p, 0.0), axis=1)[:, None], weights)
        index = tl.where(slots[None, :] == j, chosen[:, None], index)
        choice = tl.where(hit, float("-inf"), choice)
    if normalize:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    out = rows[:, None].to(tl.int64) * top_k + slots[None, :]
    out_mask = row_ok[:, None] & (slots[None, :] < top_k)
    tl.store(weights_ptr + out, weights * scale, mask=out_mask)
    tl.store(index_ptr + out, index.to(tl.int64), mask=out_mask)


@triton.jit(do_not_specialize=["num_tokens"])
def moe_route_backward_kernel(grad_weights_ptr, logits_ptr, weights_ptr, index_ptr, grad_logits_ptr, num_tokens,
                              num_experts, stride_row, top_k, sigmoid, normalize, scale,
                              BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    p = _scores(logits_ptr, rows, cols, row_ok, col_ok, stride_row, sigmoid)
    pair_rows = rows.to(tl.int64) * top_k
    chosen_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    grad_dot_weights = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in range(0, top_k):
        grad_w = tl.load(grad_weights_ptr + pair_rows + j, mask=row_ok, other=0.0)
        weight = tl.load(weights_ptr + pair_rows + j, mask=row_ok, other=0.0)
        expert = tl.load(index_ptr + pair_rows + j, mask=row_ok, other=0)
        chosen_sum += tl.sum(tl.where(cols[None, :] == expert[:, None], p, 0.0), axis=1)
        grad_dot_weights += grad_w * weight
    grad_p = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in range(0, top_k):
        grad_w = tl.load(grad_weights_ptr + pair_rows + j, mask=row_ok, other=0.0)
        expert = tl.load(index_ptr + pair_rows + j, mask=row_ok, other=0)
        if normalize:
            coefficient = (scale * grad_w - grad_dot_weights) / (chosen_sum + 1e-20)
        else:
            coefficient = scale * grad_w
        grad_p += tl.where(cols[None, :] == expert[:, None], coefficient[:, None], 0.0)
    if sigmoid:
        grad = grad_p * p * (1.0 - p)
    else:
        grad = p * (grad_p - tl.sum(grad_p * p, axis=1)[:, None])
    tl.store(grad_logits_ptr + rows[:, None].to(tl.int64) * num_experts + cols[None, :],
             grad.to(grad_logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _block_t(block_e: int) -> int:
    return max(1, ELEMENTS_PER_PROGRAM // block_e)


def _route_launches():
    for dtype_name in (info.name for info in DTYPES.values()):
        for block_e in BLOCK_ES:
            signature = registry.signature(moe_route_kernel, {
                "logits_ptr": f"*{dtype_name}", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "index_ptr": "*i64",
                "sigmoid": "i1", "normalize": "i1", "scale": "fp32"})
            yield registry.Launch(f"{dtype_name} E<={block_e}", signature,
                                  {"BLOCK_T": _block_t(block_e), "BLOCK_E": block_e, "MAX_K": MAX_TOP_K,
                                   "MAX_G": MAX_GROUPS})


def _route_backward_launches():
    for dtype_name in (info.name for info in DTYPES.values()):
        for block_e in BLOCK_ES:
            signature = registry.signature(moe_route_backward_kernel, {
                "grad_weights_ptr": "*fp32", "logits_ptr": f"*{dtype_name}", "weights_ptr": "*fp32",
                "index_ptr": "*i64", "grad_logits_ptr": f"*{dtype_name}", "sigmoid": "i1", "normalize": "i1",
                "scale": "fp32"})
            yield registry.Launch(f"{dtype_name} E<={block_e}", signature,
                                  {"BLOCK_T": _block_t(block_e), "BLOCK_E": block_e})


registry.register(moe_route_kernel, _route_launches)
registry.register(moe_route_backward_kernel, _route_backward_launches)


def unsupported_reason(router_logits: torch.Tensor, top_k: int, n_group: int) -> str | None:
    if router_logits.shape[1] > MAX_EXPERTS:
        return f"{router_logits.shape[1]} experts (the routing kernel holds at most {MAX_EXPERTS})"
    if top_k > MAX_TOP_K or n_group > MAX_GROUPS:
        return f"top_k={top_k}, n_group={n_group} (the routing kernel supports <= {MAX_TOP_K}, <= {MAX_GROUPS})"
    return None


def _block_e(num_experts: int) -> int:
    return max(BLOCK_ES[0], triton.next_power_of_2(num_experts))


@runtime.on_input_device
def forward(router_logits, correction_bias, top_k, scoring, normalize, n_group, topk_group, routed_scaling_factor):
    """-> (weights (N, k) fp32, index (N, k) int64)."""
    num_tokens, num_experts = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    device = router_logits.device
    bias = correction_bias if correction_bias is not None else torch.zeros(num_experts, device=device)
    weights = runtime.empty((num_tokens, top_k), torch.float32, device)
    index = runtime.empty((num_tokens, top_k), torch.int64, device)
    block_e = _block_e(num_experts)
    block_t = _block_t(block_e)
    moe_route_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, bias, weights, index, num_tokens, num_experts, router_logits.stride(0), top_k,
        scoring == "sigmoid", normalize, n_group, topk_group, routed_scaling_factor,
        BLOCK_T=block_t, BLOCK_E=block_e, MAX_K=MAX_TOP_K, MAX_G=MAX_GROUPS)
    return weights, index


@runtime.on_input_device
def backward(grad_weights, router_logits, weights, index, scoring, normalize, routed_scaling_factor):
    """-> d router_logits (N, E) in router_logits' dtype."""
    num_tokens, num_experts = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    grad_logits = runtime.empty((num_tokens, num_experts), router_logits.dtype, router_logits.device)
    block_e = _block_e(num_experts)
    block_t = _block_t(block_e)
    moe_route_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
        grad_weights.float().contiguous(), router_logits, weights, index, grad_logits, num_tokens, num_experts,
        router_logits.stride(0), index.shape[1], scoring == "sigmoid", normalize,
        routed_scaling_factor, BLOCK_T=block_t, BLOCK_E=block_e)
    return grad_logits
