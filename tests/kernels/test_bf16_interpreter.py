"""The test-only bf16 fix of the Triton interpreter (tests/bf16_interpreter.py) computes what a GPU computes.

Each check runs a tiny kernel with the fix and without it: with it, the result equals float64
arithmetic on the bf16-rounded inputs (to float32 accumulation, or bf16 output rounding); without
it, the same kernel is off, which proves the fix is what makes bf16 tests meaningful.
"""

import contextlib

import pytest
import torch

from tests import bf16_interpreter
from tests.conftest import INTERPRETING

triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="the fix is for the Triton interpreter")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rows, inner, cols = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b))


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, sum_ptr, fma_ptr, exp_ptr, less_ptr, cast_ptr, from_int_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x, y = tl.load(x_ptr + offs), tl.load(y_ptr + offs)
    tl.store(sum_ptr + offs, x * y + y)
    tl.store(fma_ptr + offs, tl.fma(x, y, y))
    tl.store(exp_ptr + offs, tl.exp(x.to(tl.float32)).to(tl.bfloat16) - x)
    tl.store(less_ptr + offs, (x < y).to(tl.int32))
    tl.store(cast_ptr + offs, (x.to(tl.float32) * 1.001).to(tl.bfloat16))
    tl.store(from_int_ptr + offs, (offs * 37 - 1000).to(tl.bfloat16))


@contextlib.contextmanager
def without_fix():
    bf16_interpreter.uninstall()
    try:
        yield
    finally:
        bf16_interpreter.install()


def bf16_dot(a, b):
    c = torch.full((a.shape[0], b.shape[1]), float("nan"))
    _dot_kernel[(1,)](a, b, c, a.shape[0], a.shape[1], b.shape[1])
    return c


def test_fix_is_installed_for_the_suite():
    assert bf16_interpreter.installed()


def test_bf16_dot_equals_float64_matmul_of_the_rounded_inputs():
    a = torch.randn(16, 32).bfloat16()
    b = torch.randn(32, 16).bfloat16()
    want = a.double() @ b.double()
    got = bf16_dot(a, b)
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel < 1e-6, f"bf16 dot with float32 accumulation: relative error {rel:.2e}"
    with without_fix():
        broken = bf16_dot(a, b)
    broken_rel = ((broken.double() - want).norm() / want.norm()).item()
    assert not broken_rel < 1e-2, "the interpreter's own bf16 dot was right: the fix is no longer needed"


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # the unfixed run
def test_bf16_elementwise_arithmetic_rounds_like_the_gpu():
    x = torch.randn(64).bfloat16()
    y = torch.randn(64).bfloat16()
    nans = [torch.full((64,), float("nan"), dtype=torch.bfloat16) for _ in range(5)]
    outs = nans[:3] + [torch.zeros(64, dtype=torch.int32)] + nans[3:]
    _elementwise_kernel[(1,)](x, y, *outs, 64)
    mul_add, fma, exp_minus_x, less, cast, from_int = outs
    assert torch.equal(mul_add, (x * y).bfloat16() + y)  # torch rounds each bf16 op to nearest even too
    assert torch.equal(fma, (x.double() * y.double() + y.double()).bfloat16())
    assert torch.equal(exp_minus_x, torch.exp(x.float()).bfloat16() - x)
    assert torch.equal(less, (x < y).int())
    assert torch.equal(cast, (x.float() * torch.tensor(1.001, dtype=torch.float32)).bfloat16())
    assert torch.equal(from_int, (torch.arange(64) * 37 - 1000).bfloat16())
    with without_fix():
        _elementwise_kernel[(1,)](x, y, *outs, 64)
    assert not torch.equal(outs[0], (x * y).bfloat16() + y), "the interpreter's bf16 arithmetic was right unaided"


def test_rounding_to_bf16_is_to_nearest_even_and_keeps_nan():
    values = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, float("inf"), float("nan"), 1e-40, 3.0e38])
    got = bf16_interpreter.float32_to_bf16_bits(values.numpy())
    want = values.bfloat16().view(torch.int16).numpy().view("uint16")
    assert (got[:4] == want[:4]).all() and (got[5:] == want[5:]).all()
    assert torch.isnan(torch.from_numpy(got.view("int16")).view(torch.bfloat16)[4])
