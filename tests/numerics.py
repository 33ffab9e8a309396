"""Numerical comparison helpers implementing the tolerance rule of docs/design.md (Numerics).

The kernel's error against a float64 oracle must be at most `factor` (2 for outputs, 3 for
gradients) times the error of the plain-PyTorch implementation run in the same low precision, plus
a small absolute floor; float32 inputs must be within 1e-5 relative. Errors are measured as
relative norm ||x - ref|| / ||ref|| and as max abs difference. A relative error means nothing
against a reference that is zero up to rounding (the dq of a one-key sequence is exactly 0 in
exact arithmetic: dO.v - dO.o cancels, and so is the dk of a one-key sequence), so a float32
reference whose RMS is under the float32 floor is compared by max abs difference instead, against
the float32 bound taken as absolute: the tests' inputs are of unit scale, and the rounding left
by the cancellation grows with them and with the sequence length (1.6e-6 seen for 6 queries).
"""

from __future__ import annotations

import torch

FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_finite_and_written(name: str, x: torch.Tensor) -> None:
    """Outputs are NaN-poisoned before the call; any NaN left means an element was not written."""
    bad = (~torch.isfinite(x)).sum().item()
    assert bad == 0, f"{name}: {bad} of {x.numel()} elements are NaN/inf (unwritten or overflowed)"


def assert_close(name: str, out: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor | None,
                 *, factor: float, rtol_fp32: float = 1e-5) -> None:
    """`out` (kernel) vs `oracle` (float64) with `baseline` (plain PyTorch in out's dtype)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert_finite_and_written(name, out)
    err = relative_error(out, oracle)
    abs_err = max_abs_error(out, oracle)
    if out.dtype == torch.float32 or baseline is None:
        if oracle.numel() and oracle.double().norm().item() <= FLOOR[torch.float32] * oracle.numel() ** 0.5:
            assert abs_err <= rtol_fp32, (
                f"{name}: max abs error {abs_err:.3e} > {rtol_fp32:.0e} against a zero reference")
            return
        assert err <= rtol_fp32, f"{name}: relative error {err:.3e} > {rtol_fp32:.0e} (float32 rule)"
        return
    floor = FLOOR[out.dtype]
    base_err = relative_error(baseline, oracle)
    base_abs = max_abs_error(baseline, oracle)
    assert err <= factor * base_err + floor, (
        f"{name}: relative error {err:.3e} > {factor} x baseline {base_err:.3e} + {floor:.0e}")
    scale = oracle.double().abs().max().item()
    assert abs_err <= factor * base_abs + floor * max(scale, 1.0), (
        f"{name}: max abs error {abs_err:.3e} > {factor} x baseline {base_abs:.3e} + floor")
