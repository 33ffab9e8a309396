"""Triton kernels of the fused LoRA linear (see padfree/ops/lora.py for the op).

Notation: x (M, K) the input, projections p = 0..P-1 (P <= 3: q/k/v or gate/up read the same x),
W_p (N_p, K) frozen, A_cat = cat(A_p) (R, K), B_p (N_p, r_p), s_p the scaling, q = dropout_p and
keep_p (M, K) the keep-mask of stream p (`dropout_keep`, bit-identical to padfree.reference.lora).

Forward, two kernels and nothing formed at (N, K) size (B_p @ A_p is never built):

    lora_shrink_kernel   xa = (x * keep_p) @ A_p^T / (1 - q)  for all p at once    (M, R)
                         without dropout one program owns a row tile of x and all R columns
                         (R <= 128), so x is read once for every projection's shrink; with
                         dropout one program per row tile and stream masks the x tile in
                         registers with that stream's mask (the programs of one row tile run
                         together, so x comes from L2 after the first).
    lora_forward_kernel  y_p = x @ W_p^T + s_p * xa_p @ B_p^T + bias_p
                         the base K-loop is followed by a short loop over r_p in the same
                         accumulator; y is stored once.

Backward. With y_p = x W_p^T + s_p (D_p(x) A_p^T) B_p^T + b_p, where D_p(x) = keep_p * x / (1 - q):

    dL/dB_p = s_p dy_p^T xa_p                      (N_p, r_p)   torch GEMM in ops/lora.py
    t_p     = s_p dy_p B_p                         (M, r_p)     torch GEMM in ops/lora.py
    dL/dA_p = t_p^T D_p(x)                         (r_p, K)     lora_da_kernel (dropout), else t^T x
    dL/dx   = sum_p dy_p W_p + sum_p D_p(t_p A_p)              lora_dx_kernel
            (D_p is linear and diagonal, so its adjoint is itself: keep_p * (.) / (1 - q))
    dL/dW_p = dy_p^T x, dL/db_p = sum_rows dy_p    only when W_p / b_p require grad (torch)

lora_dx_kernel computes one (BLOCK_M, BLOCK_K) tile of dx from up to three (dy_p, W_p) pairs
followed by the r-loop over t A, and applies keep_p in the epilogue of each stream's r-loop: the
mask is regenerated from (seed, stream, row, column), never loaded. Only xa (M, R) and the seed
are saved for backward. The seed is an int64 device tensor the kernels load (`seed_ptr`), drawn by
the device's generator, so a captured CUDA graph draws a new mask on every replay.

Dropout mask: one 32-bit hash per pair of columns (2j, 2j + 1) of a row, 16 bits per element:
c = row * ceil(K / 2) + col // 2 (int64), h = mix32(lo32(c) ^ key_p ^ (hi32(c) * 0x85EBCA6B)),
key_p = mix32(seed + p * 0x9E3779B9); the even column takes h & 0xFFFF, the odd one h >> 16, and
an element is kept when its 16 bits >= round(q * 2^16). All uint32 arithmetic, so the kernels and
the torch reference produce the same bits. Every tile starts at an even column, so a tile's pairs
are its own: a (BLOCK_M, BLOCK_K) mask costs BLOCK_M * BLOCK_K / 2 hashes (the mixer, two
multiplies and three xor-shifts, is most of the mask's price in the shrink and dA main loops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from padfree.kernels import registry, runtime
from padfree.kernels.common import DTYPES, int64, reduce_tiles
from padfree.kernels.common import dot as _dot
from padfree.reference import lora as reference

MAX_STREAMS = 3
# The row count changes every batch: Triton's JIT would compile a variant per value-1 /
# multiple-of-16 pattern of it. Model dimensions and strides keep their specialization (aligned,
# contiguous rows).
_PER_BATCH = ("M",)


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x21F0AAAD
    h = h ^ (h >> 15)
    h = h * 0x735A2D97
    return h ^ (h >> 15)


@triton.jit
def dropout_keep(seed, stream, rows, k0, half_k, threshold, BLOCK_K: tl.constexpr):
    """Keep-mask (len(rows), BLOCK_K) of dropout stream `stream` on columns k0 .. k0 + BLOCK_K (k0 even) of
    rows `rows` (int64): one hash per pair of columns, its low 16 bits for the even column, its high 16
    bits for the odd one (see padfree.reference.lora.keep_mask)."""
    key = _mix32(seed.to(tl.uint32) + tl.cast(stream, tl.uint32) * 0x9E3779B9)
    pairs = rows[:, None] * half_k + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
    low = (pairs & 0xFFFFFFFF).to(tl.uint32)
    high = (pairs >> 32).to(tl.uint32)
    h = _mix32(low ^ key ^ (high * 0x85EBCA6B))
    return tl.interleave(h & 0xFFFF, h >> 16).to(tl.int32) >= threshold


@triton.jit
def _stream_bounds(stream: tl.constexpr, rank_end0, rank_end1, R):
    """[start, end) of stream's columns in xa / rows in A_cat; unused streams are empty (R, R)."""
    if stream == 0:
        return 0, rank_end0
    elif stream == 1:
        return rank_end0, rank_end1
    else:
        return rank_end1, R


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time for L2 reuse."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_size
    tile_n = (pid % per_group) // group_size
    return tile_m, tile_n


