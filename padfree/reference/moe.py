"""Plain-PyTorch MoE routing, token alignment and gated experts, with explicit backward math.

These are the CPU backend of `padfree.moe_route` / `padfree.moe_experts` and the oracle of the
tests (run in float64). The math, shared with the Triton kernels (`padfree.kernels.moe`):

Routing (per token, E experts, k chosen):
    p = softmax(logits) | sigmoid(logits)          scores, fp32
    c = p + correction_bias                        choice scores (bias only steers the choice)
    groups: c split into n_group groups of E / n_group experts, a group's score is the sum of its
    two largest c; only experts of the topk_group best groups stay eligible (DeepSeek-V3).
    i_1..i_k = the k largest eligible c, the lowest index first on ties;  w_j = s * p_{i_j} / S  with
    S = sum_j p_{i_j} + 1e-20 when normalising (S = 1 otherwise) and s = routed_scaling_factor.
    A NaN c (a NaN logit) ranks above every number: the token still goes to real experts, with a
    NaN weight, so the NaN reaches its output row instead of leaving the row unwritten.
  Backward (the choice is piecewise constant, so only the weights carry gradient):
    dp_{i_j} = (s * dw_j - sum_l dw_l w_l) / S  (normalised),  dp_{i_j} = s * dw_j  (not),
    dp_e = 0 for experts not chosen;
    softmax: dlogits = p * (dp - sum_e dp_e p_e);  sigmoid: dlogits = dp * p * (1 - p).

Experts (pair (t, j) = token t's j-th choice, expert e = index[t, j], weight w = weights[t, j]):
    g = x_t Wg_e^T, u = x_t Wu_e^T   (gate_up_proj[e] = [Wg_e; Wu_e], (2I, H))
    h = silu(g) * u,  z = h W2_e^T   (down_proj[e] (H, I)),  out_t = sum_j w z
  Backward, with dout_t given:
    dw = <dout_t, z>,  dz = w dout_t,  dh = dz W2_e,  dW2_e = sum dz^T h
    dg = dh * u * silu'(g) with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g);  du = dh * silu(g)
    dx_t = sum_j [dg | du] [Wg_e; Wu_e],  dgate_up_proj_e = sum [dg | du]^T x_t
"""

from __future__ import annotations

import torch

NORMALIZE_EPS = 1e-20


def route_scores(router_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    logits = router_logits.float() if router_logits.dtype != torch.float64 else router_logits
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


def route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", normalize: bool = True,
          correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
          routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) logits -> (weights (N, k) fp32 (fp64 for fp64 logits), index (N, k) int64)."""
    scores = route_scores(router_logits, scoring)
    choice = scores if correction_bias is None else scores + correction_bias.to(scores.dtype)
    choice = choice.masked_fill(choice.isnan(), float("inf"))
    if n_group > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        best_groups = _largest(group_scores, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    index = _largest(choice, top_k)
    weights = scores.gather(1, index)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + NORMALIZE_EPS)
    return weights * routed_scaling_factor, index


def _largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest along the last dim, lowest index first on ties (as the kernel
    picks; torch.topk leaves the order of ties unspecified)."""
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :count]


def route_backward(grad_weights: torch.Tensor, router_logits: torch.Tensor, weights: torch.Tensor,
                   index: torch.Tensor, scoring: str, normalize: bool,
                   routed_scaling_factor: float) -> torch.Tensor:
    """d router_logits from d weights (see the module docstring)."""
    scores = route_scores(router_logits, scoring)
    grad_weights = grad_weights.to(scores.dtype)
    chosen = scores.gather(1, index)
    if normalize:
        total = chosen.sum(-1, keepdim=True) + NORMALIZE_EPS
        grad_chosen = (routed_scaling_factor * grad_weights
                       - (grad_weights * weights.to(scores.dtype)).sum(-1, keepdim=True)) / total
    else:
        grad_chosen = routed_scaling_factor * grad_weights
    grad_scores = torch.zeros_like(scores).scatter_add_(1, index, grad_chosen)
    if scoring == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1 - scores)
    return grad_logits.to(router_logits.dtype)


