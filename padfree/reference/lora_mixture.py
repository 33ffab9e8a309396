"""Plain-PyTorch mixture of LoRA experts: the CPU implementation and the test oracle.

Experts e = 0..E-1 share one frozen linear layer (W, b) and one scaling s; each has its own
A_e (r, K) and B_e (N, r). Token m is routed to experts top_k_index[m, j] with weights
top_k_weights[m, j] (j = 0..k-1), and

    y_m = x_m W^T + b + s * sum_j w_mj * dropout(x_m) A_{e_mj}^T B_{e_mj}^T

This module computes it the way a PEFT user writes it: a Python loop over the experts, each
adding its LoRA update on every token times the token's gate for it,

    g_e[m] = sum_j w_mj [e_mj == e]        (0 for a token that did not choose e; a repeated choice
                                            adds up)
    y     += s * (g_e * (dropout(x) A_e^T)) B_e^T

so it does not rely on the concatenated-rank identity the Triton path uses
(padfree/kernels/lora_mixture.py). `forward` run under autograd (in float64) is the tests'
oracle; `backward` is its hand-derived gradient, the reference backend's backward. The dropout
mask is the one of `padfree.reference.lora` (stream 0: one mask on x, shared by the experts, as
in `lora_linear`); the gate multiply runs in the gate weights' dtype (fp32 in the op).

Backward, with h_e = dropout(x) A_e^T (M, r) saved by the forward and t_e = s * dy B_e (M, r):

    dB_e = s * dy^T (g_e * h_e)                     dA_e = (g_e * t_e)^T dropout(x)
    dx   = dy W + sum_e D(g_e * t_e) A_e            D(z) = keep * z / (1 - p), its own adjoint
    dg_e = rowsum(t_e * h_e)                        dw_mj = dg_{e_mj}[m]

Shared-input groups (q/k/v, gate/up: projections p = 0..P-1 reading one x, each with its own
W_p, b_p, experts, scaling and routing): projection p is the mixture above with the mask of stream
p (`lora.stream_seed(seed, p)`, independent per projection as in `lora_linear_shared`), h is the
concatenation of the projections' h_p, and dx is the sum of the projections' dx.
"""

from __future__ import annotations

import torch

from padfree.reference import lora


def _keep_scaled(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """keep / (1 - p) as x's dtype, the factor dropout multiplies x by (stream 0 of the LoRA mask)."""
    keep = lora.keep_mask(seed, 0, x.shape[0], x.shape[1], dropout_p, x.device)
    return keep.to(x.dtype) / (1.0 - dropout_p)


def _dropout(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    return x if dropout_p == 0.0 else x * _keep_scaled(x, dropout_p, seed)


def expert_gate(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert: int) -> torch.Tensor:
    """g_e (M,): each token's total routing weight for `expert`, 0 where it was not chosen."""
    return (top_k_weights * (top_k_index == expert).to(top_k_weights.dtype)).sum(1)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
            lora_b: torch.Tensor, scaling: float, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y (M, N), h (M, E * r) = [dropout(x) A_e^T]_e) for 2-D x (M, K); differentiable."""
    dropped = _dropout(x, dropout_p, seed)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    intermediates = []
    for expert in range(lora_a.shape[0]):
        h = dropped @ lora_a[expert].t()
        gate = expert_gate(top_k_index, top_k_weights, expert)
        gated = (h.to(gate.dtype) * gate[:, None]).to(x.dtype)
        y = y + scaling * (gated @ lora_b[expert].t())
        intermediates.append(h)
    return y, torch.cat(intermediates, dim=1)


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, lora_a: torch.Tensor,
             lora_b: torch.Tensor, scaling: float, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
             dropout_p: float, seed: int, input_grad: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, K), d lora_a (E, r, K), d lora_b (E, N, r), d top_k_weights (M, k)) from the
    formulas in the module docstring; dx is an empty (0,) tensor when `input_grad` is False."""
    num_experts, rank, _ = lora_a.shape
    keep = _keep_scaled(x, dropout_p, seed) if dropout_p > 0 else None
    dropped = x if keep is None else x * keep
    dx = dy @ weight if input_grad else x.new_empty(0)
    d_lora_a, d_lora_b = torch.empty_like(lora_a), torch.empty_like(lora_b)
    d_weights = torch.zeros_like(top_k_weights)
    for expert in range(num_experts):
        h_e = h[:, expert * rank:(expert + 1) * rank]
        gate = expert_gate(top_k_index, top_k_weights, expert)
        t = scaling * (dy @ lora_b[expert])
        d_lora_b[expert] = scaling * (dy.t() @ (h_e.to(gate.dtype) * gate[:, None]).to(x.dtype))
        d_gate = (t.to(gate.dtype) * h_e.to(gate.dtype)).sum(1)
        d_weights += (top_k_index == expert).to(d_weights.dtype) * d_gate[:, None]
        d_h = (t.to(gate.dtype) * gate[:, None]).to(x.dtype)
        d_lora_a[expert] = d_h.t() @ dropped
        if input_grad:
            d_x_lora = d_h @ lora_a[expert]
            dx = dx + (d_x_lora if keep is None else d_x_lora * keep)
    return dx, d_lora_a, d_lora_b, d_weights


def forward_shared(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                   lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], scalings: list[float],
                   top_k_indices: list[torch.Tensor], top_k_weights: list[torch.Tensor], dropout_p: float,
                   seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> ([y_p (M, N_p)], h (M, sum_p E_p * r_p)) of a shared-input group (module docstring)."""
    outputs, intermediates = [], []
    for stream, layer in enumerate(zip(weights, biases, lora_as, lora_bs, scalings, top_k_indices, top_k_weights)):
        y, h = forward(x, *layer, dropout_p, lora.stream_seed(seed, stream))
        outputs.append(y)
        intermediates.append(h)
    return outputs, torch.cat(intermediates, dim=1)


def backward_shared(dys: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor], h: torch.Tensor,
                    lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], scalings: list[float],
                    top_k_indices: list[torch.Tensor], top_k_weights: list[torch.Tensor], dropout_p: float,
                    seed: int, input_grad: bool = True) -> list[torch.Tensor]:
    """-> [dx, d lora_a_p..., d lora_b_p..., d top_k_weights_p...] of a shared-input group: each
    projection's `backward`, dx summed (an empty (0,) tensor when `input_grad` is False)."""
    dx = x.new_empty(0)
    d_as, d_bs, d_weights = [], [], []
    start = 0
    for stream, (dy, weight, lora_a, lora_b, scaling, index, gates) in enumerate(
            zip(dys, weights, lora_as, lora_bs, scalings, top_k_indices, top_k_weights)):
        end = start + lora_a.shape[0] * lora_a.shape[1]
        dx_p, d_a, d_b, d_w = backward(dy, x, weight, h[:, start:end], lora_a, lora_b, scaling, index, gates,
                                       dropout_p, lora.stream_seed(seed, stream), input_grad)
        dx = dx_p if stream == 0 else dx + dx_p
        d_as.append(d_a)
        d_bs.append(d_b)
        d_weights.append(d_w)
        start = end
    return [dx, *d_as, *d_bs, *d_weights]
