"""Mixture of LoRA experts on Triton kernels; see padfree/ops/lora_mixture.py for the op and
padfree/reference/lora_mixture.py for the loop over experts it equals. Two regimes:

Few experts with a small rank (E * r <= MAX_TOTAL_RANK = 256), on the fused-LoRA kernels
(padfree/kernels/lora.py): the mixture is one LoRA of rank R = E * r with a per-token gate on its
intermediate. With A_all = cat_e A_e (R, K) (expert e owns rows e*r..e*r+r-1, a free view of
lora_a (E, r, K)), B_all (N, R) with B_all[:, e*r + c] = B_e[:, c], and the dense gate G (M, E),
G[m, e] = sum_j w_mj [e_mj == e], repeated r times along the rank (g (M, R)):

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
makes one round trip through memory).

Many experts (E * r > 256): the dense (M, E * r) intermediate would be mostly zeros, so the work
runs over token-expert pairs instead. Pair p = m * k + j is token m(p) = p // k's j-th choice,
expert e(p), weight w_p. `padfree.moe_align` (no host sync) sorts the pairs by expert into a list
whose every ALIGN_BLOCK-row block belongs to one expert (each expert's run padded with the sentinel
M * k; blocks past the end have expert -1 and exit at once); row i of every (capacity, .) buffer
below is position i of that list. With D(x) = keep * x / (1 - q) (the mask of stream 0 of
padfree.reference.lora, one mask on x shared by the experts, regenerated from the seed):

    h_p  = D(x_m(p)) A_e(p)^T            (r,)   lora_mixture_shrink_kernel, gathers the x rows
    y_m  = x_m W^T + b + sum_{p of m} s w_p h_p B_e(p)^T
           base: torch (F.linear); the per-pair terms: moe_down_kernel (padfree/kernels/moe.py, the
           MoE down projection with its weighted combine: row p of an (M * k, N) buffer, summed
           over each token's k rows, deterministic, no atomics) with W2 = lora_b, weights s * w_p

Backward, dy (M, N) given. Per pair, with a_p = dy_m(p) B_e(p) (r,) and y's dependence on h_p,
w_p and (through h_p) on A_e and x:

    dL/dw_p = s <dy_m, h_p B_e^T> = s <a_p, h_p>                 lora_mixture_grad_h_kernel
    dh_p    = s w_p a_p                                          (same kernel; dh (capacity, r),
                                                                  and hw_p = s w_p h_p for dB)
    dB_e    = sum_{p in e} dy_m(p)^T hw_p                        lora_mixture_weight_grad_kernel
    dA_e    = sum_{p in e} dh_p^T D(x_m(p))                      (the same kernel, transposed store)
    dx_m    = dy_m W + sum_{p of m} D(dh_p A_e(p))               lora_mixture_grad_x_kernel: row p
              of an (M * k, K) buffer, D applied in its epilogue (D is diagonal, its own adjoint),
              summed over each token's k rows; dy W by torch

(D enters dA_e and dx because h_p = D(x) A_e^T: dL/dA_e = dh^T D(x), and dL/dD(x) = dh A_e maps
back through D.) An expert no token chose owns no row: the weight-gradient kernels, whose grid is
(expert, tile), write zeros for it. dL/dw_p is a sum over the r columns, split over the rank tiles
of the grid: one fp32 partial per tile, added after. Only h (capacity, r) and the seed are saved
for backward; the alignment is recomputed there (a sort of M * k keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from padfree.kernels import lora, moe, registry, runtime
from padfree.kernels.common import DTYPES, reduce_tiles, row_offsets
from padfree.kernels.common import dot as _dot
from padfree.kernels.lora import _shrink_step, dropout_keep
from padfree.reference import lora as lora_reference

MAX_TOTAL_RANK = 256
ALIGN_BLOCK = moe.ALIGN_BLOCK  # the pair blocks of moe_down_kernel, reused for the expand
RUN_PADDING = moe.RUN_PADDING  # the weight-gradient loops mask padding only in a run's last ALIGN_BLOCK rows
# The pair count changes every batch (one compiled variant, not one per divisibility of it).
_PER_BATCH = ("num_pairs", "capacity", "num_tokens")


def unsupported_reason(x: torch.Tensor, num_experts: int, rank: int) -> str | None:
    """Why these kernels cannot run this input, or None."""
    return lora.unsupported_reason(x, 1)


def segmented(num_experts: int, rank: int) -> bool:
    """Whether the many-experts (pair-segmented) kernels run, rather than the gated single LoRA."""
    return num_experts * rank > MAX_TOTAL_RANK


def saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int) -> tuple[int, int]:
    """Shape of the h the forward saves: (M, E * r) gated-LoRA, (capacity, r) segmented (the rows of
    moe_align's padded pair list for M * k pairs)."""
    if not segmented(num_experts, rank):
        return num_tokens, num_experts * rank
    num_pairs = num_tokens * top_k
    blocks = (num_pairs + num_experts * (ALIGN_BLOCK - 1) + ALIGN_BLOCK - 1) // ALIGN_BLOCK
    return blocks * ALIGN_BLOCK, rank


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


# ----------------------------------------------------------------------------- many-experts kernels
@triton.jit
def _pair_rows(sorted_pairs_ptr, block, num_pairs, top_k, BLOCK_M: tl.constexpr):
    """Rows of pair block `block`: (rows int64, pair ids, valid (not padding), tokens int64; padding
    rows read token 0, a row that exists, so the main loops need no row masks)."""
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    tokens = tl.where(valid, pairs // top_k, 0).to(tl.int64)
    return rows, pairs, valid, tokens


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_mixture_shrink_kernel(x_ptr, a_ptr, sorted_pairs_ptr, block_expert_ptr, h_ptr, num_pairs, K, R, top_k,
                               stride_xm, seed_ptr, threshold, keep_scale, DROPOUT: tl.constexpr,
                               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_R: tl.constexpr):
    """h[i] = D(x[m(p)]) A_e^T for the pair p at row i of block program_id(0), expert e; rank tile
    program_id(1). Padding rows store h = 0; blocks past the end store zeros (h is an op output, so
    every element is defined)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < R
    rows, pairs, valid, tokens = _pair_rows(sorted_pairs_ptr, block, num_pairs, top_k, BLOCK_M)
    h_tile = h_ptr + rows[:, None] * R + cols[None, :]
    if expert < 0:
        tl.store(h_tile, tl.zeros((BLOCK_M, BLOCK_R), dtype=h_ptr.dtype.element_ty), mask=col_ok[None, :])
        return
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    # Whole BLOCK_K steps at offsets from fixed pointer tiles, then the partial one (as
    # lora_shrink_kernel; ranks past R read rank R - 1, never stored): no masks in the main loop.
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + tokens[:, None] * stride_xm + ks[None, :]
    a_tile = a_ptr + expert.to(tl.int64) * R * K + tl.minimum(cols, R - 1)[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    whole = K - K % BLOCK_K
    for k0 in range(0, whole, BLOCK_K):
        acc = _shrink_step(acc, x_tile + k0, a_tile + k0, tokens, k0, ks, K, seed, 0, threshold, DROPOUT, IEEE,
                           BLOCK_K, False)
    if whole < K:
        acc = _shrink_step(acc, x_tile + whole, a_tile + whole, tokens, whole, ks, K, seed, 0, threshold, DROPOUT,
                           IEEE, BLOCK_K, True)
    if DROPOUT:
        acc = acc * keep_scale
    acc = tl.where(valid[:, None], acc, 0.0)
    tl.store(h_tile, acc.to(h_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_mixture_grad_h_kernel(dy_ptr, b_ptr, h_ptr, sorted_pairs_ptr, block_expert_ptr, weights_ptr, dh_ptr, hw_ptr,
                               dw_partial_ptr, num_pairs, N, R, top_k, capacity, stride_dym, scaling,
                               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_R: tl.constexpr):
    """a = dy[m(p)] B_e (reduction over N) for the rank tile program_id(1); stores
    dw_partial[tile, i] = s <a, h_i> over the tile's columns, dh[i] = s w_p a and hw[i] = s w_p h_i
    (dB's right operand, so that lora_mixture_weight_grad_kernel gathers no weights). Padding rows
    (w = 0, h = 0) store zeros."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    tile_r = tl.program_id(1)
    cols = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < R
    rows, pairs, valid, tokens = _pair_rows(sorted_pairs_ptr, block, num_pairs, top_k, BLOCK_M)
    ns = tl.arange(0, BLOCK_N)
    dy_tile = dy_ptr + tokens[:, None] * stride_dym + ns[None, :]
    b_tile = b_ptr + expert.to(tl.int64) * N * R + ns[:, None] * R + cols[None, :]
    acc = reduce_tiles(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), dy_tile, b_tile, R, N, col_ok, BLOCK_N, IEEE)
    tile = rows[:, None] * R + cols[None, :]
    h = tl.load(h_ptr + tile, mask=col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(dw_partial_ptr + tile_r.to(tl.int64) * capacity + rows,
             tl.where(valid, scaling * tl.sum(acc * h, axis=1), 0.0))
    pair_scale = (scaling * tl.load(weights_ptr + pairs, mask=valid, other=0.0))[:, None]
    tl.store(dh_ptr + tile, (acc * pair_scale).to(dh_ptr.dtype.element_ty), mask=col_ok[None, :])
    tl.store(hw_ptr + tile, (h * pair_scale).to(hw_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _weight_grad_step(acc, x_rows, d_tile, sorted_tokens_ptr, r0, steps, stride_xm, R, num_tokens, k_ok,
                      col_ok, seed, k0, K, threshold, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_K: tl.constexpr, PADDED: tl.constexpr):
    """acc += D(x[tokens])^T d of the BLOCK_M rows at r0; PADDED: rows may be padding (token num_tokens)."""
    tokens = tl.load(sorted_tokens_ptr + r0 + steps).to(tl.uint32, bitcast=True)
    mask = k_ok[:, None]
    if PADDED:
        mask = mask & (tokens < num_tokens)[None, :]
    x_t = tl.load(x_rows + row_offsets(x_rows, tokens[None, :], stride_xm), mask=mask, other=0.0)
    if DROPOUT:
        keep = dropout_keep(seed, 0, tokens.to(tl.int64), k0, (K + 1) // 2, threshold, BLOCK_K)
        x_t = tl.where(tl.trans(keep), x_t, 0.0).to(x_t.dtype)
    d = tl.load(d_tile + row_offsets(d_tile, r0, R), mask=col_ok[None, :], other=0.0)
    return _dot(x_t, d, acc, IEEE)


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_mixture_weight_grad_kernel(d_ptr, x_ptr, sorted_tokens_ptr, padded_offsets_ptr, out_ptr, num_tokens, K, R,
                                    stride_xm, stride_out_k, stride_out_r, seed_ptr, threshold, keep_scale,
                                    DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
                                    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out_e[k, c] = sum over e's rows i of D(x)[t_i, k] d[i, c], stored at k * stride_out_k +
    c * stride_out_r of expert e's (K, R) block; grid (expert, K tile, rank tile). Both expert weight
    gradients:

        dA_e^T = D(x)^T dh     x = x, d = dh, DROPOUT; strides (1, K) store dA_e (r, K)
        dB_e   = dy^T hw       x = dy, d = hw (= s w_p h, rounded to the data dtype by
                               lora_mixture_grad_h_kernel as a 16-bit GEMM of dy^T (s w h) would
                               round it); strides (r, 1) store dB_e (N, r)

    dA_e is computed transposed so the MMA rows are BLOCK_K columns of x, not the rank (as
    lora_da_kernel does, for Hopper's wgmma). The x rows are gathered through the sorted token table
    (padding rows: token num_tokens, masked off) straight into the transposed (BLOCK_K, BLOCK_M)
    tile (loaded as rows and transposed in registers, sm_80 issued 1.2-1.3x the instructions); both
    operands at `row_offsets` from fixed pointer tiles (one 32 x 32 + 64-bit multiply-add an
    address); BLOCK_M divides ALIGN_BLOCK, so a step never crosses an expert's padded run. The
    column and rank masks do not change in the loop (clamped indices along the contiguous
    dimensions would cost the vector loads). The structure of moe_down_weight_grad_kernel, with
    dropout and either store."""
    expert = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    start = tl.load(padded_offsets_ptr + expert)
    end = tl.load(padded_offsets_ptr + expert + 1)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    k_ok = ks < K
    col_ok = cols < R
    steps = tl.arange(0, BLOCK_M)
    x_rows = x_ptr + ks[:, None]
    d_tile = d_ptr + steps[:, None].to(tl.int64) * R + cols[None, :]
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    full_end = tl.maximum(end - RUN_PADDING, start)
    for r0 in range(start, full_end, BLOCK_M):
        acc = _weight_grad_step(acc, x_rows, d_tile, sorted_tokens_ptr, r0, steps, stride_xm, R, num_tokens,
                                k_ok, col_ok, seed, k0, K, threshold, DROPOUT, IEEE, BLOCK_K, False)
    for r0 in range(full_end, end, BLOCK_M):
        acc = _weight_grad_step(acc, x_rows, d_tile, sorted_tokens_ptr, r0, steps, stride_xm, R, num_tokens,
                                k_ok, col_ok, seed, k0, K, threshold, DROPOUT, IEEE, BLOCK_K, True)
    if DROPOUT:
        acc = acc * keep_scale
    out = out_ptr + expert.to(tl.int64) * R * K + ks[:, None] * stride_out_k + cols[None, :] * stride_out_r
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_mixture_grad_x_kernel(dh_ptr, a_ptr, sorted_pairs_ptr, block_expert_ptr, dx_pairs_ptr, num_pairs, K, R,
                               top_k, seed_ptr, threshold, keep_scale, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dx_pairs[p, k] = D(dh[i] A_e)[k] for the pair p at row i of block program_id(0), K tile
    program_id(1); padding rows are not stored. Whole rank steps, then the partial one (the K mask
    does not change in the loop)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows, pairs, valid, tokens = _pair_rows(sorted_pairs_ptr, block, num_pairs, top_k, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R)
    dh_tile = dh_ptr + rows[:, None] * R + rs[None, :]
    k_ok = ks < K
    a_tile = a_ptr + expert.to(tl.int64) * R * K + rs[:, None] * K + ks[None, :]
    acc = reduce_tiles(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), dh_tile, a_tile, K, R, k_ok, BLOCK_R, IEEE)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        keep = dropout_keep(seed, 0, tokens, k0, (K + 1) // 2, threshold, BLOCK_K)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    tl.store(dx_pairs_ptr + safe_pairs[:, None] * K + ks[None, :], acc.to(dx_pairs_ptr.dtype.element_ty),
             mask=valid[:, None] & k_ok[None, :])


# Tiles (registry.Tile) of the many-experts kernels per (kernel, element size), as each kernel
# takes them. The pair-block kernels (shrink, grad_h, grad_x) take BLOCK_M = ALIGN_BLOCK rows; their
# second block is the reduction step (shrink: BLOCK_K over K, grad_h: BLOCK_N over N) or the output
# columns (grad_x: BLOCK_K over K); weight_grad takes its output tile over K (or N: BLOCK_K) and
# reduces over an expert's rows, BLOCK_M of them a step, with BLOCK_M equal to that output tile
# (the padded runs are multiples of ALIGN_BLOCK, so of it too). 64 in 16-bit, 4 warps
# (with 64-row tiles 8 warps would replicate the MMA), 3 stages; fp32 runs IEEE FMA dots (tests, not
# speed) on 32 with 2 stages. The rank tile BLOCK_R is the rank rounded up to a power of two in
# 16..64 (16..32 in fp32: its 64-wide FMA tiles spill); larger ranks run several rank tiles.
def _tiles(size: int) -> dict[tuple[str, int], registry.Tile]:
    block, stages = (64, 3) if size == 2 else (32, 2)
    shapes = {"shrink": (ALIGN_BLOCK, None, block), "grad_h": (ALIGN_BLOCK, block, None),
              "weight_grad": (block, None, block), "grad_x": (ALIGN_BLOCK, None, block)}
    return {(name, size): registry.Tile(*shape, num_warps=4, num_stages=stages) for name, shape in shapes.items()}


# sm_90's 16-bit weight gradient runs 2 stages: its gathered loop issues 1.12-1.19x the plain GEMM's
# instructions per MFLOP there, against 1.16-1.21x with 3 (sm_80 the reverse: 2 stages 1.05-1.28x,
# 3 stages 0.84-0.99x); 64x64 tiles are 6-10 CTAs an SM, which hide the loads the stage does not.
_WEIGHT_GRAD_SM90 = registry.Tile(64, None, 64, num_warps=4, num_stages=2)
TILES = registry.TileTable({**_tiles(2), **_tiles(4)}, arch_defaults={90: {("weight_grad", 2): _WEIGHT_GRAD_SM90}},
                           only_on={(("weight_grad", 2), _tiles(2)["weight_grad", 2]): (80, 86, 89),
                                    (("weight_grad", 2), _WEIGHT_GRAD_SM90): (90,)})
_PAIR_BLOCK_R = {2: (16, 32, 64), 4: (16, 32)}


def _block_r(rank: int, dtype: torch.dtype) -> int:
    return lora._block_r(rank, _PAIR_BLOCK_R[DTYPES[dtype].size])


def _launch(name: str, kernel, grid, x: torch.Tensor, *args, **kwargs) -> None:
    """Launch `kernel` at the tile of `name` in TILES for x's dtype; `grid(tile)` gives the grid."""
    ieee = DTYPES[x.dtype].ieee
    TILES.launch(f"lora_mixture_{name}", (name, DTYPES[x.dtype].size),
                 lambda tile: kernel[grid(tile)](*args, **kwargs, IEEE=ieee, **tile.options), x)


def _dropout_args(dropout_p: float, seed: torch.Tensor) -> dict:
    return {"seed_ptr": seed, "threshold": lora_reference.keep_threshold(dropout_p),
            "keep_scale": 1.0 / (1.0 - dropout_p), "DROPOUT": dropout_p > 0}


def _align(top_k_index: torch.Tensor, num_experts: int):
    from padfree.ops import moe as moe_ops

    return moe_ops.moe_align(top_k_index, num_experts, ALIGN_BLOCK)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _segmented_forward(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed):
    m, k = x.shape
    num_experts, rank, _ = lora_a.shape
    n = weight.shape[0]
    top_k = top_k_index.shape[1]
    num_pairs = m * top_k
    sorted_pairs, block_expert, _, _ = _align(top_k_index, num_experts)
    capacity, num_blocks = sorted_pairs.shape[0], block_expert.shape[0]
    block_r = _block_r(rank, x.dtype)
    h = runtime.empty((capacity, rank), x.dtype, x.device)
    _launch("shrink", lora_mixture_shrink_kernel, lambda tile: (num_blocks, _cdiv(rank, block_r)), x,
            x, lora_a, sorted_pairs, block_expert, h, num_pairs, k, rank, top_k, x.stride(0),
            **_dropout_args(dropout_p, seed), BLOCK_R=block_r)
    pair_weights = (top_k_weights.reshape(-1) * scaling).contiguous()
    out_pairs = runtime.empty((num_pairs, n), x.dtype, x.device)
    moe._launch_tuned("down", lambda options: moe.moe_down_kernel[(num_blocks, _cdiv(n, options["BLOCK_N"]))](
        h, lora_b, sorted_pairs, block_expert, pair_weights, out_pairs, num_pairs, n, rank, *lora_b.stride(),
        **options), x, (runtime.shape_bucket(num_pairs), num_experts, n, rank, top_k))
    y = torch.nn.functional.linear(x, weight, bias)
    return y.add_(out_pairs.view(m, top_k, n).sum(1)), h


def _segmented_backward(dy, x, weight, h, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed,
                        input_grad):
    m, k = x.shape
    num_experts, rank, _ = lora_a.shape
    n = weight.shape[0]
    top_k = top_k_index.shape[1]
    num_pairs = m * top_k
    sorted_pairs, block_expert, padded_offsets, pair_position = _align(top_k_index, num_experts)
    capacity, num_blocks = sorted_pairs.shape[0], block_expert.shape[0]
    block_r = _block_r(rank, x.dtype)
    rank_tiles = _cdiv(rank, block_r)
    weights = top_k_weights.reshape(-1).contiguous()

    dh = runtime.empty((capacity, rank), x.dtype, x.device)
    hw = runtime.empty((capacity, rank), x.dtype, x.device)
    dw_partial = runtime.empty((rank_tiles, capacity), torch.float32, x.device)
    _launch("grad_h", lora_mixture_grad_h_kernel, lambda tile: (num_blocks, rank_tiles), x,
            dy, lora_b, h, sorted_pairs, block_expert, weights, dh, hw, dw_partial, num_pairs, n, rank, top_k,
            capacity, dy.stride(0), float(scaling), BLOCK_R=block_r)
    d_weights = dw_partial.sum(0)[pair_position.long()].view(m, top_k)

    # each row's token (padding rows: the sentinel M * k // k = M), as the MoE weight gradients read it
    sorted_tokens = sorted_pairs // top_k
    d_lora_b = runtime.empty(lora_b.shape, lora_b.dtype, x.device)
    _launch("weight_grad", lora_mixture_weight_grad_kernel,
            lambda tile: (num_experts, _cdiv(n, tile.block_k), rank_tiles), x,
            hw, dy, sorted_tokens, padded_offsets, d_lora_b, m, n, rank, dy.stride(0), rank, 1,
            **_dropout_args(0.0, seed), BLOCK_R=block_r)

    d_lora_a = runtime.empty(lora_a.shape, lora_a.dtype, x.device)
    _launch("weight_grad", lora_mixture_weight_grad_kernel,
            lambda tile: (num_experts, _cdiv(k, tile.block_k), rank_tiles), x,
            dh, x, sorted_tokens, padded_offsets, d_lora_a, m, k, rank, x.stride(0), 1, k,
            **_dropout_args(dropout_p, seed), BLOCK_R=block_r)

    if not input_grad:
        return x.new_empty(0), d_lora_a, d_lora_b, d_weights
    dx_pairs = runtime.empty((num_pairs, k), x.dtype, x.device)
    _launch("grad_x", lora_mixture_grad_x_kernel, lambda tile: (num_blocks, _cdiv(k, tile.block_k)), x,
            dh, lora_a, sorted_pairs, block_expert, dx_pairs, num_pairs, k, rank, top_k,
            **_dropout_args(dropout_p, seed), BLOCK_R=block_r)
    dx = (dy @ weight).add_(dx_pairs.view(m, top_k, k).sum(1))
    return dx, d_lora_a, d_lora_b, d_weights


@runtime.on_input_device
def forward(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed):
    """Same contract as padfree.reference.lora_mixture.forward, on the Triton kernels, except that
    the saved h has `saved_shape` (the sorted pairs' (capacity, r) in the many-experts regime)."""
    num_experts, rank, _ = lora_a.shape
    if segmented(num_experts, rank):
        return _segmented_forward(x, weight, bias, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p,
                                  seed)
    outputs, h = forward_shared(x, [weight], [bias], [lora_a], [lora_b], [scaling], [top_k_index], [top_k_weights],
                                dropout_p, seed)
    return outputs[0], h


@runtime.on_input_device
def backward(dy, x, weight, h, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p, seed,
             input_grad=True):
    """Same contract as padfree.reference.lora_mixture.backward, on the Triton kernels (h as
    `forward` saved it)."""
    num_experts, rank, _ = lora_a.shape
    if segmented(num_experts, rank):
        return _segmented_backward(dy, x, weight, h, lora_a, lora_b, scaling, top_k_index, top_k_weights, dropout_p,
                                   seed, input_grad)
    return tuple(backward_shared([dy], x, [weight], h, [lora_a], [lora_b], [scaling], [top_k_index], [top_k_weights],
                                 dropout_p, seed, input_grad))


# ----------------------------------------------------------------------------- registry
_INDEX_POINTERS = {"sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "padded_offsets_ptr": "*i32",
                   "sorted_tokens_ptr": "*i32",
                   "weights_ptr": "*fp32", "dw_partial_ptr": "*fp32", "seed_ptr": "*i64", "scaling": "fp32",
                   "keep_scale": "fp32"}


# (label suffix, DROPOUT (None: the kernel has no such flag), run-time values) of each code variant a
# launcher starts: dropout off and on where the kernel has it
_DROPOUT_VARIANTS = (("", False, {}), (" dropout", True, {}))
_PLAIN = (("", None, {}),)
# the weight gradient as dA (its store contiguous along K: stride_out_k = 1, a constant to the JIT),
# with and without dropout, and as dB (contiguous along the rank)
_WEIGHT_GRAD_VARIANTS = ((" dA", False, {"stride_out_k": 1}), (" dA dropout", True, {"stride_out_k": 1}),
                         (" dB", False, {"stride_out_r": 1}))


def _launches(kernel, aligned: tuple[str, ...], variants=_PLAIN):
    """Every launch the launchers above pick: each data dtype, each rank tile, each of `variants`.
    Ranks and model dimensions get the multiple-of-16 hint of the usual r = 16, 32, 64 and hidden
    sizes; another rank JIT-compiles the same code without that hint."""
    name = kernel.fn.__name__.removeprefix("lora_mixture_").removesuffix("_kernel")

    def launches():
        for info in DTYPES.values():
            data = {arg: f"*{info.name}" for arg in kernel.arg_names if arg.endswith("_ptr")}
            signature = registry.signature(kernel, {**data, **_INDEX_POINTERS})
            for tile, archs, _ in TILES.registered((name, info.size)):
                for block_r in _PAIR_BLOCK_R[info.size]:
                    for suffix, dropout, values in variants:
                        constexprs = {"BLOCK_R": block_r, "IEEE": info.ieee}
                        if dropout is not None:
                            constexprs["DROPOUT"] = dropout
                        yield registry.Launch.of(tile, f"{info.name} r{block_r}{suffix}", signature, constexprs,
                                                 archs=archs, aligned=aligned, pipelined=True, values=values,
                                                 extended=info.name == "fp16")

    registry.register(kernel, launches)


_launches(lora_mixture_shrink_kernel, ("K", "R"), _DROPOUT_VARIANTS)
_launches(lora_mixture_grad_h_kernel, ("N", "R"))
_launches(lora_mixture_weight_grad_kernel, ("K", "R"), _WEIGHT_GRAD_VARIANTS)
_launches(lora_mixture_grad_x_kernel, ("K", "R"), _DROPOUT_VARIANTS)


# ----------------------------------------------------------------------------- shared-input groups
# Projections p = 0..P-1 reading one x (q/k/v, gate/up), each a few-experts mixture (E_p r_p <= 256)
# with its own W_p, b_p, experts, scaling s_p and routing (gate G_p). Each is one gated LoRA of rank
# R_p = E_p r_p (module docstring), so the group is the fused LoRA's shared structure
# (padfree/kernels/lora.py) with a gate per projection: A_cat = cat_p A_all,p (sum_p R_p, K), whose
# rows rank_ends[p-1]..rank_ends[p] are projection p's, shrunk by one lora_shrink_kernel (x read
# once for every projection; projection p's columns from dropout stream p, D_p), then per projection
#
#     y_p = x W_p^T + b_p + s_p * (g_p * h_p) B_all,p^T                      lora_forward_kernel
#
# Backward, t_p = s_p dy_p B_all,p: dB_all,p, dG_p as in the one-projection case (torch), and one
#
#     dx, dA_cat = sum_p dy_p W_p + sum_p D_p(g_p * t_p) A_all,p, [(g_p * t_p)^T D_p(x)]_p
#
# by lora_dx_kernel (up to 3 (dy_p, W_p) pairs, the r-loop over all streams) and lora_da_kernel
# (dropout; else one torch GEMM), exactly as lora_linear_shared's backward with g_p * t_p for t_p.
def group_unfused_reason(num_experts: list[int], ranks: list[int]) -> str | None:
    """Why a shared-input group of these projections cannot run as one fused group, or None."""
    if len(ranks) > lora.MAX_STREAMS:
        return f"the kernels fuse at most {lora.MAX_STREAMS} projections, got {len(ranks)}"
    many = [p for p, (e, r) in enumerate(zip(num_experts, ranks)) if segmented(e, r)]
    if many:
        return (f"projection(s) {many} have num_experts * rank > {MAX_TOTAL_RANK} (the many-experts kernels, one "
                "projection at a time)")
    return None


def _rank_ends(lora_as: list[torch.Tensor]) -> list[int]:
    ends = []
    for lora_a in lora_as:
        ends.append((ends[-1] if ends else 0) + lora_a.shape[0] * lora_a.shape[1])
    return ends


def _a_cat(lora_as: list[torch.Tensor]) -> torch.Tensor:
    """A_cat (sum_p E_p r_p, K): every projection's experts' A rows, in order."""
    flat = [lora_a.reshape(-1, lora_a.shape[2]) for lora_a in lora_as]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


@runtime.on_input_device
def forward_shared(x, weights, biases, lora_as, lora_bs, scalings, top_k_indices, top_k_weights, dropout_p, seed):
    """Same contract as padfree.reference.lora_mixture.forward_shared (few experts per projection,
    at most 3 projections: `group_unfused_reason` is None): one shrink for the group."""
    rank_ends = _rank_ends(lora_as)
    h = lora.shrink(x, _a_cat(lora_as), rank_ends, dropout_p, seed)
    outputs = []
    for weight, bias, lora_a, lora_b, scaling, index, gates, start, end in zip(
            weights, biases, lora_as, lora_bs, scalings, top_k_indices, top_k_weights, [0, *rank_ends[:-1]],
            rank_ends):
        gate = dense_gate(index, gates, lora_a.shape[0])
        outputs.append(lora.expand(x, weight, bias, _gated(h[:, start:end], gate, lora_a.shape[1]), _concat_b(lora_b),
                                   scaling))
    return outputs, h


@runtime.on_input_device
def backward_shared(dys, x, weights, h, lora_as, lora_bs, scalings, top_k_indices, top_k_weights, dropout_p, seed,
                    input_grad=True):
    """Same contract as padfree.reference.lora_mixture.backward_shared, on the fused-LoRA kernels
    (one lora_dx_kernel and one dA for the group; h as `forward_shared` saved it)."""
    m, k = x.shape
    rank_ends = _rank_ends(lora_as)
    gated_ts, d_bs, d_weights = [], [], []
    for dy, lora_a, lora_b, scaling, index, gates, start, end in zip(
            dys, lora_as, lora_bs, scalings, top_k_indices, top_k_weights, [0, *rank_ends[:-1]], rank_ends):
        num_experts, rank, _ = lora_a.shape
        gate = dense_gate(index, gates, num_experts)
        h_p = h[:, start:end]
        t = scaling * (dy @ _concat_b(lora_b))
        d_b_all = scaling * (dy.t() @ _gated(h_p, gate, rank))
        d_bs.append(d_b_all.view(dy.shape[1], num_experts, rank).permute(1, 0, 2).contiguous())
        d_gate = (t.to(gate.dtype) * h_p.to(gate.dtype)).view(m, num_experts, rank).sum(2)
        d_weights.append(d_gate.gather(1, index))
        gated_ts.append(_gated(t, gate, rank))
    t_cat = gated_ts[0] if len(gated_ts) == 1 else torch.cat(gated_ts, dim=1)
    dx, d_a_cat = lora.backward_input_and_a(list(dys), x, list(weights), t_cat, _a_cat(lora_as), rank_ends, dropout_p,
                                            seed, input_grad)
    # a custom op's outputs may not alias each other: a group's row blocks of dA_cat are copied
    d_as = [d_a_cat.view(lora_as[0].shape)] if len(lora_as) == 1 else [
        d_a_cat[start:end].clone().view(lora_a.shape) for lora_a, start, end in zip(lora_as, [0, *rank_ends[:-1]],
                                                                                    rank_ends)]
    return [dx, *d_as, *d_bs, *d_weights]
