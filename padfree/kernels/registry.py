"""Registry of every Triton kernel of padfree and the configurations it can be launched with.

Each kernel module calls `register(kernel, launches)` next to the kernel's definition, where
`launches()` yields a `Launch` for every configuration its launcher may pick (tile sizes, warps,
stages, and the constexpr feature flags that change the code). `padfree compile-check` compiles
all of them to cubins without a GPU; a test asserts that every `*_kernel` in `padfree.kernels` is
registered, so a new kernel cannot be forgotten.

The one convention of every kernel family (attention, LoRA, MoE, LoRA mixture, textbook):
a launch configuration is a `Tile` (block sizes, warps, stages; `Tile.label` is the shape the
compile-check labels print, "128x64 w8s3" or "128x128x64 w8s3"), and the tiles a launcher may pick
live in one `TileTable` per family, keyed by whatever the family's choice depends on (kernel, head
dim, element size, problem size, rank tile). The table gives the launcher its default per arch and
its tuning candidates (`TileTable.launch`, over runtime.launch_tuned), the archs a tile is
restricted to, the tiles `compile-check` compiles (`TileTable.registered`), and the override the
tests force a tile with (`TileTable.override`). The dtype map and the one `dot` are in
padfree.kernels.common.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Hashable, Iterable
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

    @classmethod
    def of(cls, tile: Tile, label: str, signature: dict[str, str], constexprs: dict[str, object],
           **kwargs) -> Launch:
        """The Launch of `tile`: its BLOCK_* constexprs, warps and stages, with the kernel's other
        `constexprs` and Launch fields."""
        return cls(label, signature, {**tile.constexprs, **constexprs}, num_warps=tile.num_warps,
                   num_stages=tile.num_stages, **kwargs)


@dataclass(frozen=True)
class Tile:
    """One launch configuration: the block sizes the kernel takes as BLOCK_M / BLOCK_N / BLOCK_K
    constexprs (None: the kernel has no such block; what each block means is the kernel's), warps
    and pipeline stages. `passes` is the attention dk/dv kernel's: 2 runs it as two launches (dv,
    then dk), each with one fp32 accumulator (attention.dkdv_outputs)."""

    block_m: int | None
    block_n: int | None = None
    block_k: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    passes: int = 1

    @property
    def constexprs(self) -> dict[str, int]:
        """The kernel's BLOCK_* constexprs of this tile."""
        blocks = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}
        return {name: value for name, value in blocks.items() if value is not None}

    @property
    def options(self) -> dict[str, int]:
        """The keyword arguments of a launch `kernel[grid](..., **tile.options)`."""
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    @property
    def label(self) -> str:
        """"128x64 w8s3" (blocks M and N), "128x128x64 w8s3" (M, N, K), as compile-check prints it."""
        blocks = "x".join(str(b) for b in (self.block_m, self.block_n, self.block_k) if b is not None)
        return f"{blocks} w{self.num_warps}s{self.num_stages}"


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


class TileTable:
    """The tiles of one kernel family's launchers, by key (what the choice depends on: kernel,
    head dim, element size, problem size, ...).

    `defaults[key]` is the tile launched unless an arch has its own (`arch_defaults[arch][key]`);
    `candidates[key]` are more tiles PADFREE_AUTOTUNE=1 times (runtime.pick); `only_on[key, tile]`
    limits a tile to some archs (it spills, replicates its MMAs or does not fit elsewhere): it is
    neither picked nor compile-checked on the others. Every tile the table lists for a key is
    registered for the compile check on its archs; those that are no arch's default only with
    `compile-check --all` (Launch.extended)."""

    def __init__(self, defaults: dict[Hashable, Tile], arch_defaults: dict[int, dict[Hashable, Tile]] | None = None,
                 candidates: dict[Hashable, tuple[Tile, ...]] | None = None,
                 only_on: dict[tuple[Hashable, Tile], tuple[int, ...]] | None = None):
        self.defaults = defaults
        self.arch_defaults = arch_defaults or {}
        self.candidates = candidates or {}
        self.only_on = only_on or {}
        self._override: Tile | None = None

    def archs(self, key: Hashable, tile: Tile) -> tuple[int, ...]:
        """The archs `tile` may run on for `key`."""
        return self.only_on.get((key, tile), ARCHS)

    def choices(self, key: Hashable, arch: int | None = None) -> tuple[Tile, ...]:
        """Every tile the launcher may pick for `key` on sm_`arch` (None: on any arch, which the
        interpreter tests use to run them all), the arch's default first; only the forced tile
        inside `override`."""
        if self._override is not None:
            return (self._override,)
        default = self.arch_defaults.get(arch, {}).get(key, self.defaults[key])
        every = (self.defaults[key], *(tiles[key] for tiles in self.arch_defaults.values() if key in tiles),
                 *self.candidates.get(key, ()))
        allowed = [tile for tile in every if tile != default and (arch is None or arch in self.archs(key, tile))]
        return (default, *dict.fromkeys(allowed))

    def registered(self, key: Hashable) -> Iterable[tuple[Tile, tuple[int, ...], bool]]:
        """(tile, its archs, whether it is a tuning candidate only: no arch's default) of every
        tile of `key`, for the kernel's `Launch`es."""
        defaults = {self.choices(key, arch)[0] for arch in ARCHS}
        for tile in self.choices(key):
            yield tile, self.archs(key, tile), tile not in defaults

    def launch(self, name: str, key: Hashable, launch: Callable[[Tile], object], tensor, shape: tuple = ()):
        """runtime.launch_tuned over the choices of `key` on the GPU of `tensor`: `launch(tile)`
        runs the kernel with `tile`; returns what it returns."""
        from padfree.kernels import runtime

        return runtime.launch_tuned(name, self.choices(key, runtime.arch(tensor)), launch, tensor, shape)

    @contextlib.contextmanager
    def override(self, tile: Tile):
        """Launch `tile` for every key inside the block (tests: small tiles make small interpreted
        shapes cross many tile edges)."""
        saved, self._override = self._override, tile
        try:
            yield
        finally:
            self._override = saved
