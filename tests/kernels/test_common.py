"""kernels.common.row_offsets: the gathered-row offsets of the weight-gradient kernels, exact at the
32-bit edges (interpreter) and compiled to one multiply-add per address (PTX)."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from padfree.kernels.common import row_offsets


@triton.jit
def _offsets_kernel(data_ptr, rows_ptr, out_ptr, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + i).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, row_offsets(data_ptr, rows, stride).to(tl.int64, bitcast=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("stride", [1, 4096, 2**30 + 3, 2**31 - 1])
def test_row_offsets_are_exact_past_32_bits(triton_cpu, dtype, stride):
    """rows * stride in full for row indices up to 2^32 - 1 and strides up to 2^31 - 1: the 16-bit
    form goes through the byte stride 2 * stride, which only fits 32 bits as an unsigned value."""
    rows = [0, 1, 7, 2**16 + 1, 2**31 - 1, 2**31, 2**32 - 1, 12345]
    rows_i32 = torch.tensor(rows, dtype=torch.int64).to(torch.uint32).view(torch.int32)
    out = torch.zeros(len(rows), dtype=torch.int64)
    _offsets_kernel[(1,)](torch.zeros(1, dtype=dtype), rows_i32, out, stride, BLOCK=len(rows))
    assert out.tolist() == [row * stride for row in rows]


_PTX_SCRIPT = '''
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from padfree.kernels.common import row_offsets

@triton.jit
def gather(x_ptr, rows_ptr, out_ptr, stride):
    cols = tl.arange(0, 64)
    rows = tl.load(rows_ptr + tl.arange(0, 32)).to(tl.uint32, bitcast=True)
    tile = tl.load(x_ptr + cols[:, None] + row_offsets(x_ptr, rows[None, :], stride))
    tl.store(out_ptr + cols[:, None] * 32 + tl.arange(0, 32)[None, :], tile)

for data in ("bf16", "fp32"):
    source = ASTSource(gather, signature={"x_ptr": f"*{data}", "rows_ptr": "*i32", "out_ptr": f"*{data}",
                                         "stride": "i32"},
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(data, ptx.count("mad.wide.u32"), ptx.count("shl.b64"), ptx.count("ld.global.v4.b32"))
'''


def test_row_offsets_compile_to_one_multiply_add_per_16_bit_address(tmp_path):
    """Compiled for sm_90, each gathered 16-bit address is one mad.wide.u32 (rows times the byte
    stride plus the column pointer) with no 64-bit shift, and the loads stay 16-byte vectors; fp32
    keeps the product and a shift (its byte stride may not fit 32 bits)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = tmp_path / "gather.py"  # @triton.jit reads its source from a file
    script.write_text(_PTX_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in done.stdout.splitlines()}
    mads, shifts, vectors = counts["bf16"]
    assert shifts == 0 and vectors >= 1 and mads >= vectors
    assert counts["fp32"][1] > 0
