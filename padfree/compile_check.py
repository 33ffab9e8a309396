"""Compile every registered Triton kernel, in every launch configuration, to a cubin per GPU arch.

Needs no GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole
Triton → PTX → ptxas pipeline on the host. Reports shared memory (Triton's dynamic allocation) and,
from `cuobjdump -res-usage` on the cubin, registers and local memory (spills / stack).
Every argument is specialized the way Triton's JIT specializes a real launch (the same
`native_specialize_impl` call, honouring the kernel's `do_not_specialize` and
`do_not_specialize_on_alignment`): pointers as 16-byte aligned (torch's allocator), strides and
the launch's `aligned` dimensions as multiples of 16, the launch's `values` as given (an int equal
to 1 becomes a constexpr), other ints as values with no hint; so the code (vector widths,
registers, pipelining) matches what runs. The
`async` column says whether the PTX has asynchronous global->shared copies, i.e. whether Triton
software-pipelined a main loop (`num_stages`); a launch registered as `pipelined` fails without.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# The most shared memory a block may use (opt-in), in bytes: A100 (sm_80), A10G/A40/RTX 3090 (sm_86),
# L4/L40S/RTX 4090 (sm_89), H100/H200 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class CompileResult:
    kernel: str
    label: str
    arch: int
    ok: bool
    shared: int = 0
    registers: int | None = None
    local: int | None = None
    pipelined: bool | None = None
    seconds: float = 0.0
    error: str = ""


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return bundled if os.path.exists(bundled) else None
    except ImportError:
        return None


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    spill = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
    return (int(registers.group(1)) if registers else None), spill


# Run-time values standing for "an int with no divisibility" and "a multiple of 16".
_PLAIN_INT, _ALIGNED_INT = 7, 16


def jit_specialization(kernel, launch, arch: int) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of `launch` as Triton's JIT builds them at launch time."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constexprs, attrs = dict(launch.signature), dict(launch.constexprs), {}
    for index, (param, (name, kind)) in enumerate(zip(kernel.params, launch.signature.items())):
        if kind == "i1" or kind.startswith(("fp", "bf")):
            continue  # the JIT does not specialize floats and bools
        if kind == "constexpr":
            hint = ""  # the JIT gives every constant an empty attribute list
        elif kind.startswith("*"):
            hint = "" if param.do_not_specialize_on_alignment else "D"
        else:
            value = launch.values.get(name)
            if value is None:
                value = _ALIGNED_INT if name.startswith("stride") or name in launch.aligned else _PLAIN_INT
            specialized, hint = native_specialize_impl(type(backend), value, False, not param.do_not_specialize,
                                                       not param.do_not_specialize_on_alignment)
            if specialized == "constexpr":
                signature[name], constexprs[name], hint = "constexpr", hint, ""
        if hint is not None:
            attrs[(index,)] = backend.parse_attr(hint)
    return signature, constexprs, attrs


# sm_86 and sm_89 get sm_80's TTGIR word for word (the same mma.sync / cp.async code; only the
# target attribute differs, which tests/kernels/test_registry.py checks on real launches), and
# Triton sizes shared memory on that TTGIR, before any arch-specific lowering. So compile-check
# builds them from sm_80's PTX assembled by ptxas for the arch, and checks that shared memory
# against their 99 KB: what makes a tile crash there. LLVM may schedule sm_80's and sm_86's IR
# differently, so the registers and spills shown for sm_86/89 are those of sm_80's code on that
# arch, close to but not always equal to what the JIT builds there.
SAME_PTX_AS = {86: 80, 89: 80}


@dataclass
class Retargeted:
    """A compiled launch of `SAME_PTX_AS` arch: the base arch's build with its own PTX and cubin."""
    asm: dict
    metadata: object


def _ptxas_cache_path(ptx: str, arch: int) -> str:
    import hashlib

    from triton import knobs

    key = hashlib.sha256(f"{arch}\n{ptx}".encode()).hexdigest()
    return os.path.join(knobs.cache.dir, "padfree-retargeted", f"{key}.cubin")


