"""Mixture of LoRA experts on the fused-LoRA Triton kernels (padfree/kernels/lora.py); see
padfree/ops/lora_mixture.py for the op and padfree/reference/lora_mixture.py for the loop it equals.

Few experts with a small rank (E * r <= 256): the mixture is one LoRA of rank R = E * r with a
per-token gate on its intermediate. With A_all = cat_e A_e (R, K) (expert e owns rows e*r..e*r+r-1,
a free view of lora_a (E, r, K)), B_all (N, R) with B_all[:, e*r + c] = B_e[:, c], and the dense
gate G (M, E), G[m, e] = sum_j w_mj [e_mj == e], repeated r times along the rank (g (M, R)):

    h = dropout(x) A_all^T                                       lora_shrink_kernel   (M, R)
    y = x W^T + b + s * (g * h) B_all^T                          lora_forward_kernel
      = x W^T + b + s * sum_e G[:, e] * (dropout(x) A_e^T) B_e^T  (column blocks of a product add up)

which is the mixture, since G[m, e] is token m's total weight on expert e. Backward, t = s dy B_all
(M, R), whose block e is t_e = s dy B_e:

    dB_all = s dy^T (g * h)                                      torch GEMM
    dA_all = (g * t)^T dropout(x)                                lora_da_kernel (dropout), else torch
    dx     = dy W + D(g * t) A_all                               lora_dx_kernel
    dG[m, e] = sum over e's r columns of (t * h)[m, :]           dw_mj = dG[m, e_mj]

The gate multiply is a torch elementwise op between the kernel launches (the (M, R) intermediate
makes one round trip through memory); folding it into the kernels, and the segmented kernels of
the many-experts regime, are not written yet.
"""

from __future__ import annotations

import torch

from padfree.kernels import lora, runtime

MAX_TOTAL_RANK = 256


def unsupported_reason(x: torch.Tensor, num_experts: int, rank: int) -> str | None:
    """Why these kernels cannot run this input, or None."""
    if num_experts * rank > MAX_TOTAL_RANK:
        return (f"num_experts * rank = {num_experts} * {rank} exceeds {MAX_TOTAL_RANK}: the gated "
                "single-LoRA kernels cover few experts of small rank; the many-experts kernels are not written yet")
    return lora.unsupported_reason(x, 1)


def dense_gate(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """G (M, E): each token's total routing weight per expert (scatter-add, no host sync)."""
    gate = top_k_weights.new_zeros(top_k_weights.shape[0], num_experts)
    return gate.scatter_add_(1, top_k_index, top_k_weights)


def _concat_b(lora_b: torch.Tensor) -> torch.Tensor:
    """B_all (N, E * r) from lora_b (E, N, r)."""
    num_experts, out_features, rank = lora_b.shape
    return lora_b.permute(1, 0, 2).reshape(out_features, num_experts * rank)


def _gated(values: torch.Tensor, gate: torch.Tensor, rank: int) -> torch.Tensor:
    """values (M, E * r) times each token's gate of the expert owning the column, in values' dtype
    (the product is taken in the gate's dtype, fp32)."""
    m, total = values.shape
    product = values.to(gate.dtype).view(m, gate.shape[1], rank) * gate[:, :, None]
    return product.view(m, total).to(values.dtype)


@runtime.on_input_device
def forward(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed):
    """Same contract as padfree.reference.lora_mixture.forward, on the Triton kernels."""
    num_experts, rank, k = lora_a.shape
    a_all = lora_a.reshape(num_experts * rank, k)
    h = lora.shrink(x, a_all, [num_experts * rank], dropout_p, seed)
    gate = dense_gate(top_k_index, top_k_weights, num_experts)
    y = lora.expand(x, weight, bias, _gated(h, gate, rank), _concat_b(lora_b), scaling)
    return y, h


@runtime.on_input_device
def backward(dy, x, weight, h, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed,
             input_grad=True):
    """Same contract as padfree.reference.lora_mixture.backward, on the Triton kernels."""
    num_experts, rank, k = lora_a.shape
    m, out_features = dy.shape
    gate = dense_gate(top_k_index, top_k_weights, num_experts)
    t = scaling * (dy @ _concat_b(lora_b))
    d_b_all = scaling * (dy.t() @ _gated(h, gate, rank))
    d_gate = (t.to(gate.dtype) * h.to(gate.dtype)).view(m, num_experts, rank).sum(2)
    dx, d_a_all = lora.backward_input_and_a([dy], x, [weight], _gated(t, gate, rank),
                                            lora_a.reshape(num_experts * rank, k), [num_experts * rank], dropout_p,
                                            seed, input_grad)
    d_lora_b = d_b_all.view(out_features, num_experts, rank).permute(1, 0, 2).contiguous()
    return dx, d_a_all.view(num_experts, rank, k), d_lora_b, d_gate.gather(1, top_k_index)
