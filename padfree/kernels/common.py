"""What every kernel family shares: the dtype map, the one `dot`, the whole-steps-then-tail reduction
loop, 64-bit scalar arguments and gathered-row offsets.

Precision rule (one place): fp32 inputs multiply in exact IEEE fp32 (torch's default for fp32
matmuls), never TF32, so fp32 results match a float64 reference to fp32 accuracy; 16-bit inputs
take the tensor cores' native products, accumulated in fp32. A kernel gets the rule as its `IEEE`
constexpr (`DTYPES[dtype].ieee`) and calls `dot`; the attention kernels take it as the
`input_precision` string `PRECISION` (`DTYPES[dtype].precision`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class DType:
    """A data dtype of the kernels: Triton's name for signatures ("fp16", "bf16", "fp32") and its
    size in bytes."""

    name: str
    size: int

    @property
    def ieee(self) -> bool:
        """Whether dots of this dtype run in IEEE fp32 (fp32 inputs; see the module docstring)."""
        return self.size == 4

    @property
    def precision(self) -> str:
        """tl.dot's input_precision for this dtype."""
        return "ieee" if self.ieee else "tf32"


# the data dtypes every kernel family takes, in the order the compile check registers them
DTYPES = {torch.float16: DType("fp16", 2), torch.bfloat16: DType("bf16", 2), torch.float32: DType("fp32", 4)}


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32; IEEE: exact fp32 products (fp32 inputs, see the module docstring)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def reduce_tiles(acc, a_tile, b_tile, b_step, size, b_cols_ok, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    """acc + a[:, :size] @ b[:size, :] in BLOCK-wide reduction steps. a_tile points at the
    (rows, BLOCK) tile of a's first BLOCK reduction columns (contiguous along them), b_tile at the
    (BLOCK, cols) tile of b's first BLOCK rows, whose rows lie b_step elements apart. The whole steps
    load without a reduction mask, then the partial one with it; b's column mask `b_cols_ok` (cols,)
    is the same every step (a clamped index along b's contiguous columns would cost the vector
    loads). Loads at an offset from the fixed tiles: advancing pointer tensors costs the pipelined
    loop more (Triton 3.6 updates every element every step)."""
    whole = size - size % BLOCK
    for s0 in range(0, whole, BLOCK):
        acc = dot(tl.load(a_tile + s0), tl.load(b_tile + s0 * b_step, mask=b_cols_ok[None, :], other=0.0), acc, IEEE)
    if whole < size:
        step_ok = tl.arange(0, BLOCK) < size - whole
        acc = dot(tl.load(a_tile + whole, mask=step_ok[None, :], other=0.0),
                  tl.load(b_tile + whole * b_step, mask=step_ok[:, None] & b_cols_ok[None, :], other=0.0), acc, IEEE)
    return acc


# A kernel's int argument as a 64-bit scalar, for offsets past 2^31: not `arg.to(...)`, since the JIT
# turns an int argument equal to 1 (a rank, a dimension, a stride) into a constant, which has no `.to`.
@triton.jit
def int64(value):
    """The int32 scalar `value` sign-extended to int64."""
    return tl.full([], value, tl.int64)


@triton.jit
def uint64(value):
    """The non-negative int32 scalar `value` zero-extended to uint64: a product with another
    zero-extended 32-bit value is one 32 x 32 -> 64-bit multiply."""
    return tl.full([], value, tl.uint32).to(tl.uint64)


@triton.jit
def row_offsets(ptr, rows, stride):
    """The uint64 element offsets rows * stride from `ptr` of gathered rows (rows: uint32 row
    indices, or a non-negative int32 scalar such as a loop's row; stride: a non-negative int32
    argument). For 16-bit data they are written as byte
    offsets shifted back, (rows * 2 stride) >> 1, with 2 stride < 2^32: LLVM cancels the shift
    against the pointer's own x2, so each gathered address is one 32 x 32 + 64-bit multiply-add
    (mad.wide.u32), not a multiply, a shift and a 64-bit add (4 -> 1 SASS instructions a vector on
    sm_90). fp32 (tests, not speed) keeps the plain product: 4 stride need not fit 32 bits."""
    rows = tl.cast(rows, tl.uint32, bitcast=True).to(tl.uint64)
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        return (rows * (tl.full([], stride, tl.uint32) * 2).to(tl.uint64)) >> 1
    return rows * uint64(stride)
