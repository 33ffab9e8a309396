"""Triton kernels of `padfree.moe_experts`: grouped GEMMs over a block-padded, expert-sorted pair list.

Layout (transformers 5): gate_up_proj W1 (E, 2I, H) = [Wg; Wu], down_proj W2 (E, H, I),
hidden_states x (N, H), k choices per token. A pair p = t*k + j is token t's j-th choice.
`padfree.ops.moe` first aligns the pairs (`padfree::moe_align`): `sorted_pairs` lists pair ids by
expert, each expert's run padded to a multiple of ALIGN_BLOCK with the sentinel N*k, so every
ALIGN_BLOCK-row block belongs to one expert (`block_expert`, -1 for blocks past the end, which
exit at once). The grid is sized by the upper bound of blocks, never by host-known counts, and
an expert with no pair owns no block: it costs nothing in the forward, and the weight-gradient
kernels write zeros for it. Row r of every buffer below is position r of `sorted_pairs`.

Forward (per pair p, expert e, weight w_p):
    moe_gate_up_kernel   gathers x[t] rows itself; g = x Wg^T, u = x Wu^T; stores [g | u]
                         (saved for the backward) and h = silu(g) * u (fused epilogue).
    moe_down_kernel      z = h W2^T, y_p = w_p z, written to row p of a (N*k, H) buffer: each pair
                         owns one row, so no atomics; out = y.view(N, k, H).sum(1) (deterministic).

Backward, dout (N, H) given; h is recomputed from the saved [g | u] (the forward keeps no h):
    moe_down_backward_kernel
        a = dout[t] W2_e (I,), a reduction over H;  dw_p = <dout[t], z> = <a, h>, written as one
        partial sum per I-tile (summed after, no atomics);  dh = w_p a;
        dg = dh * u * s * (1 + g (1 - s)) with s = sigmoid(g)   [d silu(g)/dg = s + g s (1 - s)]
        du = dh * silu(g);  stores [dg | du], and (with expert gradients) w_p h_p for the next kernel.
    moe_down_weight_grad_kernel   dW2_e = sum_{p in e} dout[t]^T (w_p h_p)       (H, I)
    moe_gate_up_backward_input_kernel   dx_p = [dg | du] [Wg; Wu]  -> row p of (N*k, H), then
                                         dx = sum over the k rows of each token.
    moe_gate_up_weight_grad_kernel      dW1_e = sum_{p in e} [dg | du]_p^T x[t]   (2I, H)
Padding rows load x / dout as 0, so their g, u, h, dg, du are 0 and they add nothing to dW.
The weight-gradient kernels are grouped GEMMs reducing over an expert's pair rows; they gather
dout / x rows through `sorted_tokens` (sorted_pairs // k: padding rows get N, masked off).
All products go through padfree.kernels.common.dot (fp32 accumulation; its precision rule).
The pair counts (num_pairs, capacity) change every batch and only bound masks, so they are
`do_not_specialize` (one compiled variant, not one per divisibility); the model dimensions and
strides keep the JIT's specialization, which vectorises the loads (stride_wk = 1 is a constant).
Main loops run whole BLOCK_K steps under loop-invariant masks and then one K-masked tail step: a
K mask recomputed every step cost the main loop up to 30% more instructions (compile-check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from padfree.kernels import registry, runtime
from padfree.kernels.common import DTYPES, DType, row_offsets
from padfree.kernels.common import dot as _dot

ALIGN_BLOCK = 64
# An expert's run is its pairs padded to a multiple of ALIGN_BLOCK, so its padding rows sit in its
# last ALIGN_BLOCK rows: the weight-gradient loops take the steps before those without a token mask.
RUN_PADDING = tl.constexpr(ALIGN_BLOCK)


@triton.jit
def _step(a_ptrs, b_ptrs, a_mask, b_mask, acc, IEEE: tl.constexpr):
    """acc + a b for one reduction step of masked tiles (0 outside the masks; no mask: None)."""
    if a_mask is None:
        a = tl.load(a_ptrs)
    else:
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    return _dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, IEEE)


@triton.jit
def _gate_up_step(a_ptrs, w_gate, w_up, a_mask, w_mask, acc_gate, acc_up, IEEE: tl.constexpr):
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    acc_gate = _dot(a, tl.load(w_gate, mask=w_mask, other=0.0), acc_gate, IEEE)
    acc_up = _dot(a, tl.load(w_up, mask=w_mask, other=0.0), acc_up, IEEE)
    return acc_gate, acc_up


@triton.jit(do_not_specialize=["num_pairs"])
def moe_gate_up_kernel(x_ptr, w1_ptr, sorted_pairs_ptr, block_expert_ptr, gate_up_ptr, h_ptr,
                       num_pairs, hidden, inter, top_k, stride_xn, stride_we, stride_wn, stride_wk,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    gate_up_rows = gate_up_ptr + rows[:, None] * (2 * inter) + cols[None, :]
    if expert < 0:
        # Blocks past the end: the saved [g | u] is an op output, so it is fully defined (zeros).
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=gate_up_ptr.dtype.element_ty)
        tl.store(gate_up_rows, zeros, mask=col_ok[None, :])
        tl.store(gate_up_rows + inter, zeros, mask=col_ok[None, :])
        return
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    tokens = tl.where(valid, pairs // top_k, 0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xn + ks[None, :]
    w_gate = w1_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    w_up = w_gate + inter * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Whole steps, then the ragged tail (module docstring). Offsets from fixed pointer tiles: pointers
    # advanced in the loop and used again for the tail make the pipelined loop select every one.
    whole = hidden - hidden % BLOCK_K
    for k0 in range(0, whole, BLOCK_K):
        acc_gate, acc_up = _gate_up_step(a_ptrs + k0, w_gate + k0 * stride_wk, w_up + k0 * stride_wk,
                                         valid[:, None], col_ok[None, :], acc_gate, acc_up, IEEE)
    if whole < hidden:
        k_ok = whole + ks < hidden
        acc_gate, acc_up = _gate_up_step(a_ptrs + whole, w_gate + whole * stride_wk, w_up + whole * stride_wk,
                                         valid[:, None] & k_ok[None, :], k_ok[:, None] & col_ok[None, :],
                                         acc_gate, acc_up, IEEE)
    out_mask = col_ok[None, :]
    tl.store(gate_up_rows, acc_gate.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
    tl.store(gate_up_rows + inter, acc_up.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(h_ptr + rows[:, None] * inter + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_pairs"])
def moe_down_kernel(h_ptr, w2_ptr, sorted_pairs_ptr, block_expert_ptr, weights_ptr, out_ptr,
                    num_pairs, hidden, inter, stride_we, stride_wn, stride_wk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * inter + ks[None, :]
    b_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    whole = inter - inter % BLOCK_K  # whole steps, then the tail, as in moe_gate_up_kernel
    for k0 in range(0, whole, BLOCK_K):
        acc = _step(a_ptrs + k0, b_ptrs + k0 * stride_wk, None, col_ok[None, :], acc, IEEE)
    if whole < inter:
        k_ok = whole + ks < inter
        acc = _step(a_ptrs + whole, b_ptrs + whole * stride_wk, k_ok[None, :], k_ok[:, None] & col_ok[None, :], acc,
                    IEEE)
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
    acc = acc * weight[:, None]
    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    tl.store(out_ptr + safe_pairs[:, None] * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs", "capacity"])
def moe_down_backward_kernel(grad_out_ptr, w2_ptr, gate_up_ptr, sorted_pairs_ptr, block_expert_ptr, weights_ptr,
                             grad_gate_up_ptr, grad_weight_partial_ptr, hw_ptr, num_pairs, hidden, inter, top_k,
                             capacity, stride_we, stride_wn, stride_wk,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             STORE_HW: tl.constexpr, IEEE: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    tile_n = tl.program_id(1)
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    tokens = tl.where(valid, pairs // top_k, 0).to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = grad_out_ptr + tokens[:, None] * hidden + ks[None, :]
    b_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wn + cols[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    whole = hidden - hidden % BLOCK_K  # whole steps, then the tail, as in moe_gate_up_kernel
    for k0 in range(0, whole, BLOCK_K):
        acc = _step(a_ptrs + k0, b_ptrs + k0 * stride_wn, valid[:, None], col_ok[None, :], acc, IEEE)
    if whole < hidden:
        k_ok = whole + ks < hidden
        acc = _step(a_ptrs + whole, b_ptrs + whole * stride_wn, valid[:, None] & k_ok[None, :],
                    k_ok[:, None] & col_ok[None, :], acc, IEEE)
    gate_up_rows = gate_up_ptr + rows[:, None] * (2 * inter) + cols[None, :]
    gate = tl.load(gate_up_rows, mask=col_ok[None, :], other=0.0).to(tl.float32)
    up = tl.load(gate_up_rows + inter, mask=col_ok[None, :], other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(grad_weight_partial_ptr + tile_n.to(tl.int64) * capacity + rows, tl.sum(silu * up * acc, axis=1))
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
    if STORE_HW:
        # w_p h_p, the right operand of moe_down_weight_grad_kernel (h recomputed once, here)
        tl.store(hw_ptr + rows[:, None] * inter + cols[None, :],
                 (silu * up * weight[:, None]).to(hw_ptr.dtype.element_ty), mask=col_ok[None, :])
    grad_h = acc * weight[:, None]
    grad_gate = grad_h * up * sig * (1.0 + gate * (1.0 - sig))
    grad_up = grad_h * silu
    grad_rows = grad_gate_up_ptr + rows[:, None] * (2 * inter) + cols[None, :]
    tl.store(grad_rows, grad_gate.to(grad_gate_up_ptr.dtype.element_ty), mask=col_ok[None, :])
    tl.store(grad_rows + inter, grad_up.to(grad_gate_up_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def moe_down_weight_grad_kernel(grad_out_ptr, hw_ptr, sorted_tokens_ptr, padded_offsets_ptr, grad_w2_ptr,
                                num_tokens, hidden, inter,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                IEEE: tl.constexpr):
    """dW2_e = sum over e's rows of dout[t]^T (w_p h_p): a grouped GEMM reducing over the pair rows,
    with w_p h_p from moe_down_backward_kernel. BLOCK_K divides ALIGN_BLOCK, so every step lies in
    one expert's rows and needs no K mask; only the steps of its last ALIGN_BLOCK rows mask padding."""
    expert = tl.program_id(0)
    out_rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = out_rows < hidden
    col_ok = cols < inter
    start = tl.load(padded_offsets_ptr + expert)
    end = tl.load(padded_offsets_ptr + expert + 1)
    ks = tl.arange(0, BLOCK_K)
    grad_cols = grad_out_ptr + out_rows[:, None]
    hw_rows = hw_ptr + ks[:, None].to(tl.int64) * inter + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    full_end = tl.maximum(end - RUN_PADDING, start)
    for r0 in range(start, full_end, BLOCK_K):
        # unsigned: token ids are >= 0; row_offsets makes each address one 32 x 32 + 64-bit multiply-add
        tokens = tl.load(sorted_tokens_ptr + r0 + ks).to(tl.uint32, bitcast=True)
        # an offset from fixed pointers: pointers advanced in the loop cost the pipelined loop more
        acc = _step(grad_cols + row_offsets(grad_cols, tokens[None, :], hidden),
                    hw_rows + row_offsets(hw_rows, r0, inter),
                    out_ok[:, None], col_ok[None, :], acc, IEEE)
    for r0 in range(full_end, end, BLOCK_K):
        tokens = tl.load(sorted_tokens_ptr + r0 + ks).to(tl.uint32, bitcast=True)
        acc = _step(grad_cols + row_offsets(grad_cols, tokens[None, :], hidden),
                    hw_rows + row_offsets(hw_rows, r0, inter),
                    (tokens < num_tokens)[None, :] & out_ok[:, None], col_ok[None, :], acc, IEEE)
    out = grad_w2_ptr + expert.to(tl.int64) * hidden * inter + out_rows[:, None] * inter + cols[None, :]
    tl.store(out, acc.to(grad_w2_ptr.dtype.element_ty), mask=out_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def moe_gate_up_backward_input_kernel(grad_gate_up_ptr, w1_ptr, sorted_pairs_ptr, block_expert_ptr,
                                      grad_x_pairs_ptr, num_pairs, hidden, inter, stride_we, stride_wn,
                                      stride_wk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                      BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = grad_gate_up_ptr + rows[:, None] * (2 * inter) + ks[None, :]
    b_ptrs = w1_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wn + cols[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    whole = 2 * inter - 2 * inter % BLOCK_K  # whole steps, then the tail, as in moe_gate_up_kernel
    for k0 in range(0, whole, BLOCK_K):
        acc = _step(a_ptrs + k0, b_ptrs + k0 * stride_wn, None, col_ok[None, :], acc, IEEE)
    if whole < 2 * inter:
        k_ok = whole + ks < 2 * inter
        acc = _step(a_ptrs + whole, b_ptrs + whole * stride_wn, k_ok[None, :], k_ok[:, None] & col_ok[None, :], acc,
                    IEEE)
    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    tl.store(grad_x_pairs_ptr + safe_pairs[:, None] * hidden + cols[None, :],
             acc.to(grad_x_pairs_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def moe_gate_up_weight_grad_kernel(grad_gate_up_ptr, x_ptr, sorted_tokens_ptr, padded_offsets_ptr, grad_w1_ptr,
                                   num_tokens, hidden, inter, stride_xn,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   IEEE: tl.constexpr):
    """dW1_e = sum over e's rows of [dg | du]_p^T x[t]; steps as in moe_down_weight_grad_kernel."""
    expert = tl.program_id(0)
    out_rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = out_rows < 2 * inter
    col_ok = cols < hidden
    start = tl.load(padded_offsets_ptr + expert)
    end = tl.load(padded_offsets_ptr + expert + 1)
    ks = tl.arange(0, BLOCK_K)
    grad_rows = grad_gate_up_ptr + ks[None, :].to(tl.int64) * (2 * inter) + out_rows[:, None]
    x_cols = x_ptr + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    full_end = tl.maximum(end - RUN_PADDING, start)
    for r0 in range(start, full_end, BLOCK_K):
        tokens = tl.load(sorted_tokens_ptr + r0 + ks).to(tl.uint32, bitcast=True)  # unsigned: see the dW2 kernel
        acc = _step(grad_rows + row_offsets(grad_rows, r0, 2 * inter),
                    x_cols + row_offsets(x_cols, tokens[:, None], stride_xn),
                    out_ok[:, None], col_ok[None, :], acc, IEEE)
    for r0 in range(full_end, end, BLOCK_K):
        tokens = tl.load(sorted_tokens_ptr + r0 + ks).to(tl.uint32, bitcast=True)
        acc = _step(grad_rows + row_offsets(grad_rows, r0, 2 * inter),
                    x_cols + row_offsets(x_cols, tokens[:, None], stride_xn),
                    out_ok[:, None], (tokens < num_tokens)[:, None] & col_ok[None, :], acc, IEEE)
    out = grad_w1_ptr + expert.to(tl.int64) * (2 * inter) * hidden + out_rows[:, None] * hidden + cols[None, :]
    tl.store(out, acc.to(grad_w1_ptr.dtype.element_ty), mask=out_ok[:, None] & col_ok[None, :])


# Tiles (registry.Tile) per (kernel, element size). The row tile of the grouped kernels is
# the alignment block; the weight-gradient kernels reduce over pair rows, BLOCK_K of them a step, so
# their BLOCK_K divides ALIGN_BLOCK. Chosen with `padfree compile-check --efficiency` (bf16, sm_80
# and sm_90; docs/efficiency.md): tensor-core tiles without replicated MMAs or spills whose main
# loops issue the fewest instructions per MFLOP, within 1.2x a plain GEMM at the same tile. The
# gate_up kernel's 8-warp 64x64 tile replicates its MMAs on sm_80 (8 warps of 16 rows over 64
# rows); 64x128 with 4 warps spills there but is sm_90's best (m64n128 wgmma, 299 instructions per
# MFLOP). fp32 runs IEEE FMA dots (tests, not speed) on smaller tiles: 32x32 steps, 4 warps, 2 stages.
Tile = registry.Tile
_DEFAULTS = {
    "gate_up": Tile(ALIGN_BLOCK, 128, 64, 8, 3),
    "down": Tile(ALIGN_BLOCK, 128, 64, 4, 3),
    "down_backward": Tile(ALIGN_BLOCK, 64, 128, 8, 3),
    "down_weight_grad": Tile(64, 128, 64, 4, 3),
    "gate_up_backward_input": Tile(ALIGN_BLOCK, 128, 64, 4, 3),
    "gate_up_weight_grad": Tile(256, 128, 64, 8, 3),
}
# More 16-bit tiles, timed on the GPU on first use per shape with PADFREE_AUTOTUNE=1 (runtime.pick;
# the arch's default is used otherwise). Each passes the efficiency gate on its archs, and fits the
# 99 KB of shared memory of sm_86/sm_89 (the largest, 64x256 w8s3, takes 80 KB there).
_CANDIDATES = {
    "gate_up": (Tile(ALIGN_BLOCK, 64, 64, 4, 4),),
    "down": (Tile(ALIGN_BLOCK, 128, 64, 8, 3), Tile(ALIGN_BLOCK, 256, 64, 8, 3), Tile(ALIGN_BLOCK, 64, 64, 4, 4),
             Tile(ALIGN_BLOCK, 128, 32, 4, 4)),
    "down_backward": (Tile(ALIGN_BLOCK, 64, 64, 8, 3),),
    "down_weight_grad": (Tile(64, 128, 64, 4, 3),),
    "gate_up_backward_input": (Tile(ALIGN_BLOCK, 128, 64, 8, 3), Tile(ALIGN_BLOCK, 256, 64, 8, 3),
                               Tile(ALIGN_BLOCK, 64, 64, 4, 4), Tile(ALIGN_BLOCK, 128, 32, 4, 4)),
    "gate_up_weight_grad": (Tile(128, 64, 64, 4, 3),),
}
# Keyed (kernel, element size). A different default on sm_90; tiles registered and picked only on
# some archs: the sm_90 gate_up tile spills on sm_80 (48 B); the 128-row dW1 step issues 1.25x the
# plain GEMM's instructions per MFLOP on sm_90.
TILES = registry.TileTable(
    {**{(name, 2): tile for name, tile in _DEFAULTS.items()},
     **{(name, 4): Tile(tile.block_m, 32, 32, 4, 2) for name, tile in _DEFAULTS.items()}},
    arch_defaults={90: {("gate_up", 2): Tile(ALIGN_BLOCK, 128, 64, 4, 3),
                        ("down_weight_grad", 2): Tile(64, 256, 64, 8, 3)}},
    candidates={(name, 2): tiles for name, tiles in _CANDIDATES.items()},
    only_on={(("gate_up", 2), Tile(ALIGN_BLOCK, 128, 64, 4, 3)): (90,),
             (("gate_up_weight_grad", 2), Tile(128, 64, 64, 4, 3)): (80, 86, 89)})


def _run_time_values(signature: dict[str, str]) -> dict[str, int]:
    """The expert weights are contiguous along their last dim (transformers' layout): stride 1, a
    constexpr at run time."""
    return {"stride_wk": 1} if "stride_wk" in signature else {}


def make_launch(kernel, pointer_args: dict[str, str], dtype: DType, tile: registry.Tile,
                flags: dict[str, bool] | None = None, archs: tuple[int, ...] = registry.ARCHS,
                extended: bool = False) -> registry.Launch:
    """The Launch of `kernel` at `tile` for data of `dtype`; pointer_args maps name ->
    "data" | "i32" | "fp32"; the other run-time arguments are i32. `flags`: constexpr flags, named
    in the label when off."""
    signature = registry.signature(kernel, {name: f"*{dtype.name if kind == 'data' else kind}"
                                            for name, kind in pointer_args.items()})
    off = "".join(f" no {name.lower()}" for name, value in (flags or {}).items() if not value)
    return registry.Launch.of(tile, f"{dtype.name} {tile.label}{off}", signature,
                              {"IEEE": dtype.ieee, **(flags or {})}, archs=archs,
                              aligned=("hidden", "inter"), pipelined=True, values=_run_time_values(signature),
                              extended=extended)


def _launches(kernel, name: str, pointer_args: dict[str, str], flag_sets: tuple[dict[str, bool], ...] = ({},)):
    """One Launch per data dtype, tile the launcher may pick and flag set (the first flag set is the
    one `compile-check` compiles without --all)."""
    def launches():
        for info in DTYPES.values():
            for tile, archs, candidate in TILES.registered((name, info.size)):
                for number, flags in enumerate(flag_sets):
                    yield make_launch(kernel, pointer_args, info, tile, flags, archs=archs,
                                      extended=candidate or number > 0 or info.name == "fp16")

    registry.register(kernel, launches)


_ALIGN_POINTERS = {"sorted_pairs_ptr": "i32", "block_expert_ptr": "i32", "padded_offsets_ptr": "i32"}
POINTERS = {
    "gate_up": {"x_ptr": "data", "w1_ptr": "data", "gate_up_ptr": "data", "h_ptr": "data", **_ALIGN_POINTERS},
    "down": {"h_ptr": "data", "w2_ptr": "data", "weights_ptr": "fp32", "out_ptr": "data", **_ALIGN_POINTERS},
    "down_backward": {"grad_out_ptr": "data", "w2_ptr": "data", "gate_up_ptr": "data", "weights_ptr": "fp32",
                      "grad_gate_up_ptr": "data", "grad_weight_partial_ptr": "fp32", "hw_ptr": "data",
                      **_ALIGN_POINTERS},
    "down_weight_grad": {"grad_out_ptr": "data", "hw_ptr": "data", "grad_w2_ptr": "data", "sorted_tokens_ptr": "i32",
                         **_ALIGN_POINTERS},
    "gate_up_backward_input": {"grad_gate_up_ptr": "data", "w1_ptr": "data", "grad_x_pairs_ptr": "data",
                               **_ALIGN_POINTERS},
    "gate_up_weight_grad": {"grad_gate_up_ptr": "data", "x_ptr": "data", "grad_w1_ptr": "data",
                            "sorted_tokens_ptr": "i32", **_ALIGN_POINTERS},
}
KERNELS = {"gate_up": moe_gate_up_kernel, "down": moe_down_kernel, "down_backward": moe_down_backward_kernel,
           "down_weight_grad": moe_down_weight_grad_kernel,
           "gate_up_backward_input": moe_gate_up_backward_input_kernel,
           "gate_up_weight_grad": moe_gate_up_weight_grad_kernel}
for _name, _kernel in KERNELS.items():
    # without expert gradients (frozen experts) the down backward stores no w h
    _launches(_kernel, _name, POINTERS[_name],
              ({"STORE_HW": True}, {"STORE_HW": False}) if _name == "down_backward" else ({},))
del _name, _kernel  # not kernels of this module (tests look for *_kernel attributes)


def unsupported_reason(hidden_states: torch.Tensor) -> str | None:
    if hidden_states.dtype not in DTYPES:
        return f"dtype {hidden_states.dtype} (fp16, bf16, fp32 only)"
    if (reason := runtime.interpreter_bf16_reason(hidden_states)) is not None:
        return reason
    return None


def _launch_tuned(name: str, launch, tensor: torch.Tensor, shape: tuple):
    """TILES.launch over the tiles of kernel `name` on the tensor's GPU, handing `launch` the
    kernel options (BLOCK_*, IEEE, num_warps, num_stages)."""
    ieee = DTYPES[tensor.dtype].ieee
    return TILES.launch(f"moe_{name}", (name, DTYPES[tensor.dtype].size),
                        lambda tile: launch({**tile.options, "IEEE": ieee}), tensor, shape)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@runtime.on_input_device
def forward(hidden_states, gate_up_proj, down_proj, weights, top_k, sorted_pairs, block_expert):
    """-> (out (N, H), gate_up (capacity, 2I) pre-activations saved for the backward).

    `weights` is the fp32 (N*k,) routing weights; alignment tensors from `padfree::moe_align`
    with block ALIGN_BLOCK.
    """
    num_tokens, hidden = hidden_states.shape
    inter = down_proj.shape[2]
    num_pairs = num_tokens * top_k
    capacity = sorted_pairs.shape[0]
    num_blocks = block_expert.shape[0]
    device, dtype = hidden_states.device, hidden_states.dtype
    gate_up = runtime.empty((capacity, 2 * inter), dtype, device)
    h = torch.empty(capacity, inter, dtype=dtype, device=device)
    shape = (runtime.shape_bucket(num_pairs), gate_up_proj.shape[0], hidden, inter, top_k)
    _launch_tuned("gate_up", lambda options: moe_gate_up_kernel[(num_blocks, _cdiv(inter, options["BLOCK_N"]))](
        hidden_states, gate_up_proj, sorted_pairs, block_expert, gate_up, h, num_pairs, hidden, inter, top_k,
        hidden_states.stride(0), *gate_up_proj.stride(), **options), hidden_states, shape)
    out_pairs = runtime.empty((num_pairs, hidden), dtype, device)
    _launch_tuned("down", lambda options: moe_down_kernel[(num_blocks, _cdiv(hidden, options["BLOCK_N"]))](
        h, down_proj, sorted_pairs, block_expert, weights, out_pairs, num_pairs, hidden, inter,
        *down_proj.stride(), **options), hidden_states, shape)
    return out_pairs.view(num_tokens, top_k, hidden).sum(1), gate_up


@runtime.on_input_device
def backward(grad_out, hidden_states, gate_up_proj, down_proj, weights, gate_up, top_k, sorted_pairs,
             block_expert, padded_offsets, pair_position, expert_grads=True):
    """-> (d hidden_states, d weights (N*k,) fp32, d gate_up_proj, d down_proj); see the module docstring.

    Without `expert_grads` the weight-gradient kernels do not run and their results are empty."""
    num_tokens, hidden = hidden_states.shape
    num_experts, _, inter = down_proj.shape
    num_pairs = num_tokens * top_k
    capacity = sorted_pairs.shape[0]
    num_blocks = block_expert.shape[0]
    device, dtype = hidden_states.device, hidden_states.dtype

    shape = (runtime.shape_bucket(num_pairs), num_experts, hidden, inter, top_k)
    grad_gate_up = torch.empty(capacity, 2 * inter, dtype=dtype, device=device)
    # w_p h_p per row for d down_proj; a stand-in the kernel never writes when the experts are frozen
    hw = torch.empty(capacity if expert_grads else 1, inter, dtype=dtype, device=device)

    def down_backward(options):
        """-> the (inter tiles, capacity) fp32 partial sums of d weight, one row per BLOCK_N tile."""
        inter_tiles = _cdiv(inter, options["BLOCK_N"])
        partial = torch.empty(inter_tiles, capacity, dtype=torch.float32, device=device)
        moe_down_backward_kernel[(num_blocks, inter_tiles)](
            grad_out, down_proj, gate_up, sorted_pairs, block_expert, weights, grad_gate_up, partial, hw,
            num_pairs, hidden, inter, top_k, capacity, *down_proj.stride(), STORE_HW=expert_grads, **options)
        return partial

    grad_weights = _launch_tuned("down_backward", down_backward, hidden_states, shape).sum(0)[pair_position.long()]

    grad_x_pairs = runtime.empty((num_pairs, hidden), dtype, device)
    _launch_tuned("gate_up_backward_input",
                  lambda options: moe_gate_up_backward_input_kernel[(num_blocks, _cdiv(hidden, options["BLOCK_N"]))](
                      grad_gate_up, gate_up_proj, sorted_pairs, block_expert, grad_x_pairs, num_pairs, hidden,
                      inter, *gate_up_proj.stride(), **options), hidden_states, shape)

    grad_x = grad_x_pairs.view(num_tokens, top_k, hidden).sum(1)
    if not expert_grads:
        return grad_x, grad_weights, gate_up_proj.new_empty(0), down_proj.new_empty(0)

    # the token of each sorted row (padding: num_tokens), for the weight-gradient kernels' gathers
    sorted_tokens = sorted_pairs // top_k
    grad_down = runtime.empty((num_experts, hidden, inter), down_proj.dtype, device)
    _launch_tuned("down_weight_grad", lambda options: moe_down_weight_grad_kernel[
        (num_experts, _cdiv(hidden, options["BLOCK_M"]), _cdiv(inter, options["BLOCK_N"]))](
        grad_out, hw, sorted_tokens, padded_offsets, grad_down, num_tokens, hidden, inter, **options),
        hidden_states, shape)

    grad_gate_up_proj = runtime.empty((num_experts, 2 * inter, hidden), gate_up_proj.dtype, device)
    _launch_tuned("gate_up_weight_grad", lambda options: moe_gate_up_weight_grad_kernel[
        (num_experts, _cdiv(2 * inter, options["BLOCK_M"]), _cdiv(hidden, options["BLOCK_N"]))](
        grad_gate_up, hidden_states, sorted_tokens, padded_offsets, grad_gate_up_proj, num_tokens, hidden, inter,
        hidden_states.stride(0), **options), hidden_states, shape)
    return grad_x, grad_weights, grad_gate_up_proj, grad_down