def align(top_k_index: torch.Tensor, num_experts: int, block_size: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, j) pairs by expert into a block-padded list, with no device->host copy.

    Returns (all int32):
      sorted_pairs (the upper bound N*k + E*(block_size-1) rounded up to a multiple of block_size,):
          flat pair ids t*k + j grouped by expert (stable: pair
          order within an expert), each expert's run padded to a multiple of block_size with the
          sentinel N*k; unused tail entries are N*k too;
      block_expert (len(sorted_pairs) / block_size,): the expert of each block, -1 past the
          last used block;
      padded_offsets (E+1,): where each expert's run starts in sorted_pairs (multiples of block);
      pair_position (N*k,): the position of each pair in sorted_pairs.
    """
    device = top_k_index.device
    experts = top_k_index.reshape(-1).long()
    num_pairs = experts.numel()
    num_blocks = (num_pairs + num_experts * (block_size - 1) + block_size - 1) // block_size
    capacity = num_blocks * block_size
    # scatter-add, not bincount: bincount reads the largest index on the host to size its result
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    padded_counts = (counts + block_size - 1) // block_size * block_size
    offsets = torch.cumsum(counts, 0) - counts
    padded_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    padded_offsets[1:] = torch.cumsum(padded_counts, 0)
    order = torch.sort(experts, stable=True).indices
    sorted_experts = experts[order]
    rank = torch.arange(num_pairs, device=device) - offsets[sorted_experts]
    position = padded_offsets[sorted_experts] + rank
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int64, device=device)
    sorted_pairs.scatter_(0, position, order)
    pair_position = torch.empty(num_pairs, dtype=torch.int64, device=device).scatter_(0, order, position)
    block_start = torch.arange(num_blocks, device=device) * block_size
    block_expert = torch.searchsorted(padded_offsets[1:], block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return (sorted_pairs.int(), block_expert.int(), padded_offsets.int(), pair_position.int())


def _expert_pairs(top_k_index: torch.Tensor, num_experts: int):
    """For each expert with tokens: (expert, flat pair ids). Host-side loop: CPU backend / oracle."""
    flat = top_k_index.reshape(-1)
    for expert in range(num_experts):
        pairs = (flat == expert).nonzero().squeeze(1)
        if pairs.numel():
            yield expert, pairs


def experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """(N, H) -> (N, H) = sum_j w_j down_e(silu(gate_e(x)) * up_e(x)), in hidden_states' dtype."""
    num_tokens, top_k = top_k_index.shape
    inter = down_proj.shape[2]
    weights = top_k_weights.reshape(-1).to(hidden_states.dtype)
    per_pair = hidden_states.new_zeros(num_tokens * top_k, hidden_states.shape[1])
    for expert, pairs in _expert_pairs(top_k_index, gate_up_proj.shape[0]):
        x = hidden_states[pairs // top_k]
        gate_up = x @ gate_up_proj[expert].T
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        per_pair[pairs] = (h @ down_proj[expert].T) * weights[pairs, None]
    return per_pair.view(num_tokens, top_k, hidden_states.shape[1]).sum(1)


def experts_backward(grad_out: torch.Tensor, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden_states, d top_k_weights, d gate_up_proj, d down_proj) (module docstring)."""
    num_tokens, top_k = top_k_index.shape
    inter = down_proj.shape[2]
    weights = top_k_weights.reshape(-1).to(hidden_states.dtype)
    grad_pair_x = hidden_states.new_zeros(num_tokens * top_k, hidden_states.shape[1])
    grad_weights = torch.zeros(num_tokens * top_k, dtype=top_k_weights.dtype, device=hidden_states.device)
    grad_gate_up = torch.zeros_like(gate_up_proj)
    grad_down = torch.zeros_like(down_proj)
    for expert, pairs in _expert_pairs(top_k_index, gate_up_proj.shape[0]):
        tokens = pairs // top_k
        x = hidden_states[tokens]
        gate_up = x @ gate_up_proj[expert].T
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        sig = torch.sigmoid(gate)
        h = gate * sig * up
        dout = grad_out[tokens]
        grad_weights[pairs] = (dout * (h @ down_proj[expert].T)).sum(-1).to(grad_weights.dtype)
        dz = dout * weights[pairs, None]
        grad_down[expert] = dz.T @ h
        dh = dz @ down_proj[expert]
        dgate = dh * up * sig * (1 + gate * (1 - sig))
        dup = dh * gate * sig
        dgate_up = torch.cat([dgate, dup], dim=1)
        grad_pair_x[pairs] = dgate_up @ gate_up_proj[expert]
        grad_gate_up[expert] = dgate_up.T @ x
    grad_x = grad_pair_x.view(num_tokens, top_k, hidden_states.shape[1]).sum(1)
    return grad_x, grad_weights.view(num_tokens, top_k), grad_gate_up, grad_down