def retarget(compiled, arch: int) -> Retargeted:
    """`compiled` (a sm_80 build) assembled for sm_`arch` by the ptxas Triton uses, with Triton's
    options; cached beside Triton's cache, keyed by the PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    ptx = re.sub(r"^\.target sm_\d+a?", f".target sm_{arch}", compiled.asm["ptx"], count=1, flags=re.M)
    path = _ptxas_cache_path(ptx, arch)
    if os.path.exists(path):
        with open(path, "rb") as handle:
            cubin = handle.read()
    else:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        options = backend.parse_options({"num_warps": compiled.metadata.num_warps,
                                         "num_stages": compiled.metadata.num_stages})
        cubin = backend.make_cubin(ptx, {}, options, arch)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}"
        with open(partial, "wb") as handle:
            handle.write(cubin)
        os.replace(partial, path)
    return Retargeted({**compiled.asm, "ptx": ptx, "cubin": cubin}, compiled.metadata)


def build(kernel, launch, arch: int):
    """`triton.compile` of one `registry.Launch` of `kernel` for sm_`arch`, specialized as the JIT
    would (Triton's cache reuses it); for a `SAME_PTX_AS` arch, the base arch's build retargeted."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if arch in SAME_PTX_AS:
        return retarget(build(kernel, launch, SAME_PTX_AS[arch]), arch)
    signature, constexprs, attrs = jit_specialization(kernel, launch, arch)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def compile_launch(kernel, launch, arch: int, name: str = "") -> CompileResult:
    """Compile one `registry.Launch` of `kernel` for sm_`arch` and check its resources."""
    name = name or getattr(kernel, "__name__", str(kernel))
    started = time.perf_counter()
    try:
        compiled = build(kernel, launch, arch)
        registers, local = _resource_usage(compiled.asm["cubin"])
        shared = int(compiled.metadata.shared)
        pipelined = re.search(r"\bcp\.async\.", compiled.asm["ptx"]) is not None
        result = CompileResult(name, launch.label, arch, True, shared, registers, local, pipelined)
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and shared > limit:
            result.ok = False
            result.error = f"needs {shared} B of shared memory, sm_{arch} allows {limit} B"
        elif launch.pipelined and not pipelined:
            result.ok = False
            result.error = f"main loop not software-pipelined (no cp.async in the PTX, num_stages={launch.num_stages})"
    except Exception as err:  # report every failure, keep compiling the rest
        message = str(err).strip().splitlines()
        result = CompileResult(name, launch.label, arch, False,
                               error=(message[-1] if message else type(err).__name__)[:300])
    result.seconds = time.perf_counter() - started
    return result


def _compile_one(job: tuple[str, int, int]) -> CompileResult:
    from padfree.kernels import registry

    kernel_name, launch_index, arch = job
    entry = next(e for e in registry.all_kernels() if e.name == kernel_name)
    return compile_launch(entry.kernel, list(entry.launches())[launch_index], arch, kernel_name)


def plan(archs: list[int], kernel_filter: str | None = None,
         extended: bool = False) -> list[tuple[str, int, int]]:
    """(kernel, launch index, arch) of every launch to compile; `Launch.extended` ones only if asked.
    The archs that reuse another's PTX (`SAME_PTX_AS`) come after every other job: their build is
    the base arch's, retargeted, so by then it is in Triton's cache; next to it in the queue, a
    second worker would compile the same base build again (CI: sm_86 took 4.4x sm_89's time)."""
    from padfree.kernels import registry

    jobs = []
    for entry in registry.all_kernels():
        if kernel_filter and kernel_filter not in entry.name:
            continue
        for index, launch in enumerate(entry.launches()):
            if extended or not launch.extended:
                jobs.extend((entry.name, index, arch) for arch in archs if arch in launch.archs)
    return sorted(jobs, key=lambda job: job[2] in SAME_PTX_AS)


def run(archs: list[int], kernel_filter: str | None = None, jobs: int | None = None,
        stream=sys.stdout, extended: bool = False) -> list[CompileResult]:
    """Compile every launch (the `Launch.extended` ones only when `extended`), print one table
    row per (kernel, config, arch), return the results."""
    from padfree.kernels import runtime

    if not runtime.HAS_TRITON:
        raise RuntimeError("compile-check needs triton installed")
    if runtime.interpreting():
        raise RuntimeError("compile-check needs compiled kernels: unset TRITON_INTERPRET and run again")
    work = plan(archs, kernel_filter, extended)
    if not work:
        raise RuntimeError(f"no kernel matches {kernel_filter!r}")
    workers = jobs or os.cpu_count() or 1
    header = (f"{'kernel':<44} {'config':<40} {'arch':>5} {'shared':>8} {'regs':>5} {'spill':>6} {'async':>5} "
              f"{'sec':>5}  status")
    print(f"compiling {len(work)} (kernel, config, arch) combinations with {workers} workers", file=stream)
    print(header, file=stream)
    print("-" * len(header), file=stream)
    results = []
    context = "fork" if sys.platform.startswith("linux") else "spawn"
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(context)) as pool:
        for result in pool.map(_compile_one, work):
            results.append(result)
            short = result.kernel.removeprefix("padfree.kernels.")
            regs = "-" if result.registers is None else str(result.registers)
            spill = "-" if result.local is None else str(result.local)
            piped = "-" if result.pipelined is None else ("yes" if result.pipelined else "no")
            status = "ok" if result.ok else f"FAIL: {result.error}"
            print(f"{short:<44} {result.label:<40} {'sm_' + str(result.arch):>5} {result.shared:>8} "
                  f"{regs:>5} {spill:>6} {piped:>5} {result.seconds:>5.1f}  {status}", file=stream, flush=True)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} compiled, {len(failed)} failed", file=stream)
    return results


