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


_BF16_DOT_EXACT = None


def interpreter_bf16_reason(tensor) -> str | None:
    """Why the interpreter cannot run bf16 kernels on this CPU tensor, or None.

    The Triton interpreter multiplies the raw bit patterns of bf16 values in `tl.dot` and in
    elementwise math (triton#11584), so it is asked once per process whether a tiny bf16 dot comes
    out right: a Triton that fixes it (or the test suite's fix, tests/bf16_interpreter.py) passes."""
    global _BF16_DOT_EXACT
    import torch

    if tensor.device.type != "cpu" or tensor.dtype != torch.bfloat16 or not interpreting():
        return None  # compiled kernels and CPU tensors: require_interpreter gives the error
    if _BF16_DOT_EXACT is None:
        _BF16_DOT_EXACT = _interpreted_bf16_dot_is_exact()
    return None if _BF16_DOT_EXACT else "the Triton interpreter computes bf16 wrongly (triton#11584)"


def _interpreted_bf16_dot_is_exact() -> bool:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def bf16_dot_fn(a_ptr, b_ptr, c_ptr):
        offs = tl.arange(0, 16)
        tile = offs[:, None] * 16 + offs[None, :]
        tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))

    # small integers: every product and sum is exact in bf16 inputs and a float32 accumulator
    a = torch.arange(256, dtype=torch.float32).remainder(7).sub(3).view(16, 16).bfloat16()
    b = a.t().contiguous()
    c = torch.empty(16, 16)
    bf16_dot_fn[(1,)](a, b, c)
    return torch.equal(c, a.float() @ b.float())


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


def _out_of_resources() -> type[Exception]:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def pick(key: tuple, candidates: list, launch, device) -> int:
    """Index into `candidates` of the configuration to launch for shape `key` (its first element
    names the launcher) on `device`; `launch(candidate)` runs the kernel once (it overwrites its
    outputs, so timing it is harmless). A candidate that does not fit the device (Triton's
    OutOfResources: more shared memory than an sm_86/sm_89 has) is not timed."""
    if key[0] in _FORCED:
        return _FORCED[key[0]]
    if len(candidates) == 1 or device.type != "cuda" or not AUTOTUNE:
        return 0
    if key in _CHOICES:
        return _CHOICES[key]
    if _capturing():
        return 0
    unfit = _unfit(key, device)
    times = []
    for index, candidate in enumerate(candidates):
        try:
            times.append(float("inf") if index in unfit else _bench(lambda candidate=candidate: launch(candidate)))
        except _out_of_resources():
            unfit.add(index)
            times.append(float("inf"))
    if len(unfit) == len(candidates):
        raise _none_fits(key[0], candidates, device)
    best = min(range(len(candidates)), key=times.__getitem__)
    _CHOICES[key] = best
    logging.getLogger("padfree").info("tuned %s: %s (%.3f ms; candidates %s ms)", key, candidates[best], times[best],
                                      ", ".join(f"{t:.3f}" for t in times))
    return best


# (shape key, device) -> indices of the candidates that ran out of resources there: the first
# candidate that fits becomes that device's default (the big tiles of an H100 do not fit the 99 KB
# of shared memory of an A10G, L4, L40S or RTX 4090). Keyed like the tuning choice, since the
# candidate lists differ per shape (head dim, dtype).
_UNFIT: dict[tuple, set[int]] = {}


def _unfit(key: tuple, device) -> set[int]:
    return _UNFIT.setdefault((*key, str(device)), set())


def _none_fits(launcher: str, candidates: list, device) -> RuntimeError:
    return RuntimeError(f"padfree: no launch configuration of {launcher} fits {device}: all {len(candidates)} "
                        f"candidates ({', '.join(map(str, candidates))}) need more resources than it has")


def arch(tensor) -> int | None:
    """The compute capability of a CUDA tensor's GPU as an int (80, 86, 89, 90), None off CUDA."""
    if tensor.device.type != "cuda":
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(tensor.device)
    return major * 10 + minor


def launch_tuned(name: str, candidates, launch, tensor, shape: tuple = ()):
    """Run `launch(candidate)` with the candidate `pick` chooses for the key (name, tensor's
    dtype, *shape) on the tensor's device; returns what `launch` returns. A candidate that does not
    fit the device is remembered and the next one runs (a forced candidate never falls back)."""
    key = (name, tensor.dtype, *shape)
    first = pick(key, candidates, launch, tensor.device)
    if name in _FORCED:
        return launch(candidates[first])
    unfit = _unfit(key, tensor.device)
    for index in [first, *(i for i in range(len(candidates)) if i != first)]:
        if index in unfit:
            continue
        try:
            return launch(candidates[index])
        except _out_of_resources() as err:
            unfit.add(index)
            logging.getLogger("padfree").info("%s: %s does not fit %s (%s); trying the next configuration",
                                              name, candidates[index], tensor.device, err)
    raise _none_fits(name, candidates, tensor.device)


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


# The Tritons padfree's compiled kernels are checked under: CI compiles and gates every hot launch
# under both (docs/efficiency.md), and the one GPU run had 3.6 (torch 2.11 pins it).
CHECKED_TRITONS = ("3.6", "3.9")


def unchecked_triton(version: str) -> str | None:
    """Why a Triton version is not one padfree checks its kernels under, or None when it is."""
    if ".".join(version.split(".")[:2]) in CHECKED_TRITONS:
        return None
    return (f"padfree checks its kernels under Triton {' and '.join(CHECKED_TRITONS)}, not {version}: "
            "they may compile to slower code or fail to compile")


@functools.cache
def _warn_unchecked_triton() -> None:
    """Once per process, at the first launch on a GPU."""
    import warnings

    import triton

    if (reason := unchecked_triton(triton.__version__)) is not None:
        warnings.warn(f"padfree: {reason}", UserWarning, stacklevel=4)


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
        _warn_unchecked_triton()
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return wrapper
