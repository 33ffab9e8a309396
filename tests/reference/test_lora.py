"""The fused-LoRA reference is the oracle of the LoRA kernel tests, so it is checked independently:
its dropout mask against the hash its docstring specifies, recomputed here with Python integers;
its forward against a per-projection formula in float64; its hand-derived backward against
autograd through that formula."""

import pytest
import torch

from padfree.reference import lora as reference

MASK32 = 0xFFFFFFFF


def mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x21F0AAAD) & MASK32
    h ^= h >> 15
    h = (h * 0x735A2D97) & MASK32
    return h ^ (h >> 15)


def spec_keep(seed: int, stream: int, rows: int, cols: int, dropout_p: float) -> list[list[bool]]:
    """The mask exactly as the module docstring states it, one Python int at a time."""
    key = mix32((seed + stream * 0x9E3779B9) & MASK32)
    threshold = round(dropout_p * (1 << 16))
    keep = []
    for m in range(rows):
        row = []
        for k in range(cols):
            pair = m * ((cols + 1) // 2) + k // 2
            h = mix32((pair & MASK32) ^ key ^ (((pair >> 32) * 0x85EBCA6B) & MASK32))
            row.append(((h >> 16) if k % 2 else (h & 0xFFFF)) >= threshold)
        keep.append(row)
    return keep


def problem(rows, ranks=(4, 2, 3), k=12, outs=(5, 7, 3)):
    x = torch.randn(rows, k, dtype=torch.float64)
    weights = [torch.randn(n, k, dtype=torch.float64) for n in outs]
    biases = [torch.randn(outs[0], dtype=torch.float64), None, torch.randn(outs[2], dtype=torch.float64)]
    lora_as = [torch.randn(r, k, dtype=torch.float64) for r in ranks]
    lora_bs = [torch.randn(n, r, dtype=torch.float64) for n, r in zip(outs, ranks)]
    rank_ends = torch.tensor(ranks).cumsum(0).tolist()
    return x, weights, biases, lora_as, lora_bs, rank_ends, [0.5, 2.0, 1.25]


def naive(x, weights, biases, lora_as, lora_bs, scalings, dropout_p, seed):
    """y_p = x W_p^T + b_p + s_p ((x * keep_p) / (1 - p)) A_p^T B_p^T, projection by projection."""
    outputs = []
    for stream, (weight, bias, lora_a, lora_b, scaling) in enumerate(zip(weights, biases, lora_as, lora_bs,
                                                                          scalings)):
        dropped = x
        if dropout_p:
            keep = torch.tensor(spec_keep(seed, stream, x.shape[0], x.shape[1], dropout_p), dtype=x.dtype)
            dropped = x * keep.reshape(x.shape) / (1 - dropout_p)
        y = x @ weight.t() + scaling * (dropped @ lora_a.t()) @ lora_b.t()
        outputs.append(y if bias is None else y + bias)
    return outputs


@pytest.mark.parametrize("seed,stream,rows,cols,dropout_p", [
    (0, 0, 3, 17, 0.3), (123456789, 2, 5, 8, 0.5), (2**32 - 1, 1, 1, 40, 0.1), (7, 0, 4, 4, 0.0)])
def test_keep_mask_is_the_documented_hash(seed, stream, rows, cols, dropout_p):
    got = reference.keep_mask(seed, stream, rows, cols, dropout_p)
    assert got.dtype == torch.bool and got.shape == (rows, cols)
    assert got.tolist() == spec_keep(seed, stream, rows, cols, dropout_p)


def test_keep_mask_regenerates_from_the_seed():
    first = reference.keep_mask(5, 0, 64, 50, 0.25)
    assert torch.equal(first, reference.keep_mask(5, 0, 64, 50, 0.25))
    assert not torch.equal(first, reference.keep_mask(6, 0, 64, 50, 0.25))
    assert not torch.equal(first, reference.keep_mask(5, 1, 64, 50, 0.25))
    assert 0.72 < first.double().mean().item() < 0.78
    assert reference.keep_mask(5, 0, 64, 50, 0.0).all()
    # an element's mask depends only on its row and column: more rows extend the mask, never reshuffle it
    assert torch.equal(reference.keep_mask(5, 0, 80, 50, 0.25)[:64], first)


@pytest.mark.parametrize("rows", [0, 1, 9])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_forward_matches_per_projection_formula(rows, dropout_p):
    x, weights, biases, lora_as, lora_bs, rank_ends, scalings = problem(rows)
    a_cat = torch.cat(lora_as)
    outputs, xa = reference.forward(x, weights, biases, a_cat, lora_bs, rank_ends, scalings, dropout_p, seed=17)
    want = naive(x, weights, biases, lora_as, lora_bs, scalings, dropout_p, seed=17)
    assert len(outputs) == len(want) and xa.shape == (rows, rank_ends[-1])
    for p, (got, expect) in enumerate(zip(outputs, want)):
        assert got.shape == expect.shape
        torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12, msg=f"y_{p}")


def test_projections_drop_independently():
    """Projection p's rank columns of xa use mask stream p, and streams differ."""
    x, _, _, lora_as, _, rank_ends, _ = problem(6, ranks=(3, 3))
    a_cat = torch.cat(lora_as)
    xa = reference.shrink(x, a_cat, rank_ends, 0.5, seed=2)
    for stream, (lora_a, cols) in enumerate(zip(lora_as, (slice(0, 3), slice(3, 6)))):
        keep = torch.tensor(spec_keep(2, stream, 6, x.shape[1], 0.5), dtype=x.dtype)
        torch.testing.assert_close(xa[:, cols], (x * keep) @ lora_a.t() / 0.5, rtol=1e-12, atol=1e-12)
    assert not torch.equal(reference.keep_mask(2, 0, 6, 12, 0.5), reference.keep_mask(2, 1, 6, 12, 0.5))


@pytest.mark.parametrize("rows", [0, 1, 7])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_hand_derived_backward_matches_autograd(rows, dropout_p):
    x, weights, biases, lora_as, lora_bs, rank_ends, scalings = problem(rows)
    x_leaf = x.clone().requires_grad_()
    a_leaves = [a.clone().requires_grad_() for a in lora_as]
    outputs = naive(x_leaf, weights, biases, a_leaves, lora_bs, scalings, dropout_p, seed=9)
    dys = [torch.randn_like(y) for y in outputs]
    want_dx, *want_da = torch.autograd.grad(outputs, [x_leaf, *a_leaves], dys)
    t = torch.cat([s * dy @ b for s, dy, b in zip(scalings, dys, lora_bs)], dim=1)
    a_cat = torch.cat(lora_as)
    dx, da = reference.backward_input_and_a(dys, x, weights, t, a_cat, rank_ends, dropout_p, seed=9)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12, msg="dx")
    torch.testing.assert_close(da, torch.cat(want_da), rtol=1e-12, atol=1e-12, msg="dA_cat")
    no_dx, da_only = reference.backward_input_and_a(dys, x, weights, t, a_cat, rank_ends, dropout_p, seed=9,
                                                    input_grad=False)
    assert no_dx.shape == (0,)
    torch.testing.assert_close(da_only, da, rtol=0, atol=0)