def _nvcc_arch_flag(arch: int) -> str:
    # Hopper's wgmma/setmaxnreg need the arch-specific target; its -gencode form also assembles
    # plain sm_90 code (HOPPER.md: the -arch=sm_90a shorthand ran a plain sm_90 pass too).
    suffix = "a" if arch >= 90 else ""
    return f"-gencode=arch=compute_{arch}{suffix},code=sm_{arch}{suffix}"


def run_cuda_sources(archs: list[int], stream=sys.stdout) -> list[CompileResult]:
    """`nvcc -c` every csrc/*.cu for each arch, and syntax-check the C++ glue with CUDA enabled."""
    import torch
    from torch.utils import cpp_extension

    from padfree._ext import source_dir

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH: the CUDA sources cannot be checked")
    csrc = source_dir()
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for source in sorted(csrc.glob("*.cu")):
            for arch in archs:
                started = time.perf_counter()
                command = [nvcc, "-c", str(source), "-o", os.path.join(scratch, "out.o"), "-O3",
                           "-std=c++20", _nvcc_arch_flag(arch), "-Xptxas", "-v"]
                done = subprocess.run(command, capture_output=True, text=True)
                registers = [int(m) for m in re.findall(r"Used (\d+) registers", done.stderr)]
                spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", done.stderr)]
                result = CompileResult(f"csrc/{source.name}", "nvcc -c", arch, done.returncode == 0,
                                       registers=max(registers, default=None), local=sum(spills),
                                       seconds=time.perf_counter() - started,
                                       error=done.stderr.strip().splitlines()[-1] if done.returncode else "")
                results.append(result)
        compiler = shutil.which("c++") or shutil.which("g++")
        for source in sorted(csrc.glob("*.cpp")):
            if compiler is None or "PADFREE_WITH_CUDA" not in source.read_text():
                continue
            started = time.perf_counter()
            done = subprocess.run([compiler, "-fsyntax-only", "-std=c++20", "-DPADFREE_WITH_CUDA=1",
                                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                                   *includes, str(source)], capture_output=True, text=True)
            results.append(CompileResult(f"csrc/{source.name}", "c++ -fsyntax-only (CUDA glue)", 0,
                                         done.returncode == 0, seconds=time.perf_counter() - started,
                                         error=done.stderr.strip().splitlines()[-1] if done.returncode else ""))
    for result in results:
        arch = f"sm_{result.arch}" if result.arch else "host"
        regs = "-" if result.registers is None else str(result.registers)
        spill = "-" if result.local is None else str(result.local)
        status = "ok" if result.ok else f"FAIL: {result.error}"
        print(f"{result.kernel:<44} {result.label:<40} {arch:>5} {'':>8} {regs:>5} {spill:>6} {'-':>5} "
              f"{result.seconds:>5.1f}  {status}", file=stream, flush=True)
    return results
