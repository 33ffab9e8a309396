"""Input validation shared by the public ops.

Two kinds of checks:
  * metadata checks (shape, dtype, device, layout): always on, they cost nothing;
  * value checks that need a device->host copy (e.g. that `cu_seqlens` is non-decreasing): on by
    default for the public API; skipped when an op is called with `check=False`, when the
    environment sets `PADFREE_CHECKS=0`, and while `torch.compile` traces (a host copy would
    break the graph).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch


def value_checks_enabled(check: bool | None) -> bool:
    """Whether to run the checks that copy device data to the host."""
    if torch.compiler.is_compiling():
        return False
    if check is not None:
        return check
    return os.environ.get("PADFREE_CHECKS", "1") != "0"


def expect_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def expect_dim(name: str, tensor: torch.Tensor, ndim: int, form: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {form}, got {tuple(tensor.shape)}")


def expect_dtype(name: str, tensor: torch.Tensor, dtypes: Iterable[torch.dtype]) -> None:
    dtypes = tuple(dtypes)
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(tensor.dtype).removeprefix('torch.')}")


def expect_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None entries ignored) on one device; returns it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"tensors must be on one device, got {listing}")
    return next(iter(devices))


def expect_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} {str(t.dtype).removeprefix('torch.')}" for name, t in tensors.items())
        raise TypeError(f"tensors must have one dtype, got {listing}")
    return next(iter(dtypes))


def check_cu_seqlens(name: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int,
                     max_seqlen_name: str, *, values: bool) -> None:
    """Validate a `cu_seqlens` offsets tensor against `total` tokens.

    Metadata: int32, 1-D with at least 2 entries, contiguous. Values (when `values`): starts at 0,
    non-decreasing, last entry <= total (tokens after it are padding and get output 0), and
    `max_seqlen` >= the longest sequence.
    """
    expect_tensor(name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (flash-attn convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu_seqlens.shape)}")
    if not cu_seqlens.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if not isinstance(max_seqlen, int) and not isinstance(max_seqlen, torch.SymInt):
        raise TypeError(f"{max_seqlen_name} must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{max_seqlen_name} must be >= 0, got {max_seqlen}")
    if not values:
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if min(lengths) < 0:
        bad = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{name} must be non-decreasing, but {name}[{bad + 1}]={offsets[bad + 1]} "
                         f"< {name}[{bad}]={offsets[bad]}")
    if offsets[-1] > total:
        raise ValueError(f"{name}[-1]={offsets[-1]} exceeds the number of tokens {total}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_seqlen_name}={max_seqlen} is smaller than the longest sequence "
                         f"({max(lengths)}) in {name}")
