"""Where Triton kernels run: compiled for a GPU, or in the Triton interpreter on CPU tensors.

Triton decides when a kernel is *defined* (at import) whether `@triton.jit` makes a compiled or an
interpreted kernel, from `TRITON_INTERPRET`. Kernels that call other jitted functions (including
`tl.rand`) only interpret when the variable was set before triton itself was imported, so the
mode is fixed per process: set `TRITON_INTERPRET=1` before importing padfree to run the Triton
backend on CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
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


# ---- launch configurations measured on the device ------------------------------------------------
# A launcher with several candidate configurations (tiles, warps, stages; every one registered for
# the compile check) asks `pick` which to use. With PADFREE_AUTOTUNE=1, on a GPU, the first time a
# shape key is seen each candidate is timed (triton.testing.do_bench, median) and the fastest is
# kept for that key for the rest of the process. Otherwise candidate 0, the default, runs: it is
# off by default because a timed choice can differ between processes, and another tile sums in
# another order, so results would stop being bitwise reproducible run to run. CPU tensors
# (interpreter) and CUDA graph capture (timing would break the capture) always use the default.
AUTOTUNE = os.environ.get("PADFREE_AUTOTUNE", "0") == "1"
_CHOICES: dict[tuple, int] = {}
_FORCED: dict[str, int] = {}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def _capturing() -> bool:
    import torch

    return torch.cuda.is_current_stream_capturing()


def pick(key: tuple, candidates: list, launch, device) -> int:
    """Index into `candidates` of the configuration to launch for shape `key` (its first element
    names the launcher) on `device`; `launch(candidate)` runs the kernel once (it overwrites its
    outputs, so timing it is harmless)."""
    if key[0] in _FORCED:
        return _FORCED[key[0]]
    if len(candidates) == 1 or device.type != "cuda" or not AUTOTUNE:
        return 0
    if key in _CHOICES:
        return _CHOICES[key]
    if _capturing():
        return 0
    times = [_bench(lambda candidate=candidate: launch(candidate)) for candidate in candidates]
    best = min(range(len(candidates)), key=times.__getitem__)
    _CHOICES[key] = best
    logging.getLogger("padfree").info("tuned %s: %s (%.3f ms; candidates %s ms)", key, candidates[best], times[best],
                                      ", ".join(f"{t:.3f}" for t in times))
    return best


def launch_tuned(name: str, candidates, launch, tensor, shape: tuple = ()):
    """Run `launch(candidate)` with the candidate `pick` chooses for the key (name, tensor's
    dtype, *shape) on the tensor's device; returns what `launch` returns."""
    return launch(candidates[pick((name, tensor.dtype, *shape), candidates, launch, tensor.device)])


@contextlib.contextmanager
def force_choice(launcher: str, index: int):
    """Launch candidate `index` of `launcher` inside the block (tests run every candidate)."""
    previous = _FORCED.get(launcher)
    _FORCED[launcher] = index
    try:
        yield
    finally:
        if previous is None:
            del _FORCED[launcher]
        else:
            _FORCED[launcher] = previous


def shape_bucket(rows: int) -> int:
    """Token counts change every step in packed training: tune per power of two, not per count."""
    return 1 << max(rows - 1, 0).bit_length()


def on_input_device(launcher):
    """Decorator: run `launcher` with its first tensor argument's GPU as the current CUDA device.
    Triton launches on the current device, so without this a layer on cuda:1 (a model spread
    over GPUs with device_map) would launch on cuda:0."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        import torch

        first = next(arg for arg in args if isinstance(arg, torch.Tensor))
        if first.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return wrapper
