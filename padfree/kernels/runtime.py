"""Where Triton kernels run: compiled for a GPU, or in the Triton interpreter on CPU tensors.

Triton decides when a kernel is *defined* (at import) whether `@triton.jit` makes a compiled or an
interpreted kernel, from `TRITON_INTERPRET`. Kernels that call other jitted functions (including
`tl.rand`) only interpret when the variable was set before triton itself was imported, so the
mode is fixed per process: set `TRITON_INTERPRET=1` before importing padfree to run the Triton
backend on CPU tensors.
"""

from __future__ import annotations

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when this process defines Triton kernels for the interpreter."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe(), InterpretedFunction)


_PROBE = None


def _probe():
    global _PROBE
    if _PROBE is None:
        import triton

        @triton.jit
        def probe_fn():
            pass

        _PROBE = probe_fn
    return _PROBE


def require_interpreter(op: str) -> None:
    """Raise a clear error when Triton kernels would be handed CPU tensors they cannot run."""
    if not HAS_TRITON:
        raise RuntimeError(f"padfree.{op}: the Triton backend was requested but triton is not installed; "
                           "use padfree.use_backend('reference') or install triton")
    if not interpreting():
        raise RuntimeError(
            f"padfree.{op}: the Triton backend got CPU tensors, but this process compiles Triton kernels "
            "for a GPU. Set TRITON_INTERPRET=1 before importing triton/padfree to run them on the CPU in "
            "the Triton interpreter, move the inputs to a CUDA device, or use "
            "padfree.use_backend('reference').")


def interpreter_env_set() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Tests set PADFREE_POISON_OUTPUTS=1 so that every output a launcher allocates starts as NaN (or a
# sentinel for integers) and an element no program wrote fails the comparison.
POISON_OUTPUTS = os.environ.get("PADFREE_POISON_OUTPUTS", "0") == "1"


def empty(shape, dtype, device):
    """`torch.empty` for kernel outputs; poisoned when PADFREE_POISON_OUTPUTS=1."""
    import torch

    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)
