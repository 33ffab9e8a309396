"""The MoE reference is the oracle of the MoE kernel tests, so it is checked independently: routing
and alignment against per-token Python formulations of their documented rules, the experts against
a per-(token, choice) float64 loop, and the hand-derived backward functions against autograd
through plain formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from padfree.reference import moe as reference

ROUTINGS = [
    dict(top_k=2, scoring="softmax", normalize=True),
    dict(top_k=1, scoring="softmax", normalize=False),
    dict(top_k=3, scoring="sigmoid", normalize=False, routed_scaling_factor=2.5),
    dict(top_k=3, scoring="sigmoid", normalize=True, bias=True, n_group=4, topk_group=2, routed_scaling_factor=1.5),
]


def routing_args(opts, num_experts):
    opts = dict(opts)
    if opts.pop("bias", False):
        opts["correction_bias"] = torch.randn(num_experts, dtype=torch.float64)
    return opts


def naive_route(logits, top_k, scoring="softmax", normalize=True, correction_bias=None, n_group=1, topk_group=1,
                routed_scaling_factor=1.0):
    """The module docstring's routing rule, one token at a time in Python floats."""
    num_experts = logits.shape[1]
    bias = [0.0] * num_experts if correction_bias is None else correction_bias.tolist()
    all_weights, all_index = [], []
    for row in logits.tolist():
        if scoring == "softmax":
            if any(math.isnan(v) for v in row):
                p = [math.nan] * num_experts
            else:
                exps = [math.exp(v - max(row)) for v in row]
                p = [e / sum(exps) for e in exps]
        else:
            p = [1 / (1 + math.exp(-v)) if not math.isnan(v) else math.nan for v in row]
        c = [math.inf if math.isnan(pe + be) else pe + be for pe, be in zip(p, bias)]
        eligible = range(num_experts)
        if n_group > 1:
            size = num_experts // n_group
            group_score = [sum(sorted(c[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
            best = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
            eligible = [e for e in range(num_experts) if e // size in best]
        chosen = sorted(eligible, key=lambda e: (-c[e], e))[:top_k]
        weights = [p[e] for e in chosen]
        total = sum(weights) + 1e-20 if normalize else 1.0
        all_weights.append([routed_scaling_factor * w / total for w in weights])
        all_index.append(chosen)
    return torch.tensor(all_weights, dtype=torch.float64).view(-1, top_k), torch.tensor(all_index).view(-1, top_k)


@pytest.mark.parametrize("opts", ROUTINGS)
@pytest.mark.parametrize("num_tokens", [0, 1, 11])
def test_route_matches_per_token_rule(opts, num_tokens):
    logits = torch.randn(num_tokens, 8, dtype=torch.float64)
    args = routing_args(opts, 8)
    weights, index = reference.route(logits, **args)
    want_weights, want_index = naive_route(logits, **args)
    assert weights.dtype == torch.float64 and index.dtype == torch.int64
    assert torch.equal(index, want_index)
    torch.testing.assert_close(weights, want_weights, rtol=1e-13, atol=1e-15)


def test_route_float32_logits_give_float32_weights():
    logits = torch.randn(5, 6)
    weights, index = reference.route(logits, 2)
    want_weights, want_index = naive_route(logits.double(), 2)
    assert weights.dtype == torch.float32 and torch.equal(index, want_index)
    torch.testing.assert_close(weights.double(), want_weights, rtol=1e-6, atol=1e-7)


def test_route_ties_pick_the_lowest_index_first():
    logits = torch.tensor([[0.5] * 6, [1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [2.0, -1.0, 2.0, 2.0, -1.0, 5.0]],
                          dtype=torch.float64)
    _, index = reference.route(logits, 3)
    assert index.tolist() == [[0, 1, 2], [1, 2, 4], [5, 0, 2]]
    # tied groups: the lower group wins, and within it the lower expert
    _, index = reference.route(torch.zeros(1, 8, dtype=torch.float64), 2, scoring="sigmoid", n_group=4, topk_group=1)
    assert index.tolist() == [[0, 1]]


def test_nan_router_row_routes_to_real_experts_with_nan_weights():
    logits = torch.randn(4, 6, dtype=torch.float64)
    logits[1, 3] = math.nan
    weights, index = reference.route(logits, 2, scoring="sigmoid", normalize=False)
    assert index[1, 0] == 3 and weights[1, 0].isnan() and not weights[1, 1].isnan()
    weights, index = reference.route(logits, 2, scoring="softmax")
    assert index[1].tolist() == [0, 1] and weights[1].isnan().all()
    want_weights, want_index = naive_route(logits, 2)
    keep = torch.tensor([True, False, True, True])
    assert torch.equal(index, want_index)
    torch.testing.assert_close(weights[keep], want_weights[keep], rtol=1e-13, atol=1e-15)
    assert torch.isfinite(weights[keep]).all()


@pytest.mark.parametrize("opts", ROUTINGS)
def test_route_backward_matches_autograd(opts):
    logits = torch.randn(9, 8, dtype=torch.float64)
    args = routing_args(opts, 8)
    weights, index = reference.route(logits, **args)
    leaf = logits.clone().requires_grad_()
    p = torch.softmax(leaf, -1) if opts["scoring"] == "softmax" else torch.sigmoid(leaf)
    chosen = p.gather(1, index)
    if opts["normalize"]:
        chosen = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
    plain = chosen * args.get("routed_scaling_factor", 1.0)
    torch.testing.assert_close(plain, weights, rtol=1e-13, atol=1e-15)
    grad_weights = torch.randn_like(weights)
    (want,) = torch.autograd.grad(plain, leaf, grad_weights)
    got = reference.route_backward(grad_weights, logits, weights, index, opts["scoring"], opts["normalize"],
                                   args.get("routed_scaling_factor", 1.0))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def distinct_choices(num_tokens, top_k, num_experts):
    """(num_tokens, top_k) random expert ids, distinct within a token (as routing chooses them)."""
    return torch.rand(num_tokens, num_experts).argsort(-1)[:, :top_k]


def naive_align(flat, num_experts, block_size):
    """Each expert's pairs in order, each run padded to a block multiple, sentinel = number of pairs."""
    num_pairs = len(flat)
    capacity = -(-(num_pairs + num_experts * (block_size - 1)) // block_size) * block_size
    sorted_pairs, offsets, block_expert = [], [0], []
    for expert in range(num_experts):
        run = [i for i, e in enumerate(flat) if e == expert]
        run += [num_pairs] * (-len(run) % block_size)
        sorted_pairs += run
        block_expert += [expert] * (len(run) // block_size)
        offsets.append(len(sorted_pairs))
    block_expert += [-1] * (capacity // block_size - len(block_expert))
    sorted_pairs += [num_pairs] * (capacity - len(sorted_pairs))
    position = [sorted_pairs.index(i) for i in range(num_pairs)]
    return sorted_pairs, block_expert, offsets, position


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_size,spread", [
    (9, 2, 5, 4, "random"), (0, 2, 3, 4, "random"), (1, 3, 4, 2, "random"), (6, 2, 4, 4, "one expert"),
    (7, 2, 3, 1, "random"), (5, 1, 6, 8, "random")])
def test_align_matches_per_expert_layout(num_tokens, top_k, num_experts, block_size, spread):
    if spread == "one expert":
        index = torch.full((num_tokens, top_k), 2)
    else:
        index = distinct_choices(num_tokens, top_k, num_experts)
    got = reference.align(index, num_experts, block_size)
    want = naive_align(index.reshape(-1).tolist(), num_experts, block_size)
    for name, g, w in zip(["sorted_pairs", "block_expert", "padded_offsets", "pair_position"], got, want):
        assert g.dtype == torch.int32, name
        assert g.tolist() == w, name


def expert_weights(num_experts=5, hidden=6, inter=4):
    gate_up = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.float64) / hidden ** 0.5
    down = torch.randn(num_experts, hidden, inter, dtype=torch.float64) / inter ** 0.5
    return gate_up, down


def naive_experts(x, index, weights, gate_up, down):
    """out_t = sum_j w_tj (silu(x_t Wg_e^T) * (x_t Wu_e^T)) W2_e^T, one (token, choice) pair at a time."""
    inter = down.shape[2]
    rows = []
    for t in range(x.shape[0]):
        out = x.new_zeros(x.shape[1])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            h = F.silu(gate_up[e, :inter] @ x[t]) * (gate_up[e, inter:] @ x[t])
            out = out + weights[t, j] * (down[e] @ h)
        rows.append(out)
    return torch.stack(rows) if rows else x * 0  # (0, H), still on the autograd graph


def routed(num_tokens, top_k=2, used_experts=4):
    """Random distinct choices among the first `used_experts` (expert 4 of 5 gets no token)."""
    return distinct_choices(num_tokens, top_k, used_experts), torch.rand(num_tokens, top_k, dtype=torch.float64)


@pytest.mark.parametrize("num_tokens", [0, 1, 7])
def test_experts_match_per_pair_loop(num_tokens):
    gate_up, down = expert_weights()
    x = torch.randn(num_tokens, 6, dtype=torch.float64)
    index, weights = routed(num_tokens)
    got = reference.experts(x, index, weights, gate_up, down)
    assert got.shape == x.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, naive_experts(x, index, weights, gate_up, down), rtol=1e-12, atol=1e-14)


def test_nan_router_row_gives_a_nan_output_row_only():
    gate_up, down = expert_weights()
    x = torch.randn(5, 6, dtype=torch.float64)
    logits = torch.randn(5, 5, dtype=torch.float64)
    logits[2, 0] = math.nan
    weights, index = reference.route(logits, 2)
    got = reference.experts(x, index, weights, gate_up, down)
    assert got[2].isnan().all()
    finite = torch.tensor([True, True, False, True, True])
    assert torch.isfinite(got[finite]).all()
    want = naive_experts(x[finite], index[finite], weights[finite], gate_up, down)
    torch.testing.assert_close(got[finite], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("num_tokens", [0, 1, 7])
def test_experts_backward_matches_autograd(num_tokens):
    gate_up, down = expert_weights()
    x = torch.randn(num_tokens, 6, dtype=torch.float64)
    index, weights = routed(num_tokens)
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    out = naive_experts(leaves[0], index, *leaves[1:])
    grad_out = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    got = reference.experts_backward(grad_out, x, index, weights, gate_up, down)
    for name, g, w, leaf in zip(["x", "weights", "gate_up_proj", "down_proj"], got, want, leaves):
        w = torch.zeros_like(leaf) if w is None else w
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=f"d{name}")
    # expert 4 received no token: its weights get exactly zero gradient
    assert (got[2][4] == 0).all() and (got[3][4] == 0).all()