@triton.jit
def _stream_block(pid, rank_end0, rank_end1, R, blocks_per_stream, BLOCK_R: tl.constexpr):
    """Stream and rank indices (BLOCK_R, with their bounds mask) of column block `pid` of the
    shrink / row block of the dA kernel: blocks_per_stream blocks of each stream in turn."""
    stream = pid // blocks_per_stream
    start = tl.where(stream == 0, 0, tl.where(stream == 1, rank_end0, rank_end1))
    end = tl.where(stream == 0, rank_end0, tl.where(stream == 1, rank_end1, R))
    ranks = start + (pid % blocks_per_stream) * BLOCK_R + tl.arange(0, BLOCK_R)
    return stream, ranks, ranks < end


@triton.jit
def _shrink_step(acc, x_tile, a_tile, rows, k0, ks, K, seed, stream, threshold, DROPOUT: tl.constexpr,
                 IEEE: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr):
    """acc += D(x)[rows, k0 + ks] @ A[:, k0 + ks]^T from the tiles' pointers (masked at K when PARTIAL)."""
    if PARTIAL:
        x = tl.load(x_tile, mask=ks[None, :] < K - k0, other=0.0)
        a = tl.load(a_tile, mask=ks[:, None] < K - k0, other=0.0)
    else:
        x = tl.load(x_tile)
        a = tl.load(a_tile)
    if DROPOUT:
        x = tl.where(dropout_keep(seed, stream, rows, k0, (K + 1) // 2, threshold, BLOCK_K), x, 0.0).to(x.dtype)
    return _dot(x, a, acc, IEEE)


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_shrink_kernel(x_ptr, a_ptr, xa_ptr, M, K, R, stride_xm, stride_ar, stride_xam, rank_end0, rank_end1,
                       blocks_per_stream, rank_blocks, seed_ptr, threshold, keep_scale, DROPOUT: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """xa[m, r] = sum_k x[m, k] keep_p(m, k) A_cat[r, k] / (1 - q), p the stream owning column r.

    Program (row tile, column block), column blocks innermost so that the programs reading one x
    tile run together (L2). With dropout a column block lies in one stream, so a program draws
    one mask and runs one dot; without, the blocks tile all R columns (one 'stream')."""
    tile_m = tl.program_id(0) // rank_blocks
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    stream, cols, col_ok = _stream_block(tl.program_id(0) % rank_blocks, rank_end0, rank_end1, R, blocks_per_stream,
                                         BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    # Whole BLOCK_K steps, then the partial one; rows past M and ranks past R read row M - 1 and
    # rank R - 1 (their results, like those of the next stream's ranks, are never stored): the
    # main loop's loads need no masks.
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + tl.minimum(rows, M - 1)[:, None] * stride_xm + ks[None, :]
    a_tile = a_ptr + tl.minimum(cols, R - 1)[None, :] * stride_ar + ks[:, None]
    whole = K - K % BLOCK_K
    for k0 in range(0, whole, BLOCK_K):
        acc = _shrink_step(acc, x_tile + k0, a_tile + k0, rows, k0, ks, K, seed, stream, threshold, DROPOUT, IEEE,
                           BLOCK_K, False)
    if whole < K:
        acc = _shrink_step(acc, x_tile + whole, a_tile + whole, rows, whole, ks, K, seed, stream, threshold, DROPOUT,
                           IEEE, BLOCK_K, True)
    if DROPOUT:
        acc = acc * keep_scale
    tl.store(xa_ptr + rows[:, None] * stride_xam + cols[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & col_ok[None, :])


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_forward_kernel(x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr, M, N, K, R, stride_xm, stride_wn,
                        stride_xam, stride_bn, stride_ym, scaling, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y = x @ W^T + scaling * xa @ B^T (+ bias): base K-loop, then an r-loop, one store."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Whole BLOCK_K steps, then the partial one; rows past M and columns past N read row M - 1 and
    # column N - 1 (their results are never stored): the main loop's loads need no masks. Each step
    # loads at an offset from fixed pointer tiles, as the MoE kernels do: pointer tensors advanced
    # in the loop cost it more (2-3x its instructions under Triton 3.6, torch 2.11's).
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + tl.minimum(rows, M - 1)[:, None] * stride_xm + ks[None, :]
    w_tile = w_ptr + tl.minimum(cols, N - 1)[None, :] * stride_wn + ks[:, None]
    whole = K - K % BLOCK_K
    for k0 in range(0, whole, BLOCK_K):
        acc = _dot(tl.load(x_tile + k0), tl.load(w_tile + k0), acc, IEEE)
    if whole < K:
        acc = _dot(tl.load(x_tile + whole, mask=ks[None, :] < K - whole, other=0.0),
                   tl.load(w_tile + whole, mask=ks[:, None] < K - whole, other=0.0), acc, IEEE)
    if scaling != 0.0:
        # One fp32 accumulator for both sums (a second one costs registers, spills wide tiles):
        # acc / s + xa B^T, times s. The two fp32 roundings are far below the 16-bit inputs' own.
        acc = acc / scaling
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            xa = tl.load(xa_ptr + rows[:, None] * stride_xam + rs[None, :],
                         mask=row_ok[:, None] & (rs[None, :] < R), other=0.0)
            b = tl.load(b_ptr + cols[None, :] * stride_bn + rs[:, None], mask=col_ok[None, :] & (rs[:, None] < R),
                        other=0.0)
            acc = _dot(xa, b, acc, IEEE)
        acc = acc * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _accumulate_dy_w(acc, dy_ptr, w_ptr, N, stride_dym, stride_wn, rows, ks, M, K, IEEE: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """acc += dy[rows, :] @ W[:, ks] over the N reduction (dy (M, N), W (N, K)). Whole BLOCK_N steps
    first, then the partial one, and rows past M read row M - 1 (their results are never stored):
    the main loop masks W's columns only, with a mask that does not change from step to step."""
    ns = tl.arange(0, BLOCK_N)
    dy_tile = dy_ptr + tl.minimum(rows, M - 1)[:, None] * stride_dym + ns[None, :]
    w_tile = w_ptr + ns[:, None].to(tl.int64) * stride_wn + ks[None, :]
    return reduce_tiles(acc, dy_tile, w_tile, int64(stride_wn), N, ks < K, BLOCK_N, IEEE)


@triton.jit
def _t_times_a(t_ptr, a_ptr, start, end, stride_tm, stride_ar, rows, ks, M, K, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """t[rows, start:end] @ A_cat[start:end, ks] in fp32."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        t = tl.load(t_ptr + rows[:, None] * stride_tm + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < end),
                    other=0.0)
        a = tl.load(a_ptr + rs[:, None] * stride_ar + ks[None, :], mask=(rs[:, None] < end) & (ks[None, :] < K),
                    other=0.0)
        acc = _dot(t, a, acc, IEEE)
    return acc


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_dx_kernel(dy0_ptr, w0_ptr, dy1_ptr, w1_ptr, dy2_ptr, w2_ptr, t_ptr, a_ptr, dx_ptr, M, K, R, N0, N1, N2,
                   stride_dy0, stride_dy1, stride_dy2, stride_w0, stride_w1, stride_w2, stride_tm, stride_ar,
                   stride_dxm, rank_end0, rank_end1, seed_ptr, threshold, keep_scale, DROPOUT: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """dx = sum_p dy_p @ W_p + sum_p keep_p * (t_p @ A_p) / (1 - q); absent projections have N_p = 0."""
    tile_m, tile_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ks = (tile_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc = _accumulate_dy_w(acc, dy0_ptr, w0_ptr, N0, stride_dy0, stride_w0, rows, ks, M, K, IEEE, BLOCK_N)
    acc = _accumulate_dy_w(acc, dy1_ptr, w1_ptr, N1, stride_dy1, stride_w1, rows, ks, M, K, IEEE, BLOCK_N)
    acc = _accumulate_dy_w(acc, dy2_ptr, w2_ptr, N2, stride_dy2, stride_w2, rows, ks, M, K, IEEE, BLOCK_N)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        for stream in tl.static_range(3):
            start, end = _stream_bounds(stream, rank_end0, rank_end1, R)
            if start < end:
                lora = _t_times_a(t_ptr, a_ptr, start, end, stride_tm, stride_ar, rows, ks, M, K, IEEE,
                                  BLOCK_M, BLOCK_K, BLOCK_R)
                keep = dropout_keep(seed, stream, rows, tile_k * BLOCK_K, (K + 1) // 2, threshold, BLOCK_K)
                acc += tl.where(keep, lora * keep_scale, 0.0)
    else:
        acc += _t_times_a(t_ptr, a_ptr, 0, R, stride_tm, stride_ar, rows, ks, M, K, IEEE, BLOCK_M, BLOCK_K, BLOCK_R)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (ks[None, :] < K))


@triton.jit
def _da_step(acc, x_ptr, t_ptr, m0, ks, rs, rs_ok, M, K, stride_xm, stride_tm, seed, stream, threshold,
             IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr):
    """acc += D(x)[rows, ks]^T t[rows, rs] for rows m0 .. m0 + BLOCK_M (masked at M when PARTIAL)."""
    rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    x_ok = ks[None, :] < K
    t_ok = rs_ok[None, :]
    if PARTIAL:
        x_ok = x_ok & (rows[:, None] < M)
        t_ok = t_ok & (rows[:, None] < M)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=x_ok, other=0.0)
    t = tl.load(t_ptr + rows[:, None] * stride_tm + rs[None, :], mask=t_ok, other=0.0)
    keep = dropout_keep(seed, stream, rows, tl.program_id(1) * BLOCK_K, (K + 1) // 2, threshold, BLOCK_K)
    return _dot(tl.trans(tl.where(keep, x, 0.0).to(x.dtype)), t, acc, IEEE)


@triton.jit(do_not_specialize=_PER_BATCH)
def lora_da_kernel(t_ptr, x_ptr, da_ptr, M, K, R, stride_tm, stride_xm, stride_dar, rank_end0, rank_end1,
                   blocks_per_stream, seed_ptr, threshold, keep_scale, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """dA_cat[r, k] = sum_m t[m, r] keep_p(m, k) x[m, k] / (1 - q), p the stream owning row r.

    Program (row block of one stream, as in lora_shrink_kernel, column tile): one mask, one dot.
    Computed transposed, dA^T = D(x)^T t, so that the MMA rows are BLOCK_K columns of x, not the
    rank (16-64), which is too few rows for Hopper's wgmma."""
    stream, rs, rs_ok = _stream_block(tl.program_id(0), rank_end0, rank_end1, R, blocks_per_stream, BLOCK_R)
    ks = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    seed = tl.load(seed_ptr)
    # whole BLOCK_M steps, then the partial one: the main loop's load masks do not change
    whole = M - M % BLOCK_M
    for m0 in range(0, whole, BLOCK_M):
        acc = _da_step(acc, x_ptr, t_ptr, m0, ks, rs, rs_ok, M, K, stride_xm, stride_tm, seed, stream, threshold,
                       IEEE, BLOCK_M, BLOCK_K, False)
    if whole < M:
        acc = _da_step(acc, x_ptr, t_ptr, whole, ks, rs, rs_ok, M, K, stride_xm, stride_tm, seed, stream, threshold,
                       IEEE, BLOCK_M, BLOCK_K, True)
    acc = acc * keep_scale
    tl.store(da_ptr + rs[None, :] * stride_dar + ks[:, None], acc.to(da_ptr.dtype.element_ty),
             mask=rs_ok[None, :] & (ks[:, None] < K))


# ----------------------------------------------------------------------------- launch configurations
Tile = registry.Tile
# Tiles of the GEMM kernels, per element size and problem size ("small": fewer than 1024 rows or
# 256 columns). The forward's output tile is BLOCK_M x BLOCK_N over a BLOCK_K reduction step; dx's
# is BLOCK_M x BLOCK_K over BLOCK_N. Small problems and fp32 (IEEE FMA dots: tests, not speed) have
# one tile. Large 16-bit problems have candidates that runtime.pick times on the GPU on first use
# per shape with PADFREE_AUTOTUNE=1 (the default, used otherwise: the 128x128x64, 8-warp, 3-stage
# tile). Candidates were kept when they compile for sm_80 and sm_90 with at most 8 bytes of spills,
# bias and dropout variants included. With one fp32 accumulator the forward's 128x256x64 tile (the
# widest, fewest instructions per MFLOP in `compile-check --efficiency`) fits without spills too.
_GEMM_DEFAULTS = {(2, "small"): Tile(64, 64, 32, 4, 3), (4, "small"): Tile(32, 32, 32, 4, 2),
                  (2, "large"): Tile(128, 128, 64, 8, 3), (4, "large"): Tile(64, 64, 32, 8, 3)}
# 128x128x64 with 4 stages needs 144 KB of shared memory in dx: a candidate for sm_80/sm_90 only
# (not picked on the 99 KB of sm_86/sm_89)
_BIG = Tile(128, 128, 64, 8, 4)
FORWARD_TILES = registry.TileTable(_GEMM_DEFAULTS, candidates={(2, "large"): (
    _BIG, Tile(256, 64, 64, 8, 3), Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 4, 4), Tile(128, 256, 64, 8, 3))})
DX_TILES = registry.TileTable(_GEMM_DEFAULTS, candidates={(2, "large"): (_BIG, Tile(64, 128, 128, 8, 3))},
                              only_on={((2, "large"), _BIG): registry.BIG_SHARED_MEMORY_ARCHS})
_BLOCK_R = 16
_GROUP_M = 8
# The shrink and dA kernels, per (element size, rank tile BLOCK_R): (BLOCK_M, BLOCK_K) of the
# shrink; (BLOCK_M reduction step, BLOCK_K) of the dA kernel. The rank tile is the widest stream's
# rank rounded up to one of these (`_stream_blocks`); the shrink's 128-rank tile runs on 8 warps.
_SHRINK_BLOCK_R = (16, 32, 64, 128)
_DA_BLOCK_R = (16, 32, 64)
SHRINK_TILES = registry.TileTable({(size, block_r): Tile(block, None, block, 8 if block_r >= 128 else 4, 3)
                                   for size, block in ((2, 64), (4, 32)) for block_r in _SHRINK_BLOCK_R})
DA_TILES = registry.TileTable({(size, block_r): Tile(block, None, block, 4, 3)
                               for size, block in ((2, 64), (4, 32)) for block_r in _DA_BLOCK_R})


def _gemm_key(dtype: torch.dtype, m: int, n: int) -> tuple[int, str]:
    """The key of FORWARD_TILES / DX_TILES of an (m, n) output."""
    return DTYPES[dtype].size, "small" if m < 1024 or n < 256 else "large"


def _block_r(rank: int, choices: tuple[int, ...]) -> int:
    return next((b for b in choices if b >= rank), choices[-1])


def unsupported_reason(x: torch.Tensor, num_projections: int) -> str | None:
    """Why the Triton kernels cannot run this input, or None."""
    if (reason := runtime.interpreter_bf16_reason(x)) is not None:
        return reason
    if num_projections > MAX_STREAMS:
        return f"the kernels fuse at most {MAX_STREAMS} projections, got {num_projections}"
    return None


def _dropout_args(dropout_p: float, seed: torch.Tensor) -> dict:
    return {"seed_ptr": seed, "threshold": reference.keep_threshold(dropout_p),
            "keep_scale": 1.0 / (1.0 - dropout_p)}


def _rank_end_args(rank_ends: list[int], rank: int) -> dict:
    padded = [*rank_ends[:-1], rank, rank][:2]
    return {"rank_end0": padded[0], "rank_end1": padded[1]}


def _stream_blocks(rank_ends: list[int], dropout: bool, choices: tuple[int, ...]) -> tuple[int, dict]:
    """(BLOCK_R, the stream/block arguments) of the shrink and dA kernels: with dropout each stream
    gets blocks of its own (a program draws one mask), without one 'stream' spans all R ranks."""
    ends = rank_ends if dropout else rank_ends[-1:]
    widest = max(end - start for start, end in zip([0, *ends[:-1]], ends))
    block_r = _block_r(widest, choices)
    blocks = triton.cdiv(widest, block_r)
    return block_r, {"blocks_per_stream": blocks, "rank_blocks": blocks * len(ends),
                     **_rank_end_args(ends, rank_ends[-1])}


def shrink(x: torch.Tensor, a_cat: torch.Tensor, rank_ends: list[int], dropout_p: float,
           seed: torch.Tensor) -> torch.Tensor:
    """xa (M, R) in x's dtype; see lora_shrink_kernel."""
    m, k = x.shape
    rank = a_cat.shape[0]
    xa = runtime.empty((m, rank), x.dtype, x.device)
    block_r, blocks = _stream_blocks(rank_ends, dropout_p > 0, _SHRINK_BLOCK_R)
    args = dict(x_ptr=x, a_ptr=a_cat, xa_ptr=xa, M=m, K=k, R=rank, stride_xm=x.stride(0), stride_ar=a_cat.stride(0),
                stride_xam=xa.stride(0), **blocks, **_dropout_args(dropout_p, seed), DROPOUT=dropout_p > 0,
                IEEE=DTYPES[x.dtype].ieee, BLOCK_R=block_r)

    def launch(tile):
        lora_shrink_kernel[(triton.cdiv(m, tile.block_m) * blocks["rank_blocks"],)](**args, **tile.options)

    SHRINK_TILES.launch("lora_shrink", (DTYPES[x.dtype].size, block_r), launch, x)
    return xa


def expand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, xa: torch.Tensor,
           lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x @ W^T + scaling * xa @ B^T (+ bias); xa may be a column slice of the shared xa."""
    m, k = x.shape
    n, rank = lora_b.shape
    y = runtime.empty((m, n), x.dtype, x.device)
    args = dict(x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, xa_ptr=xa, b_ptr=lora_b, y_ptr=y,
                M=m, N=n, K=k, R=rank, stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_xam=xa.stride(0),
                stride_bn=lora_b.stride(0), stride_ym=y.stride(0), scaling=float(scaling),
                HAS_BIAS=bias is not None, IEEE=DTYPES[x.dtype].ieee, BLOCK_R=_BLOCK_R, GROUP_M=_GROUP_M)

    def launch(tile):
        lora_forward_kernel[(triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)](**args, **tile.options)

    FORWARD_TILES.launch("lora_forward", _gemm_key(x.dtype, m, n), launch, x,
                         (runtime.shape_bucket(m), n, k, rank, bias is not None))
    return y


@runtime.on_input_device
def forward(x, weights, biases, a_cat, lora_bs, rank_ends, scalings, dropout_p, seed):
    """Same contract as padfree.reference.lora.forward, on the Triton kernels."""
    xa = shrink(x, a_cat, rank_ends, dropout_p, seed)
    starts = [0, *rank_ends[:-1]]
    outputs = [expand(x, weight, bias, xa[:, start:end], lora_b, scaling)
               for weight, bias, lora_b, scaling, start, end in zip(weights, biases, lora_bs, scalings, starts,
                                                                     rank_ends)]
    return outputs, xa


@runtime.on_input_device
def backward_input_and_a(dys, x, weights, t, a_cat, rank_ends, dropout_p, seed, input_grad=True):
    """Same contract as padfree.reference.lora.backward_input_and_a, on the Triton kernels."""
    dx = _grad_input(dys, x, weights, t, a_cat, rank_ends, dropout_p, seed) if input_grad else x.new_empty(0)
    if dropout_p == 0:
        return dx, t.t() @ x
    return dx, _grad_a_dropout(t, x, rank_ends, dropout_p, seed)


def _grad_input(dys, x, weights, t, a_cat, rank_ends, dropout_p, seed):
    m, k = x.shape
    rank = a_cat.shape[0]
    dx = runtime.empty((m, k), x.dtype, x.device)
    pairs = list(zip(dys, weights))
    pairs += [(dys[0], weights[0])] * (MAX_STREAMS - len(pairs))
    widths = [w.shape[0] for w in weights] + [0] * (MAX_STREAMS - len(weights))
    args = dict(t_ptr=t, a_ptr=a_cat, dx_ptr=dx, M=m, K=k, R=rank, stride_tm=t.stride(0), stride_ar=a_cat.stride(0),
                stride_dxm=dx.stride(0), **_rank_end_args(rank_ends, rank), **_dropout_args(dropout_p, seed),
                DROPOUT=dropout_p > 0, IEEE=DTYPES[x.dtype].ieee, BLOCK_R=_BLOCK_R, GROUP_M=_GROUP_M)
    for index, ((dy, weight), width) in enumerate(zip(pairs, widths)):
        args.update({f"dy{index}_ptr": dy, f"w{index}_ptr": weight, f"N{index}": width,
                     f"stride_dy{index}": dy.stride(0), f"stride_w{index}": weight.stride(0)})

    def launch(tile):
        lora_dx_kernel[(triton.cdiv(m, tile.block_m) * triton.cdiv(k, tile.block_k),)](**args, **tile.options)

    DX_TILES.launch("lora_dx", _gemm_key(x.dtype, m, k), launch, x,
                    (runtime.shape_bucket(m), k, tuple(widths), rank, dropout_p > 0))
    return dx


def _grad_a_dropout(t, x, rank_ends, dropout_p, seed):
    m, k = x.shape
    rank = t.shape[1]
    da = runtime.empty((rank, k), x.dtype, x.device)
    block_r, blocks = _stream_blocks(rank_ends, True, _DA_BLOCK_R)
    rank_blocks = blocks.pop("rank_blocks")
    args = dict(t_ptr=t, x_ptr=x, da_ptr=da, M=m, K=k, R=rank, stride_tm=t.stride(0), stride_xm=x.stride(0),
                stride_dar=da.stride(0), **blocks, **_dropout_args(dropout_p, seed), IEEE=DTYPES[x.dtype].ieee,
                BLOCK_R=block_r)

    def launch(tile):
        lora_da_kernel[(rank_blocks, triton.cdiv(k, tile.block_k))](**args, **tile.options)

    DA_TILES.launch("lora_da", (DTYPES[x.dtype].size, block_r), launch, x)
    return da


# ----------------------------------------------------------------------------- registry
def _signature(kernel, dtype: str) -> dict[str, str]:
    """Every `*_ptr` argument but the int64 seed points to `dtype` data, `scaling`/`keep_scale` are
    fp32, the rest i32."""
    names = kernel.fn.__code__.co_varnames[: kernel.fn.__code__.co_argcount]
    types = {name: f"*{dtype}" for name in names if name.endswith("_ptr")}
    return registry.signature(kernel, {**types, "seed_ptr": "*i64", "scaling": "fp32", "keep_scale": "fp32"})


# Stream boundaries and the total rank are multiples of 16 for the usual ranks (16, 32, 64, ...), and
# the JIT specializes them as such: the dA kernel's mask `rank < end` on its rank-contiguous t tile
# then changes only at 16-column boundaries, so the tile loads as 16-byte vectors (with other
# ranks, element by element: 1.24x the dropout GEMM's instructions per MFLOP at rank 64 on sm_90).
_RANK_ALIGNED = ("K", "R", "rank_end0", "rank_end1")


def _shrink_launches():
    for info in DTYPES.values():
        for dropout in (False, True):
            for block_r in _SHRINK_BLOCK_R:
                for tile, archs, _ in SHRINK_TILES.registered((info.size, block_r)):
                    yield registry.Launch.of(
                        tile, f"{info.name} r{block_r}{' dropout' if dropout else ''}",
                        _signature(lora_shrink_kernel, info.name),
                        {"DROPOUT": dropout, "IEEE": info.ieee, "BLOCK_R": block_r}, archs=archs,
                        aligned=_RANK_ALIGNED, pipelined=True, extended=info.name == "fp16")


def _gemm_launches(kernel, tiles: registry.TileTable, flag: str, aligned: tuple[str, ...]):
    """Every tile the launcher of the forward or dx GEMM can pick ("small": the small-problem one),
    with its feature `flag` (HAS_BIAS, DROPOUT) off and on."""
    def launches():
        for info in DTYPES.values():
            for size in ("small", "large"):
                for tile, archs, candidate in tiles.registered((info.size, size)):
                    for on in (False, True):
                        yield registry.Launch.of(
                            tile, f"{info.name} {'small' if size == 'small' else 'large ' + tile.label}"
                                  f"{' ' + flag.lower() if on else ''}", _signature(kernel, info.name),
                            {flag: on, "IEEE": info.ieee, "BLOCK_R": _BLOCK_R, "GROUP_M": _GROUP_M},
                            aligned=aligned, pipelined=True, extended=candidate or info.name == "fp16", archs=archs)

    return launches


def _da_launches():
    for info in DTYPES.values():
        for block_r in _DA_BLOCK_R:
            for tile, archs, _ in DA_TILES.registered((info.size, block_r)):
                yield registry.Launch.of(tile, f"{info.name} r{block_r}", _signature(lora_da_kernel, info.name),
                                         {"IEEE": info.ieee, "BLOCK_R": block_r}, archs=archs,
                                         aligned=_RANK_ALIGNED, pipelined=True, extended=info.name == "fp16")


registry.register(lora_shrink_kernel, _shrink_launches)
registry.register(lora_forward_kernel, _gemm_launches(lora_forward_kernel, FORWARD_TILES, "HAS_BIAS", ("N", "K")))
registry.register(lora_dx_kernel, _gemm_launches(lora_dx_kernel, DX_TILES, "DROPOUT", ("K", "N0", "N1", "N2")))
registry.register(lora_da_kernel, _da_launches)
