"""Registry of every Triton kernel of padfree and the configurations it can be launched with.

Each kernel module calls `register(kernel, launches)` next to the kernel's definition, where
`launches()` yields a `Launch` for every configuration its launcher may pick (tile sizes, warps,
stages, and the constexpr feature flags that change the code). `padfree compile-check` compiles
all of them to cubins without a GPU; a test asserts that every `*_kernel` in `padfree.kernels` is
registered, so a new kernel cannot be forgotten.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


# GPU archs the compile check covers: A100 (sm_80), A10G/A40/RTX 3090 (sm_86), L4/L40S/RTX 4090 (sm_89),
# H100/H200 (sm_90); and those with the shared memory (163 KB and more) some tuning candidates need.
ARCHS = (80, 86, 89, 90)
BIG_SHARED_MEMORY_ARCHS = (80, 90)


@dataclass(frozen=True)
class Launch:
    """One compile configuration of a kernel.

    `signature` maps every argument name to its Triton type ("*fp16", "i32", "fp32", "constexpr",
    ...) in the kernel's argument order; `constexprs` gives the values of the constexpr ones.

    `aligned` names the integer arguments that real launches pass as multiples of 16 (model
    dimensions such as hidden or head_dim): Triton's JIT specializes those with a divisibility
    hint, and that hint is what lets it prove a tile row contiguous, load it with 16-byte vectors
    and turn the main loop into a multi-stage `cp.async` pipeline, so the compile check gives the
    hint too (strides always get it). `values` gives integer arguments whose run-time value makes
    the JIT compile other code, above all 1 (the JIT turns an int equal to 1 into a constant: a
    contiguous dimension's stride of 1 becomes a constexpr and its loads vectorise). The compile
    check specializes every argument as the JIT would for these values, honouring the kernel's
    `do_not_specialize`. `pipelined` says that the kernel's main loop must come out
    software-pipelined: the compile check fails the launch when the PTX has no asynchronous copy.
    `archs` are the GPUs the configuration is launched on; one whose shared memory exceeds an
    arch's limit fails the check there (a tuning candidate for the big-memory GPUs only lists 80
    and 90; the runtime skips it elsewhere, see runtime.launch_tuned). `extended` marks a launch
    that `compile-check` compiles only with `--all`, which keeps the every-commit check within CI's
    time: tuning candidates (tiles only PADFREE_AUTOTUNE=1 launches), the fp16 twins of bf16
    launches (the same code but for the element type), and for attention the fp32 launches off
    head dim 128, the small head dims and the grid-stride variants of the flag subsets (the
    all-features superset, a superset of their code, stays in); see attention._extended.
    """

    label: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    archs: tuple[int, ...] = ARCHS
    aligned: tuple[str, ...] = ()
    pipelined: bool = False
    values: dict[str, int] = field(default_factory=dict)
    extended: bool = False


def signature(kernel, types: dict[str, str], default: str = "i32") -> dict[str, str]:
    """The Triton signature of `kernel` in argument order: "constexpr" for the arguments annotated
    `tl.constexpr`, `types[name]` for the others named there (pointers, floats, i64), `default`
    for the rest."""
    import inspect

    result = {}
    for name, param in inspect.signature(getattr(kernel, "fn", kernel)).parameters.items():
        annotation = param.annotation
        is_constexpr = (annotation.endswith("constexpr") if isinstance(annotation, str)
                        else getattr(annotation, "__name__", "") == "constexpr")
        result[name] = "constexpr" if is_constexpr else types.get(name, default)
    return result


@dataclass
class KernelEntry:
    name: str
    kernel: object
    launches: Callable[[], Iterable[Launch]]
    module: str = field(default="")


_REGISTRY: dict[str, KernelEntry] = {}


def register(kernel, launches: Callable[[], Iterable[Launch]]) -> None:
    """Register a `@triton.jit` kernel with a function yielding its `Launch` configurations."""
    fn = getattr(kernel, "fn", kernel)
    name = f"{fn.__module__}.{fn.__name__}"
    _REGISTRY[name] = KernelEntry(name=name, kernel=kernel, launches=launches, module=fn.__module__)


def import_all_kernel_modules() -> list[str]:
    """Import every module of `padfree.kernels` so that all kernels register themselves."""
    import padfree.kernels as package

    names = []
    for info in pkgutil.walk_packages(package.__path__, prefix="padfree.kernels."):
        importlib.import_module(info.name)
        names.append(info.name)
    return names


def all_kernels() -> list[KernelEntry]:
    import_all_kernel_modules()
    return sorted(_REGISTRY.values(), key=lambda e: e.name)
