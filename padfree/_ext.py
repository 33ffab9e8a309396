"""Loading `padfree._C`: the C++ (CPU) and CUDA ops in `csrc/`, registered as `torch.ops.padfree.*`.

Order: an ahead-of-time build (`PADFREE_BUILD_EXT=1 pip install .`), else a just-in-time build
with ninja on first use, cached under `$PADFREE_EXT_DIR` (default `~/.cache/padfree/ext/<key>`,
keyed by the torch version and whether CUDA is compiled in). `PADFREE_BUILD_EXT=0` forbids the
just-in-time build. When no build is possible, the ops fall back to Triton / PyTorch and this
module says so once; importing padfree never fails because of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from padfree._backend import warn_once

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "how": None, "error": None}


def source_dir() -> Path:
    """`csrc/` of a source checkout (editable install), else the copy shipped in the package."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("padfree's C++/CUDA sources (csrc/) were not found next to the package")


def _cuda_buildable() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _build_dir(with_cuda: bool, sources: list[Path]) -> Path:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    key = f"torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}"
    root = Path(os.environ.get("PADFREE_EXT_DIR", Path.home() / ".cache" / "padfree" / "ext"))
    path = root / key.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_just_in_time() -> str:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    csrc = source_dir()
    with_cuda = _cuda_buildable()
    sources = sorted(csrc.glob("*.cpp")) + (sorted(csrc.glob("*.cu")) if with_cuda else [])
    flags = ["-O3", "-std=c++20"] + (["-DPADFREE_WITH_CUDA=1"] if with_cuda else [])
    cuda_flags = ["-O3", "-std=c++20", "-DPADFREE_WITH_CUDA=1",
                  "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                  "-gencode=arch=compute_90,code=compute_90"]  # PTX for GPUs newer than Hopper
    verbose = os.environ.get("PADFREE_EXT_VERBOSE", "0") == "1"
    build_directory = _build_dir(with_cuda, sources)
    first_build = not any(build_directory.glob("padfree_C*.so"))
    if first_build:
        print(f"padfree: building padfree._C ({'C++ and CUDA' if with_cuda else 'C++'}, {len(sources)} sources) "
              f"into {build_directory}; this first build takes a few minutes, later runs reuse it "
              "(PADFREE_BUILD_EXT=0 skips it)", file=sys.stderr, flush=True)
        started = time.monotonic()
    cpp_extension.load(
        name="padfree_C",
        sources=[str(s) for s in sources],
        extra_cflags=flags,
        extra_cuda_cflags=cuda_flags if with_cuda else None,
        build_directory=str(build_directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    if first_build:
        print(f"padfree: built padfree._C in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return "just-in-time build" + (" (CPU + CUDA)" if with_cuda else " (CPU only)")


_fakes: dict[str, Callable] = {}


def register_fake(op: str, fake: Callable) -> None:
    """Give `padfree::<op>` (defined by `_C`) its fake implementation for `torch.compile`.

    The op only exists once `_C` is loaded, so the registration is kept and done by `load()`
    (or right away when `_C` is already loaded), outside of any compiled region."""
    _fakes[op] = fake
    if _state["loaded"]:
        _register_fakes()


def _register_fakes() -> None:
    for op, fake in list(_fakes.items()):
        if hasattr(torch.ops.padfree, op):  # a stale cached _C may lack a newer op
            torch.library.register_fake(f"padfree::{op}")(fake)
        del _fakes[op]


def load() -> bool:
    """Load `padfree._C` once; True when its ops are registered."""
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        try:
            import padfree._C  # noqa: F401  (ahead-of-time build)

            _state["how"] = "ahead-of-time build"
        except ImportError:
            if os.environ.get("PADFREE_BUILD_EXT", "") == "0":
                _state["error"] = "PADFREE_BUILD_EXT=0 forbids the just-in-time build"
            else:
                try:
                    _state["how"] = _build_just_in_time()
                except Exception as err:  # any compiler/toolchain failure: fall back, say why
                    _state["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        _state["loaded"] = _state["error"] is None
        if _state["loaded"]:
            _register_fakes()
        if not _state["loaded"]:
            warn_once("padfree._C", f"padfree._C could not be loaded ({_state['error']}); ops that have "
                                    "C++/CUDA kernels fall back to Triton or PyTorch")
        return bool(_state["loaded"])


@torch.compiler.assume_constant_result
def has_kernel(op: str, device: torch.device) -> bool:
    """Whether `torch.ops.padfree.<op>` has a `padfree._C` kernel for `device`'s type.

    Constant for the process, so `torch.compile` evaluates it once while tracing."""
    if not load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"padfree::{op}", key)
    except RuntimeError:  # the loaded _C does not define this op at all
        return False


def status(build: bool = True) -> dict[str, object]:
    """For `padfree env`: whether `_C` loaded, how, or why not. `build=False` (`env --no-build`)
    neither builds nor remembers anything when `_C` is not loaded yet and has no ahead-of-time
    build, so a later `load()` in the same process still builds it."""
    if not build and _state["loaded"] is None:
        try:
            import padfree._C  # noqa: F401
        except ImportError:
            return {"loaded": False, "how": None, "cuda_kernels": False,
                    "error": "not loaded yet (env --no-build: no just-in-time build to report on it)"}
    load()
    return {"loaded": bool(_state["loaded"]), "how": _state["how"], "error": _state["error"],
            "cuda_kernels": _state["loaded"] and torch._C._dispatch_has_kernel_for_dispatch_key(
                "padfree::cu_seqlens_from_position_ids", "CUDA")}
