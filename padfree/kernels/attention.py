"""Varlen flash attention (FlashAttention-2 algorithm) in Triton: forward and backward.

Work is split into (sequence, block) pairs read from `cu_seqlens` on the device: a block table
(`block_table`) lists the sequence of each entry and its block inside that sequence, then how
many entries have work. The table's length is an upper bound known from shapes alone
(ceil(total/BLOCK) + B + 1), so there is no host sync, and nothing is recompiled when `max_seqlen`
changes. A program runs one entry, or, when the table has more entries than `_grid_size` gives
programs (the one-slot-per-token tables of position_ids), the kernels' STRIDED variant strides over
the entries with work.
The tokens past `cu_seqlens[-1]` form one extra "tail" entry whose programs write zeros (out, dq,
dk, dv) and lse = +inf. Row and head offsets are int64. The table lists the blocks heaviest first
(longest-processing-time order), so the GPU does not end a launch on a few long blocks while the
other SMs idle: by sequence length, or under a causal mask by the keys a query block sees (its
last blocks are heaviest) or the queries a key block serves (its first).

Scores, for query i and key j of a sequence with lengths (sq, sk), diagonal offset sk - sq:

    s_ij = scale * q_i . k_j;  s_ij = softcap * tanh(s_ij / softcap) (softcap);  s_ij -= slope * |i + sk - sq - j|
    allowed: j < sk, j >= i + sk - sq - left (left >= 0), j <= i + sk - sq + right (right >= 0)

Forward (per query block, online softmax in fp32, base-2 exponentials with log2(e) folded in):

    m' = max(m, rowmax s);  l' = l e^(m - m') + rowsum e^(s - m');  acc' = acc e^(m - m') + (e^(s - m') Z) V
    out = acc / l,  lse = m + log l   (out = 0 and lse = +inf for a row with no allowed key)

where Z = keep / (1 - dropout_p) is the dropout mask (1 without dropout); `l` sums the undropped
probabilities, so the normaliser matches the reference.

Each kernel splits its loop into masked edge blocks and the blocks every row of the tile may see
(`_unmasked_keys` / `_unmasked_queries`), which skip the causal/window mask arithmetic.

Backward, from P = exp(s - lse) (recomputed), D_i = sum_d dO_id O_id = sum_j P_ij dP_ij:

    dV = (P Z)^T dO,   dP = (dO V^T) Z,   dS = P (dP - D),   dS0 = dS (1 - tanh^2) with softcap
    dQ = scale dS0 K,  dK = scale dS0^T Q

D_i equals sum_j P_ij dP_ij because O_i = sum_j P_ij Z_ij v_j. Two kernels share the work without
atomics: `attention_bwd_dkdv_kernel` owns a key block of one key/value head and loops over every
query head of its GQA group and every query block that can see it (or twice, for dv and then dk,
with a two-pass tile: `registry.Tile.passes`); `attention_bwd_dq_kernel` owns a query block and loops over
key blocks. Every element is written by exactly one program in a fixed
order, so the backward is bitwise reproducible run to run.

Dropout draws `tl.rand(seed + ((b * Hq + h) << 32), i * sk + j)` (Philox, int64 offsets): the
same function in forward, backward and `dropout_keep_mask`, so the backward regenerates the
forward's mask and tests can hand the same mask to the reference. The seed is an int64 device
tensor the kernels load (`Seed`), drawn by the device's generator: a captured CUDA graph draws a
new one on every replay, and the backward reads the saved tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from padfree.kernels import registry, runtime
from padfree.kernels.common import DTYPES

# constexpr, so the kernels can read them (scores go to the base-2 domain, lse back)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
HEAD_DIM_PADS = (16, 32, 64, 128, 256)
# Integer arguments that change from batch to batch (token and block counts, the sequence of the
# test-only mask kernel). Triton's JIT would otherwise compile a variant per
# value-1 / multiple-of-16 pattern of each, turn a 1 into a constant, and recompile during training.
# Model dimensions and strides keep their specialization: it proves rows contiguous and aligned.
_PER_BATCH = ("num_blocks", "total_q", "total_k", "num_seqs", "seq", "seqlen_q", "seqlen_k")


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|): never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, qi, kj, sk, diagonal, softmax_scale, softcap, slope, window_left, window_right,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
            MASKED: tl.constexpr):
    """Scores in the base-2 domain (-inf where not allowed) and tanh(raw / softcap) for softcap.

    `qi` and `kj` are the query and key positions inside the sequence, shaped to broadcast against
    `qk` (the forward and dq kernels use (M, 1) x (1, N), the dk/dv kernel the transpose).
    MASKED=False skips the mask, for tiles where every pair is allowed (`_unmasked_keys`).
    """
    if SOFTCAP:
        capped = _tanh(qk * (softmax_scale / softcap))
        scores = capped * (softcap * LOG2E)
    else:
        capped = qk
        scores = qk * (softmax_scale * LOG2E)
    if ALIBI:
        distance = tl.abs(qi + diagonal - kj).to(tl.float32)
        scores = scores - (slope * LOG2E) * distance
    if MASKED:
        allowed = kj < sk
        if HAS_LEFT:
            allowed = allowed & (kj >= qi + diagonal - window_left)
        if HAS_RIGHT:
            allowed = allowed & (kj <= qi + diagonal + window_right)
        scores = tl.where(allowed, scores, float("-inf"))
    return scores, capped


@triton.jit
def _dropout_keep(seed, seq, head, num_heads, qi, kj, sk, dropout_p):
    stream = seed + ((seq * num_heads + head).to(tl.int64) << 32)
    return tl.rand(stream, qi.to(tl.int64) * sk + kj) >= dropout_p


@triton.jit
def _key_range(block_start, BLOCK: tl.constexpr, sk, diagonal, window_left, window_right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) some query of rows [block_start, block_start + BLOCK) may see; lo block-aligned."""
    lo = 0
    hi = sk
    if HAS_LEFT:
        lo = tl.maximum(block_start + diagonal - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(block_start + BLOCK + diagonal + window_right, sk)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(block_start, BLOCK: tl.constexpr, sq, diagonal, window_left, window_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Queries [lo, hi) that may see some key of [block_start, block_start + BLOCK); lo aligned."""
    lo = 0
    hi = sq
    if HAS_RIGHT:
        lo = tl.maximum(block_start - diagonal - window_right, 0)
    if HAS_LEFT:
        hi = tl.minimum(block_start + BLOCK - diagonal + window_left, sq)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _unmasked_keys(lo, hi, block_start, BLOCK: tl.constexpr, diagonal, window_left, window_right,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split keys [lo, hi) (hi <= sk) for the query rows [block_start, block_start + BLOCK):
    blocks in [full_lo, full_hi) are allowed for every row and need no mask; [lo, full_lo) and
    [full_hi, hi) do. Both bounds are block-aligned unless they collapse onto hi. Negative values
    are clamped before dividing (integer division of negatives differs between back ends)."""
    full_lo = lo
    full_hi = (tl.maximum(hi, 0) // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        need = tl.maximum(block_start + BLOCK - 1 + diagonal - window_left, 0)
        full_lo = tl.maximum(full_lo, (need + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    if HAS_RIGHT:
        limit = tl.maximum(block_start + diagonal + window_right + 1, 0)
        full_hi = tl.minimum(full_hi, limit // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(full_lo, tl.maximum(hi, lo))
    return full_lo, tl.maximum(full_hi, full_lo)


@triton.jit
def _unmasked_queries(lo, hi, block_start, BLOCK: tl.constexpr, sk, diagonal, window_left, window_right,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Split queries [lo, hi) (hi <= sq) for the key block [block_start, block_start + BLOCK) like
    `_unmasked_keys`: rows in [full_lo, full_hi) see every key of the block (none when the block
    runs past sk) and, full_hi being block-aligned, are all < sq, so their loads need no row mask.
    Rows past sq in the masked blocks are harmless: their lse is loaded as +inf, so p = 0."""
    full_lo = lo
    full_hi = (tl.maximum(hi, 0) // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        need = tl.maximum(block_start + BLOCK - 1 - diagonal - window_right, 0)
        full_lo = tl.maximum(full_lo, (need + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    if HAS_LEFT:
        limit = tl.maximum(block_start - diagonal + window_left + 1, 0)
        full_hi = tl.minimum(full_hi, limit // BLOCK_M * BLOCK_M)
    if block_start + BLOCK > sk:
        full_lo = hi
    full_lo = tl.minimum(full_lo, tl.maximum(hi, lo))
    return full_lo, tl.maximum(full_hi, full_lo)


@triton.jit
def _tile(base, first_row, stride_t, head, stride_h, rows, cols):
    """Pointers to rows `first_row + rows` of one head: a 64-bit scalar base (the row and the head
    offset: head * stride_h passes 2^31 in head-major layouts) plus 32-bit offsets inside the tile,
    so addresses stay cheap and never overflow."""
    scalar = first_row.to(tl.int64) * stride_t + head.to(tl.int64) * stride_h
    return base + scalar + rows[:, None] * stride_t + cols[None, :]


@triton.jit
def _sequence(Cu, seq):
    start = tl.load(Cu + seq)
    return start, tl.load(Cu + seq + 1) - start


@triton.jit
def _fwd_keys(acc, m_i, l_i, q, K, V, k_start, start, stop, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
              offs_m, tile_n, offs_d, d_ok, sk, diagonal, softmax_scale, softcap, slope, window_left, window_right,
              dropout_p, seed, seq, head, num_heads, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax update of one query block over the key blocks starting in [start, stop)."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tile_n
        kv_ok = (offs_n < sk)[:, None] & d_ok[None, :]
        k = tl.load(_tile(K, k_start + start_n, stride_kt, kv_head, stride_kh, tile_n, offs_d), mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores, _ = _scores(qk, offs_m[:, None], offs_n[None, :], sk, diagonal, softmax_scale, softcap, slope,
                            window_left, window_right, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASKED)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no allowed key so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, seq, head, num_heads, offs_m[:, None], offs_n[None, :], sk, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(_tile(V, k_start + start_n, stride_vt, kv_head, stride_vh, tile_n, offs_d), mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_entry(entry, seed, Q, K, V, Out, Lse, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh, stride_kt, stride_kh,
               stride_vt, stride_vh, stride_ot, stride_oh, stride_alibi, num_blocks, total_q, num_seqs, num_heads,
               group, head_dim, softmax_scale, softcap, window_left, window_right, dropout_p, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """The forward of one block-table entry: a query block, or a tail block of zeros."""
    head = tl.program_id(1)
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < head_dim
    seq = tl.load(Blocks + entry)
    block_start = tl.load(Blocks + num_blocks + entry) * BLOCK_M
    offs_m = block_start + tile_m
    if seq == num_seqs:
        first = tl.load(CuQ + num_seqs) + block_start
        row_ok = first + tile_m < total_q
        tl.store(_tile(Out, first, stride_ot, head, stride_oh, tile_m, offs_d),
                 tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + head.to(tl.int64) * total_q + first + tile_m, tl.full([BLOCK_M], float("inf"), tl.float32),
                 mask=row_ok)
    elif seq < num_seqs:
        q_start, sq = _sequence(CuQ, seq)
        k_start, sk = _sequence(CuK, seq)
        diagonal = sk - sq
        kv_head = head // group
        row_ok = offs_m < sq
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_tile(Q, q_start + block_start, stride_qt, head, stride_qh, tile_m, offs_d), mask=q_ok,
                    other=0.0)
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + seq * stride_alibi + head)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        lo, hi = _key_range(block_start, BLOCK_M, sk, diagonal, window_left, window_right,
                            HAS_LEFT, HAS_RIGHT, BLOCK_N)
        full_lo, full_hi = _unmasked_keys(lo, hi, block_start, BLOCK_M, diagonal, window_left, window_right,
                                          HAS_LEFT, HAS_RIGHT, BLOCK_N)
        # masked key blocks [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi); unrolled
        bounds = (lo, full_lo, full_hi, hi)
        for part in tl.static_range(3):
            acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, K, V, k_start, bounds[part], bounds[part + 1], kv_head,
                                      stride_kt, stride_kh, stride_vt, stride_vh, offs_m, tile_n, offs_d, d_ok, sk,
                                      diagonal, softmax_scale, softcap, slope, window_left, window_right, dropout_p,
                                      seed, seq, head, num_heads, BLOCK_N, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                                      DROPOUT, PRECISION, part != 1)
        has_key = l_i > 0.0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("inf"))
        tl.store(_tile(Out, q_start + block_start, stride_ot, head, stride_oh, tile_m, offs_d),
                 out.to(Out.dtype.element_ty), mask=q_ok)
        tl.store(Lse + head.to(tl.int64) * total_q + q_start + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=_PER_BATCH)
def attention_fwd_kernel(Q, K, V, Out, Lse, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_ot, stride_oh, stride_alibi, num_blocks, total_q, num_seqs,
                         num_heads, group, head_dim, softmax_scale, softcap, window_left, window_right, dropout_p, Seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr, STRIDED: tl.constexpr):
    # the seed is read on the device (drawn there), so a CUDA graph replay uses the new one
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    if STRIDED:
        # more table entries than programs (position_ids give a slot per token): the programs
        # stride over the entries with work, whose count the table ends with. disable_licm: hoisted
        # out of this loop, the entry-invariant index vectors and offsets would stay live across the
        # inner loops and spill (sm_90, head dim 128: 304 B at 128x128, 56 B at 128x64)
        for entry in tl.range(tl.program_id(0), tl.load(Blocks + 2 * num_blocks), tl.num_programs(0),
                              disable_licm=True):
            _fwd_entry(entry, seed, Q, K, V, Out, Lse, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh, stride_kt,
                       stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_alibi, num_blocks, total_q,
                       num_seqs, num_heads, group, head_dim, softmax_scale, softcap, window_left, window_right,
                       dropout_p, BLOCK_M, BLOCK_N, HEAD_DIM_PAD, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                       PRECISION)
    else:
        # one entry per program: no outer loop, which would keep more tiles live (registers)
        _fwd_entry(tl.program_id(0), seed, Q, K, V, Out, Lse, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh, stride_kt,
                   stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_alibi, num_blocks, total_q, num_seqs,
                   num_heads, group, head_dim, softmax_scale, softcap, window_left, window_right, dropout_p, BLOCK_M,
                   BLOCK_N, HEAD_DIM_PAD, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, PRECISION)


@triton.jit(do_not_specialize=_PER_BATCH)
def attention_bwd_delta_kernel(Out, DOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh, total_q, head_dim,
                               BLOCK_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """D_i = sum_d dO_id O_id (fp32), laid out (Hq, total_q) like lse."""
    head = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_M
    tile_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = first + tile_m < total_q
    ok = row_ok[:, None] & (offs_d < head_dim)[None, :]
    out = tl.load(_tile(Out, first, stride_ot, head, stride_oh, tile_m, offs_d), mask=ok, other=0.0)
    dout = tl.load(_tile(DOut, first, stride_dot, head, stride_doh, tile_m, offs_d), mask=ok, other=0.0)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(Delta + head.to(tl.int64) * total_q + first + tile_m, delta, mask=row_ok)


@triton.jit
def _dq_keys(dq, q, dout, lse, delta, K, V, k_start, start, stop, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
             offs_m, tile_n, offs_d, d_ok, sk, diagonal, softmax_scale, softcap, slope, window_left, window_right,
             dropout_p, seed, seq, head, num_heads, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
             HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
             PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dq of one query block accumulated over the key blocks starting in [start, stop) (unscaled)."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tile_n
        kv_ok = (offs_n < sk)[:, None] & d_ok[None, :]
        k = tl.load(_tile(K, k_start + start_n, stride_kt, kv_head, stride_kh, tile_n, offs_d), mask=kv_ok, other=0.0)
        v = tl.load(_tile(V, k_start + start_n, stride_vt, kv_head, stride_vh, tile_n, offs_d), mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores, capped = _scores(qk, offs_m[:, None], offs_n[None, :], sk, diagonal, softmax_scale, softcap, slope,
                                 window_left, window_right, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASKED)
        p = tl.math.exp2(scores - (lse * LOG2E)[:, None])
        dp = tl.dot(dout, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, seq, head, num_heads, offs_m[:, None], offs_n[None, :], sk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - capped * capped)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dkdv_queries(dk, dv, k, v, Q, DOut, Lse, Delta, q_start, start, stop, head, stride_qt, stride_qh, stride_dot,
                  stride_doh, total_q, offs_n, tile_m, offs_d, d_ok, sq, sk, diagonal, softmax_scale, softcap, slope,
                  window_left, window_right, dropout_p, seed, seq, num_heads, BLOCK_M: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  DROPOUT: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, OUTPUT: tl.constexpr):
    """dk (unscaled) and dv of one key block accumulated over query head `head`'s blocks in [start, stop);
    OUTPUT "dk" or "dv" computes only that one (dv needs neither dO V^T nor D).
    MASKED=False blocks lie below sq (`_unmasked_queries`): their loads take no row mask."""
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tile_m
        lse_rows = Lse + head.to(tl.int64) * total_q + q_start + offs_m
        delta_rows = Delta + head.to(tl.int64) * total_q + q_start + offs_m
        if MASKED:
            row_ok = offs_m < sq
            q_ok = row_ok[:, None] & d_ok[None, :]
            lse = tl.load(lse_rows, mask=row_ok, other=float("inf"))
            if OUTPUT != "dv":
                delta = tl.load(delta_rows, mask=row_ok, other=0.0)
        else:
            q_ok = d_ok[None, :]
            lse = tl.load(lse_rows)
            if OUTPUT != "dv":
                delta = tl.load(delta_rows)
        q = tl.load(_tile(Q, q_start + start_m, stride_qt, head, stride_qh, tile_m, offs_d), mask=q_ok, other=0.0)
        dout = tl.load(_tile(DOut, q_start + start_m, stride_dot, head, stride_doh, tile_m, offs_d), mask=q_ok,
                       other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        scores_t, capped_t = _scores(qk_t, offs_m[None, :], offs_n[:, None], sk, diagonal, softmax_scale, softcap,
                                     slope, window_left, window_right, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASKED)
        p_t = tl.math.exp2(scores_t - (lse * LOG2E)[None, :])
        if OUTPUT != "dv":
            dp_t = tl.dot(v, tl.trans(dout), input_precision=PRECISION)
        if DROPOUT:
            keep_t = _dropout_keep(seed, seq, head, num_heads, offs_m[None, :], offs_n[:, None], sk, dropout_p)
            dropped_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
            if OUTPUT != "dv":
                dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
        else:
            dropped_t = p_t
        if OUTPUT != "dk":
            dv += tl.dot(dropped_t.to(dout.dtype), dout, input_precision=PRECISION)
        if OUTPUT != "dv":
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - capped_t * capped_t)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_entry(entry, seed, Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh,
                stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt,
                stride_dvh, stride_alibi, num_blocks, total_q, total_k, num_seqs, num_heads, group, head_dim,
                softmax_scale, softcap, window_left, window_right, dropout_p, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                OUTPUT: tl.constexpr):
    """dk and dv (OUTPUT "dkdv"), or one of them ("dk", "dv"), of one block-table entry: a key block of
    one key/value head, or a tail block of zeros."""
    kv_head = tl.program_id(1)
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < head_dim
    seq = tl.load(Blocks + entry)
    block_start = tl.load(Blocks + num_blocks + entry) * BLOCK_N
    offs_n = block_start + tile_n
    if seq == num_seqs:
        first = tl.load(CuK + num_seqs) + block_start
        ok = (first + tile_n < total_k)[:, None] & d_ok[None, :]
        if OUTPUT != "dv":
            tl.store(_tile(DK, first, stride_dkt, kv_head, stride_dkh, tile_n, offs_d),
                     tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=DK.dtype.element_ty), mask=ok)
        if OUTPUT != "dk":
            tl.store(_tile(DV, first, stride_dvt, kv_head, stride_dvh, tile_n, offs_d),
                     tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=DV.dtype.element_ty), mask=ok)
    elif seq < num_seqs:
        q_start, sq = _sequence(CuQ, seq)
        k_start, sk = _sequence(CuK, seq)
        diagonal = sk - sq
        kv_ok = (offs_n < sk)[:, None] & d_ok[None, :]
        k = tl.load(_tile(K, k_start + block_start, stride_kt, kv_head, stride_kh, tile_n, offs_d), mask=kv_ok,
                    other=0.0)
        # (the dv pass never reads v: the compiler drops the load)
        v = tl.load(_tile(V, k_start + block_start, stride_vt, kv_head, stride_vh, tile_n, offs_d), mask=kv_ok,
                    other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
        lo, hi = _query_range(block_start, BLOCK_N, sq, diagonal, window_left, window_right,
                              HAS_LEFT, HAS_RIGHT, BLOCK_M)
        full_lo, full_hi = _unmasked_queries(lo, hi, block_start, BLOCK_N, sk, diagonal, window_left, window_right,
                                             HAS_LEFT, HAS_RIGHT, BLOCK_M)
        for member in range(0, group):
            head = kv_head * group + member
            slope = 0.0
            if ALIBI:
                slope = tl.load(Alibi + seq * stride_alibi + head)
            # unmasked query blocks [full_lo, full_hi), then masked [full_hi, hi), then masked [lo, full_lo),
            # unrolled. The causal diagonal ([lo, full_lo)) goes last, as it does in the forward and dq:
            # ptxas computes the addresses of a loop's first loads before the loops ahead of it, and
            # those would stay live across the loop with the most live values (head dim 256, sm_90: the
            # causal dv pass spilled 8 B at 255 registers with the diagonal first, 250 and none last)
            starts = (full_lo, full_hi, lo)
            stops = (full_hi, hi, full_lo)
            for part in tl.static_range(3):
                dk, dv = _dkdv_queries(dk, dv, k, v, Q, DOut, Lse, Delta, q_start, starts[part], stops[part],
                                       head, stride_qt, stride_qh, stride_dot, stride_doh, total_q, offs_n, tile_m,
                                       offs_d, d_ok, sq, sk, diagonal, softmax_scale, softcap, slope, window_left,
                                       window_right, dropout_p, seed, seq, num_heads, BLOCK_M, HAS_LEFT, HAS_RIGHT,
                                       SOFTCAP, ALIBI, DROPOUT, PRECISION, part != 0, OUTPUT)
        if OUTPUT != "dv":
            tl.store(_tile(DK, k_start + block_start, stride_dkt, kv_head, stride_dkh, tile_n, offs_d),
                     (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_ok)
        if OUTPUT != "dk":
            tl.store(_tile(DV, k_start + block_start, stride_dvt, kv_head, stride_dvh, tile_n, offs_d),
                     dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=_PER_BATCH)
def attention_bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh,
                              stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt,
                              stride_dkh, stride_dvt, stride_dvh, stride_alibi, num_blocks, total_q, total_k, num_seqs,
                              num_heads, group, head_dim, softmax_scale, softcap, window_left, window_right, dropout_p,
                              Seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                              ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                              STRIDED: tl.constexpr, OUTPUT: tl.constexpr):
    # the seed is read on the device (drawn there), so a CUDA graph replay uses the new one
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    if STRIDED:
        # more table entries than programs (position_ids give a slot per token): the programs
        # stride over the entries with work, whose count the table ends with. disable_licm: hoisted
        # out of this loop, the entry-invariant index vectors and offsets would stay live across the
        # inner loops and spill (sm_90, head dim 128: 72-240 B at 16x128)
        for entry in tl.range(tl.program_id(0), tl.load(Blocks + 2 * num_blocks), tl.num_programs(0),
                              disable_licm=True):
            _dkdv_entry(entry, seed, Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh,
                        stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh,
                        stride_dvt, stride_dvh, stride_alibi, num_blocks, total_q, total_k, num_seqs, num_heads, group,
                        head_dim, softmax_scale, softcap, window_left, window_right, dropout_p, BLOCK_M, BLOCK_N,
                        HEAD_DIM_PAD, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, PRECISION, OUTPUT)
    else:
        # one entry per program: no outer loop, which would keep more tiles live (registers)
        _dkdv_entry(tl.program_id(0), seed, Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, Blocks, Alibi, stride_qt,
                    stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt,
                    stride_dkh, stride_dvt, stride_dvh, stride_alibi, num_blocks, total_q, total_k, num_seqs, num_heads,
                    group, head_dim, softmax_scale, softcap, window_left, window_right, dropout_p, BLOCK_M, BLOCK_N,
                    HEAD_DIM_PAD, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, PRECISION, OUTPUT)


@triton.jit
def _dq_entry(entry, seed, Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh, stride_kt,
              stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_alibi, num_blocks,
              total_q, num_seqs, num_heads, group, head_dim, softmax_scale, softcap, window_left, window_right,
              dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one block-table entry: a query block, or a tail block of zeros."""
    head = tl.program_id(1)
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < head_dim
    seq = tl.load(Blocks + entry)
    block_start = tl.load(Blocks + num_blocks + entry) * BLOCK_M
    offs_m = block_start + tile_m
    if seq == num_seqs:
        first = tl.load(CuQ + num_seqs) + block_start
        tl.store(_tile(DQ, first, stride_dqt, head, stride_dqh, tile_m, offs_d),
                 tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=DQ.dtype.element_ty),
                 mask=(first + tile_m < total_q)[:, None] & d_ok[None, :])
    elif seq < num_seqs:
        q_start, sq = _sequence(CuQ, seq)
        k_start, sk = _sequence(CuK, seq)
        diagonal = sk - sq
        kv_head = head // group
        row_ok = offs_m < sq
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_tile(Q, q_start + block_start, stride_qt, head, stride_qh, tile_m, offs_d), mask=q_ok,
                    other=0.0)
        dout = tl.load(_tile(DOut, q_start + block_start, stride_dot, head, stride_doh, tile_m, offs_d),
                       mask=q_ok, other=0.0)
        lse = tl.load(Lse + head.to(tl.int64) * total_q + q_start + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + head.to(tl.int64) * total_q + q_start + offs_m, mask=row_ok, other=0.0)
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + seq * stride_alibi + head)
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        lo, hi = _key_range(block_start, BLOCK_M, sk, diagonal, window_left, window_right,
                            HAS_LEFT, HAS_RIGHT, BLOCK_N)
        full_lo, full_hi = _unmasked_keys(lo, hi, block_start, BLOCK_M, diagonal, window_left, window_right,
                                          HAS_LEFT, HAS_RIGHT, BLOCK_N)
        # masked key blocks [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi); unrolled
        bounds = (lo, full_lo, full_hi, hi)
        for part in tl.static_range(3):
            dq = _dq_keys(dq, q, dout, lse, delta, K, V, k_start, bounds[part], bounds[part + 1], kv_head, stride_kt,
                          stride_kh, stride_vt, stride_vh, offs_m, tile_n, offs_d, d_ok, sk, diagonal, softmax_scale,
                          softcap, slope, window_left, window_right, dropout_p, seed, seq, head, num_heads, BLOCK_N,
                          HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, PRECISION, part != 1)
        tl.store(_tile(DQ, q_start + block_start, stride_dqt, head, stride_dqh, tile_m, offs_d),
                 (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_ok)


@triton.jit(do_not_specialize=_PER_BATCH)
def attention_bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh, stride_kt,
                            stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                            stride_alibi, num_blocks, total_q, num_seqs, num_heads, group, head_dim, softmax_scale,
                            softcap, window_left, window_right, dropout_p, Seed, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_LEFT: tl.constexpr,
                            HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                            PRECISION: tl.constexpr, STRIDED: tl.constexpr):
    # the seed is read on the device (drawn there), so a CUDA graph replay uses the new one
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    if STRIDED:
        # more table entries than programs (position_ids give a slot per token): the programs
        # stride over the entries with work, whose count the table ends with. disable_licm: hoisted
        # out of this loop, the entry-invariant index vectors and offsets would stay live across the
        # inner loops and spill (sm_90, head dim 128: 8 B at 128x32)
        for entry in tl.range(tl.program_id(0), tl.load(Blocks + 2 * num_blocks), tl.num_programs(0),
                              disable_licm=True):
            _dq_entry(entry, seed, Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh,
                      stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                      stride_alibi, num_blocks, total_q, num_seqs, num_heads, group, head_dim, softmax_scale, softcap,
                      window_left, window_right, dropout_p, BLOCK_M, BLOCK_N, HEAD_DIM_PAD, HAS_LEFT, HAS_RIGHT,
                      SOFTCAP, ALIBI, DROPOUT, PRECISION)
    else:
        # one entry per program: no outer loop, which would keep more tiles live (registers)
        _dq_entry(tl.program_id(0), seed, Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, Blocks, Alibi, stride_qt, stride_qh,
                  stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                  stride_alibi, num_blocks, total_q, num_seqs, num_heads, group, head_dim, softmax_scale, softcap,
                  window_left, window_right, dropout_p, BLOCK_M, BLOCK_N, HEAD_DIM_PAD, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                  ALIBI, DROPOUT, PRECISION)


@triton.jit(do_not_specialize=_PER_BATCH)
def attention_dropout_mask_kernel(Keep, Seed, seq, head_offset, num_heads, seqlen_q, seqlen_k, dropout_p,
                                  BLOCK: tl.constexpr):
    """The keep-mask the attention kernels use for one sequence, as int8 (Hq, sq, sk) (tests)."""
    head = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(Seed), seq, head + head_offset, num_heads, offs_m[:, None], offs_n[None, :],
                         seqlen_k, dropout_p)
    index = (head.to(tl.int64) * seqlen_q + offs_m[:, None]) * seqlen_k + offs_n[None, :]
    tl.store(Keep + index, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


def _qk_tile(block_m: int, block_n: int, num_warps: int, num_stages: int, passes: int = 1) -> registry.Tile:
    """An attention tile: BLOCK_M query rows, BLOCK_N key rows (no BLOCK_K: the reduction of the
    score GEMM is the head dim); `passes=2` runs the dk/dv kernel as dv, then dk, in two launches,
    each with one fp32 accumulator (head dim 256: dk and dv of the 64 key rows a wgmma needs take
    2 x 128 registers a thread together)."""
    return registry.Tile(block_m, block_n, None, num_warps, num_stages, passes)


def dkdv_outputs(tile: registry.Tile) -> tuple[str, ...]:
    """The OUTPUT of each dk/dv launch of `tile`: both in one, or dv then dk."""
    return ("dv", "dk") if tile.passes == 2 else ("dkdv",)


def head_dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def tile_key(kind: str, head_dim_padded: int, dtype: torch.dtype) -> tuple[str, int, int]:
    """The key of TILES: kernel ("fwd", "dkdv", "dq"), padded head dim, element size."""
    return kind, head_dim_padded, DTYPES[dtype].size


# Tile sizes per (kernel, padded head dim, 2-byte or 4-byte inputs), sized so the register-resident
# tiles fit: the forward holds a (BLOCK_M, D) query tile and its fp32 accumulator and streams
# (BLOCK_N, D) key/value tiles; the dk/dv kernel holds (BLOCK_N, D) k, v and the fp32 dk, dv and
# streams narrow query blocks; the dq kernel holds q, dO and the fp32 dq. fp32 inputs (ieee dots)
# halve the tiles. Not tuned on a GPU yet: `padfree compile-check --efficiency` reports registers,
# spills and MMA use (docs/efficiency.md). Triton lays chained dots out with warpsPerCTA =
# [num_warps, 1] and a warp covers 16 rows, so the rows of every MMA (the forward and dq: BLOCK_M;
# dk/dv: BLOCK_N, it computes the transposed scores) must be >= 16 * num_warps, or warps compute
# the same rows twice; and >= 64 for Hopper's wgmma.
_DEFAULTS = {
    ("fwd", 16, 2): _qk_tile(128, 64, 4, 3), ("fwd", 32, 2): _qk_tile(128, 64, 4, 3),
    ("fwd", 64, 2): _qk_tile(128, 64, 8, 3), ("fwd", 128, 2): _qk_tile(128, 64, 8, 3),
    ("fwd", 256, 2): _qk_tile(64, 64, 8, 2),
    ("dkdv", 16, 2): _qk_tile(32, 128, 4, 3), ("dkdv", 32, 2): _qk_tile(32, 128, 4, 3),
    ("dkdv", 64, 2): _qk_tile(16, 128, 8, 2), ("dkdv", 128, 2): _qk_tile(16, 128, 8, 2),
    ("dkdv", 256, 2): _qk_tile(64, 16, 8, 2, passes=2),
    ("dq", 16, 2): _qk_tile(128, 32, 4, 3), ("dq", 32, 2): _qk_tile(128, 32, 4, 3),
    ("dq", 64, 2): _qk_tile(128, 32, 8, 2), ("dq", 128, 2): _qk_tile(128, 32, 8, 2),
    ("dq", 256, 2): _qk_tile(64, 64, 8, 2),
}
for (_kind, _pad, _size), _t in list(_DEFAULTS.items()):
    _DEFAULTS[(_kind, _pad, 4)] = _qk_tile(max(16, _t.block_m // 2), max(16, _t.block_n // 2), _t.num_warps, 2,
                                           _t.passes)
# fp32 at head dim 256 keeps tiles of its own: halved, the 64x64 8-warp forward and dq above need 100 and
# 132 KB of shared memory (sm_86/89 have 99 KB) and spill
_DEFAULTS.update({("fwd", 256, 4): _qk_tile(32, 16, 8, 2), ("dq", 256, 4): _qk_tile(32, 16, 4, 2),
                  ("dkdv", 256, 4): _qk_tile(16, 16, 8, 2)})

# A different default on one arch, where the compile check shows the base tile leaves speed on the
# table. Hopper: 228 KiB of shared memory and wgmma fit the 128x128 forward without spills (sm_80
# spills it), and the head-dim-64 dk/dv steps 32 queries at a time (sm_80 spills that). At head
# dim 256 its wgmma needs 64 rows a warpgroup, whose fp32 (64, 256) accumulator alone takes 128
# registers a thread: the forward and dq run 128 rows on 8 warps 16 keys at a time
# (64-row tiles on 4 warps spill: each thread then holds twice the load addresses), and dk/dv runs
# 128 keys in two passes (dv, then dk: one accumulator each; the score GEMM K Q^T is computed in both,
# 5 GEMMs for 4). On sm_80 the same tiles replicate their mma.sync work: there Triton lays the warps
# of these chained dots over columns ([1, num_warps]), so the base head-dim-256 tiles give each warp
# 8 score columns (fwd/dq BLOCK_N, dk/dv BLOCK_M = 8 * num_warps); dk/dv runs two passes there too
# (one pass spills 32 B causal). See docs/efficiency.md.
_ARCH_DEFAULTS = {90: {("fwd", 128, 2): _qk_tile(128, 128, 8, 3), ("dkdv", 64, 2): _qk_tile(32, 128, 8, 2),
                       ("fwd", 256, 2): _qk_tile(128, 16, 8, 3),
                       ("dq", 256, 2): _qk_tile(128, 16, 8, 2), ("dkdv", 256, 2): _qk_tile(16, 128, 8, 2, passes=2)},
                  # the base head-dim-256 forward and dq tiles need 104 and 136 KB of shared memory,
                  # over their 99 KB
                  86: {("fwd", 256, 2): _qk_tile(32, 32, 4, 2), ("dq", 256, 2): _qk_tile(32, 32, 4, 2)},
                  89: {("fwd", 256, 2): _qk_tile(32, 32, 4, 2), ("dq", 256, 2): _qk_tile(32, 32, 4, 2)}}

# More tiles for 16-bit head dim 128 (Llama-class models), timed on the GPU on first use per shape
# with PADFREE_AUTOTUNE=1 (runtime.pick; the default is used otherwise). Each compiles for its archs
# without spills or replicated MMAs in the plain and causal kernels (`compile-check --efficiency`);
# larger ones (32x128 dk/dv, 64x64 w4 dq; 128x64 dq causal) and the 3-stage 16x128 dk/dv spill, and
# 64x32 w4 dq issues 1.2x the instructions per MFLOP of the textbook dq at that tile.
_CANDIDATES = {
    ("fwd", 128, 2): (_qk_tile(128, 128, 8, 3), _qk_tile(128, 32, 8, 3), _qk_tile(128, 64, 8, 4)),
    ("dq", 128, 2): (_qk_tile(128, 32, 8, 3),),
}

# Tiles registered and picked only on some archs (they spill, replicate or do not fit on the others).
# The 128x64 4-stage forward needs 128 KB of shared memory, over the 99 KB of sm_86/sm_89
# (runtime.launch_tuned also skips a candidate the GPU refuses).
# Where an arch has its own tile it runs only that one: at head dim 256 Hopper's base tiles
# replicate (forward, dk/dv) or spill (dq), and the base forward and dq do not fit sm_86/sm_89.
TILES = registry.TileTable(_DEFAULTS, _ARCH_DEFAULTS, _CANDIDATES, only_on={
    **{(key, tile): (90,) for key, tile in _ARCH_DEFAULTS[90].items()},
    **{(key, tile): (86, 89) for key, tile in _ARCH_DEFAULTS[86].items()},
    **{((kind, pad, 2), _DEFAULTS[kind, pad, 2]): (80, 86, 89) for kind, pad in (("dkdv", 64), ("dkdv", 256))},
    **{((kind, 256, 2), _DEFAULTS[kind, 256, 2]): (80,) for kind in ("fwd", "dq")},
    (("fwd", 128, 2), _qk_tile(128, 64, 8, 4)): registry.BIG_SHARED_MEMORY_ARCHS})


def override_tiles(block_m: int, block_n: int, passes: int = 1):
    """TILES.override with a block_m x block_n tile on 4 warps, 1 stage, for every attention kernel
    (tests shrink the tiles, e.g. to 16 x 16, so that small interpreted shapes cross many tile
    edges); `passes=2` runs the dk/dv kernel as two launches (dv, then dk) like the head-dim-256
    tiles."""
    return TILES.override(_qk_tile(block_m, block_n, 4, 1, passes))


def delta_rows(head_dim_padded: int) -> int:
    """Rows per program of the D_i kernel: two (rows, D) tiles stay at 8192 elements."""
    return min(128, 8192 // head_dim_padded)


MASK_BLOCK = 32


TABLE_ORDERS = ("length", "causal_queries", "causal_keys")


def block_table(cu_seqlens: torch.Tensor, total: int, block: int, order: str = "length",
                cache: bool = True) -> torch.Tensor:
    """int32 (2 G + 1,): G entries of (sequence, block index inside it), as two rows of G (sequence
    B = the tail of padding tokens, B + 1 = nothing to do), then the number of entries with work
    (real blocks and the tail's), which come first. G depends on shapes only; the count lives on
    the device. Entries come heaviest first by the estimate `order` names (see _build_block_table).

    Every layer of a model gets the same `cu_seqlens` tensor, so the tables are kept on it and
    built once per batch; they are keyed by its version counter, so an in-place update (a reused
    buffer) builds them again. Inference tensors have no version counter and are not cached.
    While a CUDA graph is being captured the table is built inside the graph and not cached: a
    replay after `static_cu_seqlens.copy_(new)` must rebuild it from the new offsets, and a table
    from the graph's memory pool must never be served to eager code. With `cache=False` (the
    public op inside torch.compile) it is built and not kept."""
    if not cache or _capturing(cu_seqlens):
        return _build_block_table(cu_seqlens, total, block, order)
    try:
        version = cu_seqlens._version
    except RuntimeError:
        return _build_block_table(cu_seqlens, total, block, order)
    cached = getattr(cu_seqlens, "_padfree_block_tables", None)
    if cached is None or cached[0] != version:
        cached = (version, {})
        cu_seqlens._padfree_block_tables = cached
    table = cached[1].get((total, block, order))
    if table is None:
        table = cached[1][(total, block, order)] = _build_block_table(cu_seqlens, total, block, order)
    return table


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `tensor`'s GPU."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _build_block_table(cu_seqlens: torch.Tensor, total: int, block: int, order: str = "length") -> torch.Tensor:
    """The (sequence, block) pairs in sequence order, then sorted (stably, on the device) by the
    work estimate of `order`, largest first: "length" the sequence length L (every block of a
    sequence sees all its keys or queries), "causal_queries" min((b + 1) * block, L) (query block
    b sees the keys up to its last row), "causal_keys" L - b * block (key block b serves the
    queries from its first row on). The tail and the empty programs go last."""
    if order not in TABLE_ORDERS:
        raise ValueError(f"order must be one of {TABLE_ORDERS}, got {order!r}")
    num_seqs = cu_seqlens.numel() - 1
    offsets = cu_seqlens.to(torch.int64)
    lengths = torch.cat([offsets[1:] - offsets[:-1], total - offsets[-1:]])
    ends = torch.cumsum((lengths + block - 1) // block, 0)
    count = triton.cdiv(total, block) + num_seqs + 1
    program = torch.arange(count, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, program, right=True)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    index = program - starts[seq.clamp(max=num_seqs)]
    length = lengths[seq.clamp(max=num_seqs)]
    if order == "causal_queries":
        work = torch.minimum((index + 1) * block, length)
    elif order == "causal_keys":
        work = length - index * block
    else:
        work = length
    work = torch.where(seq < num_seqs, work, num_seqs - 1 - seq)
    permutation = torch.argsort(work, descending=True, stable=True)
    return torch.cat([torch.stack([seq, index])[:, permutation].flatten(), ends[-1:]]).to(torch.int32)


# Programs beyond 2 ceil(total / block) a launch may have (see _grid_size); tests lower it.
SPARE_PROGRAMS = 1024


def _grid_size(table: torch.Tensor, total: int, block: int) -> tuple[int, int]:
    """(G entries of `table`, programs to launch). At most ceil(total / block) + S + 1 entries have
    work, S the sequences that are not empty; S is only known on the device, and a table from
    `cu_seqlens_from_position_ids` has a slot per token. Up to 2 ceil(total / block) +
    SPARE_PROGRAMS programs run one entry each (every batch of up to about a thousand more sequences
    than blocks, so ordinary batches never need the STRIDED variant); past that the programs
    stride over the entries, a few rounds instead of one program per token."""
    entries = (table.numel() - 1) // 2
    return entries, min(entries, 2 * triton.cdiv(total, block) + SPARE_PROGRAMS)


def _flags(alibi_slopes, window_left, window_right, softcap, dropout_p, dtype):
    return dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap > 0,
                ALIBI=alibi_slopes is not None, DROPOUT=dropout_p > 0,
                PRECISION=DTYPES[dtype].precision)


def _alibi_args(alibi_slopes, fallback):
    if alibi_slopes is None:
        return fallback, 0
    return alibi_slopes, (alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0)


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run this input, or None."""
    if (reason := runtime.interpreter_bf16_reason(q)) is not None:
        return f"{reason}; use fp16/fp32 on CPU"
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] < 8:
        return "bf16 needs sm_80 or newer"
    return None


@runtime.on_input_device
def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, window_left, window_right, softcap,
            alibi_slopes, dropout_p, seed, *, cache_tables=True):
    """Launch the forward; returns out (total_q, Hq, D) and lse (Hq, total_q) fp32. `max_seqlen_q`
    only keys a tuned tile (the grid comes from the block table); `cache_tables` goes to
    `block_table`."""
    total_q, num_heads, head_dim = q.shape
    out = runtime.empty((total_q, num_heads, head_dim), q.dtype, q.device)
    lse = runtime.empty((num_heads, total_q), torch.float32, q.device)
    if total_q == 0 or num_heads == 0:
        return out, lse
    pad = head_dim_pad(head_dim)
    flags = _flags(alibi_slopes, window_left, window_right, softcap, dropout_p, q.dtype)
    alibi, stride_alibi = _alibi_args(alibi_slopes, lse)

    def launch(tile):
        blocks = block_table(cu_seqlens_q, total_q, tile.block_m, _table_order(flags, "queries"), cache_tables)
        entries, programs = _grid_size(blocks, total_q, tile.block_m)
        attention_fwd_kernel[(programs, num_heads)](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, blocks, alibi,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), stride_alibi, entries, total_q, cu_seqlens_q.numel() - 1, num_heads,
            num_heads // k.shape[1], head_dim, softmax_scale, softcap, window_left, window_right, dropout_p, seed,
            HEAD_DIM_PAD=pad, **flags, STRIDED=programs < entries, **tile.options)

    shape = _tuning_shape(pad, flags, total_q, max_seqlen_q, num_heads, k.shape[1])
    TILES.launch("attention_fwd", tile_key("fwd", pad, q.dtype), launch, q, shape)
    return out, lse


def _table_order(flags: dict, side: str) -> str:
    """The block-table order of query-block ("queries") or key-block ("keys") kernels: a right
    window bound (causal) makes the work of a block depend on its position, else on its length."""
    return f"causal_{side}" if flags["HAS_RIGHT"] else "length"


def _tuning_shape(pad, flags, total_q, max_seqlen_q, num_heads, num_kv_heads) -> tuple:
    """What a tuned tile is kept for: head dim, feature flags, token count and longest sequence
    rounded up to powers of two, heads."""
    return (pad, tuple(sorted(flags.items())), runtime.shape_bucket(total_q), runtime.shape_bucket(max_seqlen_q),
            num_heads, num_kv_heads)


@runtime.on_input_device
def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, window_left,
             window_right, softcap, alibi_slopes, dropout_p, seed, *, cache_tables=True):
    """Launch the backward; returns dq, dk, dv in the dtypes of q, k, v. `cache_tables` goes to
    `block_table`."""
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    dq = runtime.empty(q.shape, q.dtype, q.device)
    dk = runtime.empty(k.shape, k.dtype, k.device)
    dv = runtime.empty(v.shape, v.dtype, v.device)
    pad = head_dim_pad(head_dim)
    flags = _flags(alibi_slopes, window_left, window_right, softcap, dropout_p, q.dtype)
    num_seqs = cu_seqlens_q.numel() - 1
    group = num_heads // num_kv_heads
    delta = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
    alibi, stride_alibi = _alibi_args(alibi_slopes, delta)
    if total_q > 0:
        attention_bwd_delta_kernel[(triton.cdiv(total_q, delta_rows(pad)), num_heads)](
            out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total_q, head_dim,
            BLOCK_M=delta_rows(pad), HEAD_DIM_PAD=pad)
    shape = _tuning_shape(pad, flags, total_q, max_seqlen_q, num_heads, num_kv_heads)

    def launch_dkdv(tile):
        blocks = block_table(cu_seqlens_k, total_k, tile.block_n, _table_order(flags, "keys"), cache_tables)
        entries, programs = _grid_size(blocks, total_k, tile.block_n)
        for output in dkdv_outputs(tile):
            attention_bwd_dkdv_kernel[(programs, num_kv_heads)](
                q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, blocks, alibi,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                stride_alibi, entries, total_q, total_k, num_seqs, num_heads, group, head_dim,
                softmax_scale, softcap, window_left, window_right, dropout_p, seed,
                HEAD_DIM_PAD=pad, **flags, STRIDED=programs < entries, OUTPUT=output, **tile.options)

    def launch_dq(tile):
        blocks = block_table(cu_seqlens_q, total_q, tile.block_m, _table_order(flags, "queries"), cache_tables)
        entries, programs = _grid_size(blocks, total_q, tile.block_m)
        attention_bwd_dq_kernel[(programs, num_heads)](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, blocks, alibi,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            stride_alibi, entries, total_q, num_seqs, num_heads, group, head_dim,
            softmax_scale, softcap, window_left, window_right, dropout_p, seed,
            HEAD_DIM_PAD=pad, **flags, STRIDED=programs < entries, **tile.options)

    if total_k > 0:
        TILES.launch("attention_dkdv", tile_key("dkdv", pad, q.dtype), launch_dkdv, q, shape)
    if total_q > 0:
        TILES.launch("attention_dq", tile_key("dq", pad, q.dtype), launch_dq, q, shape)
    return dq, dk, dv


def dropout_keep_mask(seed: int | torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      num_heads: int, dropout_p: float) -> list[torch.Tensor]:
    """Per sequence, the bool keep-mask (Hq, sq, sk) the kernels draw for `seed` (for tests)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=cu_seqlens_q.device)
    masks = []
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for seq in range(len(offsets_q) - 1):
        seqlen_q = offsets_q[seq + 1] - offsets_q[seq]
        seqlen_k = offsets_k[seq + 1] - offsets_k[seq]
        keep = torch.empty((num_heads, seqlen_q, seqlen_k), dtype=torch.int8, device=cu_seqlens_q.device)
        if keep.numel():
            grid = (triton.cdiv(seqlen_q, MASK_BLOCK), triton.cdiv(seqlen_k, MASK_BLOCK), num_heads)
            attention_dropout_mask_kernel[grid](keep, seed, seq, 0, num_heads, seqlen_q, seqlen_k, dropout_p,
                                                BLOCK=MASK_BLOCK)
        masks.append(keep.bool())
    return masks


# ---- compile-check registry -------------------------------------------------------------------

_FLAG_NAMES = ("HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "ALIBI", "DROPOUT")


def _flag_sets(dtype_name: str, pad: int):
    """The flag sets training launches (plain, causal, sliding window) and every feature on (a
    superset of the code of any other flag set, and the most registers)."""
    none = dict.fromkeys(_FLAG_NAMES, False)
    yield none
    yield {**none, "HAS_RIGHT": True}
    yield {**none, "HAS_LEFT": True, "HAS_RIGHT": True}
    yield dict.fromkeys(_FLAG_NAMES, True)


def _extended(candidate: bool, dtype_name: str, pad: int, flags: dict, strided: bool) -> bool:
    """Launches only `compile-check --all` compiles (registry.Launch): tuning candidates, fp16 (the
    bf16 code but for the element type), fp32 (tests and rare use) at head dims other than 128,
    the small head dims 16/32 and the grid-stride variant except with every feature on."""
    superset = all(flags.values())
    return (candidate or dtype_name == "fp16" or (dtype_name == "fp32" and pad != 128)
            or ((pad < 64 or strided) and not superset))


def _attention_launches(kind: str, kernel):
    for dtype, info in DTYPES.items():
        for pad in HEAD_DIM_PADS:
            for tile, archs, candidate in TILES.registered(tile_key(kind, pad, dtype)):
                for flags, strided, output in ((flags, strided, output) for flags in _flag_sets(info.name, pad)
                                               for strided in (False, True)
                                               for output in (dkdv_outputs(tile) if kind == "dkdv" else (None,))):
                    data = {name: f"*{info.name}" for name in ("Q", "K", "V", "Out", "DOut", "DK", "DV", "DQ")}
                    signature = registry.signature(kernel, {
                        **data, "Lse": "*fp32", "Delta": "*fp32", "Alibi": "*fp32", "CuQ": "*i32", "CuK": "*i32",
                        "Blocks": "*i32", "softmax_scale": "fp32", "softcap": "fp32", "dropout_p": "fp32",
                        "Seed": "*i64"})
                    constexprs = dict(HEAD_DIM_PAD=pad, **flags, PRECISION=info.precision, STRIDED=strided,
                                      **({"OUTPUT": output} if output else {}))
                    on = "+".join(n.lower() for n, v in flags.items() if v) or "plain"
                    shape = tile.label + (f" {output} pass" if output in ("dk", "dv") else "")
                    # head dims of 16 and more are multiples of 16 in practice (64, 80, 96, 128, 256)
                    yield registry.Launch.of(tile, f"{info.name} d{pad} {shape} {on}{' strided' if strided else ''}",
                                             signature, constexprs, archs=archs,
                                             extended=_extended(candidate, info.name, pad, flags, strided),
                                             aligned=("head_dim",) if pad >= 16 else (), pipelined=pad >= 16)


def _delta_launches():
    for dtype_name in (info.name for info in DTYPES.values()):
        for pad in HEAD_DIM_PADS:
            signature = registry.signature(attention_bwd_delta_kernel, {
                "Out": f"*{dtype_name}", "DOut": f"*{dtype_name}", "Delta": "*fp32"})
            yield registry.Launch(label=f"{dtype_name} d{pad}", signature=signature,
                                  constexprs=dict(BLOCK_M=delta_rows(pad), HEAD_DIM_PAD=pad))


def _mask_launches():
    signature = registry.signature(attention_dropout_mask_kernel, {"Keep": "*i8", "Seed": "*i64", "dropout_p": "fp32"})
    yield registry.Launch(label=f"{MASK_BLOCK}x{MASK_BLOCK}", signature=signature, constexprs=dict(BLOCK=MASK_BLOCK))


registry.register(attention_fwd_kernel, lambda: _attention_launches("fwd", attention_fwd_kernel))
registry.register(attention_bwd_dkdv_kernel, lambda: _attention_launches("dkdv", attention_bwd_dkdv_kernel))
registry.register(attention_bwd_dq_kernel, lambda: _attention_launches("dq", attention_bwd_dq_kernel))
registry.register(attention_bwd_delta_kernel, _delta_launches)
registry.register(attention_dropout_mask_kernel, _mask_launches)
