"""Backend selection: which implementation of an op runs for a given input.

Backends:
  "auto"       Triton (or `padfree._C` CUDA where an op has it) for CUDA tensors, "reference"
               for CPU tensors.
  "triton"     the Triton kernels; on CPU tensors they run in the Triton interpreter, which needs
               `TRITON_INTERPRET=1` set before triton is imported.
  "cuda"       `padfree._C` kernels where an op has them (C++ for CPU tensors, CUDA for GPU
               tensors), Triton for the rest. Under "auto" an op with a `padfree._C` kernel uses
               it too.
  "reference"  plain PyTorch (`padfree.reference`), any device.

The choice comes from `use_backend(name)`, else the `PADFREE_BACKEND` environment variable, else
"auto". An input the chosen backend cannot run (dtype, head dim, missing compiler) falls back to
the reference with one warning naming the reason; it is never silent.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")

_state = threading.local()
_warned: set[tuple[str, str]] = set()


class PadfreeFallbackWarning(UserWarning):
    """An op could not run on the backend asked for and used another one (the message says why)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"padfree backend must be one of {BACKENDS}, got {name!r}")
    return name


class use_backend:
    """Select the backend for padfree ops in this thread.

    Takes effect at once; also usable as a context manager that restores the previous choice::

        padfree.use_backend("triton")
        with padfree.use_backend("reference"):
            ...
    """

    def __init__(self, name: str):
        self._previous = getattr(_state, "backend", None)
        _state.backend = _check_name(name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _state.backend = self._previous


def requested_backend() -> str:
    """The backend asked for: `use_backend`, else `PADFREE_BACKEND`, else "auto"."""
    name = getattr(_state, "backend", None)
    if name is not None:
        return name
    env = os.environ.get("PADFREE_BACKEND")
    if env:
        try:
            return _check_name(env)
        except ValueError as err:
            raise ValueError(f"environment variable PADFREE_BACKEND: {err}") from None
    return "auto"


def warn_once(key: str, message: str) -> None:
    """Warn with `message` the first time `key` is seen in this process."""
    if (key, message) in _warned:
        return
    _warned.add((key, message))
    warnings.warn(message, PadfreeFallbackWarning, stacklevel=3)


Reason = Callable[[], "str | None"]


def resolve(op: str, device: torch.device, *, triton_unsupported: Reason | None = None,
            has_native_kernel: bool = False, native_unsupported: Reason | None = None) -> str:
    """Pick the implementation of `op` for inputs on `device`.

    Returns "triton", "cuda" (a `padfree._C` kernel) or "reference". `has_native_kernel` says the
    op has a `padfree._C` kernel for this device type; `triton_unsupported` / `native_unsupported`
    are called (only when that kernel is in play) for the reason it cannot run this input, None
    when it can. An input no kernel can run falls back to the reference with a one-time warning
    naming the reason.
    """
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    if requested in ("auto", "cuda") and has_native_kernel:
        reason = native_unsupported() if native_unsupported is not None else None
        if reason is None:
            return "cuda"
        warn_once(op, f"padfree.{op}: padfree._C kernel unavailable ({reason})")
    if requested == "auto" and device.type != "cuda":
        return "reference"
    if device.type not in ("cuda", "cpu"):
        warn_once(op, f"padfree.{op}: no kernel for device {device}; using the reference implementation")
        return "reference"
    if device.type == "cpu":
        from padfree.kernels import runtime

        runtime.require_interpreter(op)
    reason = triton_unsupported() if triton_unsupported is not None else None
    if reason is not None:
        warn_once(op, f"padfree.{op}: Triton kernel cannot run this input ({reason}); "
                      "using the reference implementation")
        return "reference"
    return "triton"
