"""Test-only fix for the Triton interpreter's bf16 arithmetic (triton#11584).

The interpreter stores bfloat16 values as their raw uint16 bit patterns (numpy has no bfloat16).
Loads, stores and casts of bf16 go through explicit bit conversions and are right, but `tl.dot`
and the elementwise float ops hand those arrays straight to numpy, which computes on the bit
patterns as integers: a bf16 `tl.dot` returns garbage and `x + y` on two bf16 tensors wraps
around. Its casts to bf16 truncate float32 (the GPU rounds to nearest even) and cast integers and
float64 to bf16 by `astype(uint16)`, i.e. to a bit pattern of the integer. `install()` wraps
exactly those builder methods (`create_dot`, `binary_op`, `unary_op`, `create_fma`, `cast_impl`)
so that bf16 operands are decoded to float32 first (a bf16 value is the top half of the float32
with the same value, so the decode is a shift and loses nothing) and a bf16 result is rounded
back to nearest even, as the GPU does. A dot accumulates in its accumulator's dtype (float32), as
the tensor cores do. Nothing else in the interpreter changes.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

Builder = interpreter.InterpreterBuilder
_WRAPPED = ("create_dot", "binary_op", "unary_op", "create_fma", "cast_impl")
_ORIGINAL = {name: getattr(Builder, name) for name in _WRAPPED}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """A bf16 bit pattern (uint16) is the upper 16 bits of the float32 with the same value."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16, ties to even; NaN stays a (quiet) NaN."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    is_nan = np.isnan(np.asarray(values, dtype=np.float32))
    return np.where(is_nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def _is_bf16(handle) -> bool:
    return handle.dtype.scalar == tl.bfloat16


def _as_float32(handle) -> interpreter.TensorHandle:
    return interpreter.TensorHandle(bf16_bits_to_float32(handle.data), tl.float32) if _is_bf16(handle) else handle


def _back_to_bf16(result: interpreter.TensorHandle) -> interpreter.TensorHandle:
    """Float results return to bf16 bits; comparisons give bool data, typed int1 so that a later cast
    does not take them for bf16 bits."""
    if result.data.dtype == np.bool_:
        return interpreter.TensorHandle(result.data, tl.int1)
    return interpreter.TensorHandle(float32_to_bf16_bits(result.data), tl.bfloat16)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if _is_bf16(d):
        raise NotImplementedError("tests/bf16_interpreter.py: a bf16 accumulator in tl.dot is not emulated")
    return _ORIGINAL["create_dot"](self, _as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)


def _binary_op(self, lhs, rhs, op):
    if not (_is_bf16(lhs) or _is_bf16(rhs)):
        return _ORIGINAL["binary_op"](self, lhs, rhs, op)
    return _back_to_bf16(_ORIGINAL["binary_op"](self, _as_float32(lhs), _as_float32(rhs), op))


def _unary_op(self, arg, op):
    if not _is_bf16(arg):
        return _ORIGINAL["unary_op"](self, arg, op)
    return _back_to_bf16(_ORIGINAL["unary_op"](self, _as_float32(arg), op))


def _create_fma(self, x, y, z):
    if not _is_bf16(z):
        return _ORIGINAL["create_fma"](self, x, y, z)
    return _back_to_bf16(_ORIGINAL["create_fma"](self, _as_float32(x), _as_float32(y), _as_float32(z)))


def _cast_impl(self, src, dst_type):
    """Casts through float32: from bf16 by the exact decode, to bf16 by rounding to nearest even."""
    to_bf16 = dst_type.scalar == tl.bfloat16
    if not (_is_bf16(src) or to_bf16):
        return _ORIGINAL["cast_impl"](self, src, dst_type)
    value = bf16_bits_to_float32(src.data) if _is_bf16(src) else src.data
    if to_bf16:
        return interpreter.TensorHandle(float32_to_bf16_bits(value.astype(np.float32)), tl.bfloat16)
    return _ORIGINAL["cast_impl"](self, interpreter.TensorHandle(value, tl.float32), dst_type)


_REPLACEMENTS = {"create_dot": _create_dot, "binary_op": _binary_op, "unary_op": _unary_op, "create_fma": _create_fma,
                 "cast_impl": _cast_impl}


def install() -> None:
    for name, method in _REPLACEMENTS.items():
        setattr(Builder, name, method)


def uninstall() -> None:
    for name, method in _ORIGINAL.items():
        setattr(Builder, name, method)


def installed() -> bool:
    return all(getattr(Builder, name) is method for name, method in _REPLACEMENTS.items())
