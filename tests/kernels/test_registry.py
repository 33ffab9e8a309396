"""Every Triton kernel is registered for the compile check, and the check really compiles."""

import inspect
import os
import pathlib
import subprocess
import sys

import pytest

from padfree.kernels import registry


def test_every_kernel_is_registered():
    modules = registry.import_all_kernel_modules()
    registered = {entry.name for entry in registry.all_kernels()}
    found = set()
    for name in modules:
        module = sys.modules[name]
        for attr, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if attr.endswith("_kernel") and inspect.isfunction(fn) and fn.__module__ == name:
                found.add(f"{name}.{attr}")
    assert found, "no *_kernel found in padfree.kernels"
    assert found <= registered, f"kernels missing from the registry: {sorted(found - registered)}"


def test_every_registered_kernel_has_launches_with_full_signatures():
    for entry in registry.all_kernels():
        launches = list(entry.launches())
        assert launches, entry.name
        arg_names = entry.kernel.fn.__code__.co_varnames[: entry.kernel.fn.__code__.co_argcount]
        for launch in launches:
            assert tuple(launch.signature) == tuple(arg_names), (entry.name, launch.label)
            constexpr = {n for n, t in launch.signature.items() if t == "constexpr"}
            assert constexpr == set(launch.constexprs), (entry.name, launch.label)


@pytest.mark.slow
def test_compile_check_compiles_for_every_arch_by_default():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "padfree.cli", "compile-check", "--kernel", "attention_dropout_mask"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(f"sm_{arch}" in done.stdout for arch in registry.ARCHS) and "0 failed" in done.stdout


_RETARGET_SCRIPT = '''
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from padfree import compile_check, efficiency
from padfree.kernels import registry

for name in ("padfree.kernels.lora.lora_forward_kernel", "padfree.kernels.moe.moe_gate_up_kernel"):
    entry = next(e for e in registry.all_kernels() if e.name == name)
    launch = list(entry.launches())[0]
    for arch in compile_check.SAME_PTX_AS:
        signature, constexprs, attrs = compile_check.jit_specialization(entry.kernel, launch, arch)
        full = triton.compile(ASTSource(fn=entry.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        derived = compile_check.build(entry.kernel, launch, arch)
        ttgir = [re.sub(r'ttg.target = "cuda:\\d+"', "", line) for line in full.asm["ttgir"].splitlines()
                 if not line.startswith("#loc")]
        base = [re.sub(r'ttg.target = "cuda:\\d+"', "", line) for line in derived.asm["ttgir"].splitlines()
                if not line.startswith("#loc")]
        same = ttgir == base and full.metadata.shared == derived.metadata.shared
        target = f".target sm_{arch}" in derived.asm["ptx"] and f"code for sm_{arch}" in efficiency._sass(derived.asm["cubin"])
        print(f"RESULT {name} sm_{arch} same={same and target} retargeted={isinstance(derived, compile_check.Retargeted)}")
'''


@pytest.mark.slow
def test_sm86_and_sm89_builds_have_the_ttgir_and_shared_memory_the_jit_gives_them(tmp_path):
    """compile-check builds sm_86/sm_89 from sm_80's PTX (compile_check.SAME_PTX_AS); that is only
    valid while Triton gives them sm_80's TTGIR, on which it sizes shared memory: compare with a
    full Triton compile for the arch in a fresh cache, and check the PTX targets the arch."""
    script = tmp_path / "retarget_check.py"
    script.write_text(_RETARGET_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 4 and all("same=True retargeted=True" in line for line in results), done.stdout


_GEMM_SCRIPT = '''
import triton
import triton.language as tl

from padfree import compile_check
from padfree.kernels import registry


@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K),
                    other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(tl.float16),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


signature = registry.signature(gemm_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16"})
for arch in (80, 90):
    for aligned in ((), ("K",)):
        launch = registry.Launch(f"aligned {aligned}", signature, {"BM": 64, "BN": 64, "BK": 32}, num_warps=4,
                                 num_stages=3, aligned=aligned, pipelined=True)
        result = compile_check.compile_launch(gemm_kernel, launch, arch)
        print(f"RESULT sm_{arch} aligned={bool(aligned)} ok={result.ok} pipelined={result.pipelined} "
              f"shared={result.shared} error={result.error}")
'''


def test_compile_check_fails_a_launch_that_should_be_pipelined_but_is_not(tmp_path):
    """A GEMM whose K is not known to be a multiple of 16 cannot load 16-byte vectors, so Triton
    does not pipeline it; with the hint real launches get for K = 4096 it does (3 stages of shared
    memory). The check must tell the two apart, and fail the first."""
    script = tmp_path / "gemm_check.py"
    script.write_text(_GEMM_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = {line.split()[1] + " " + line.split()[2]: line for line in done.stdout.splitlines()
             if line.startswith("RESULT")}
    assert len(lines) == 4, done.stdout
    for arch in ("sm_80", "sm_90"):
        aligned, unaligned = lines[f"{arch} aligned=True"], lines[f"{arch} aligned=False"]
        assert "ok=True pipelined=True" in aligned, aligned
        assert "ok=False pipelined=False" in unaligned and "not software-pipelined" in unaligned, unaligned
        shared = {name: int(line.split("shared=")[1].split()[0]) for name, line in
                  (("aligned", aligned), ("unaligned", unaligned))}
        assert shared["aligned"] >= 2 * shared["unaligned"], shared


_SPECIALIZATION_SCRIPT = '''
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from padfree import compile_check
from padfree.kernels import registry

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "i32": torch.int32,
          "i64": torch.int64, "i8": torch.int8, "i1": torch.bool, "u8": torch.uint8}
backend = make_backend(GPUTarget("cuda", 90, 32))
checked = 0
for entry in registry.all_kernels():
    kernel = entry.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    for launch in entry.launches():
        args = []
        for name, kind in launch.signature.items():
            if kind == "constexpr":
                args.append(launch.constexprs[name])
            elif kind.startswith("*"):
                args.append(torch.empty(64, dtype=DTYPES[kind[1:]]))  # 64-byte aligned, like CUDA allocations
            elif kind.startswith(("fp", "bf")):
                args.append(0.5)
            elif kind == "i1":
                args.append(True)
            else:
                aligned = name.startswith("stride") or name in launch.aligned
                args.append(launch.values.get(name, 16 * 37 if aligned else 37))
        bound, specialization, options = binder(*args)
        _, jit_signature, jit_constexprs, jit_attrs = kernel._pack_args(backend, {}, bound, specialization, options)
        signature, constexprs, attrs = compile_check.jit_specialization(kernel, launch, 90)
        names = list(launch.signature)
        constexprs = {(names.index(k),) if isinstance(k, str) else k: v for k, v in constexprs.items()}
        assert constexprs == jit_constexprs, (entry.name, launch.label, constexprs, jit_constexprs)
        assert attrs == jit_attrs, (entry.name, launch.label, attrs, jit_attrs)
        assert {k for k, v in signature.items() if v == "constexpr"} == \\
            {k for k, v in jit_signature.items() if v == "constexpr"}, (entry.name, launch.label)
        checked += 1
down = next(e for e in registry.all_kernels() if e.name.endswith("moe_down_kernel"))
launch = next(iter(down.launches()))
signature, constexprs, attrs = compile_check.jit_specialization(down.kernel, launch, 90)
print("CHECKED", checked, "stride_wk", signature["stride_wk"], constexprs.get("stride_wk"),
      "num_pairs_attrs", attrs.get((list(signature).index("num_pairs"),)))
'''


@pytest.mark.slow
def test_compile_check_specializes_every_launch_like_the_jit(tmp_path):
    """For every registered launch, the signature, constants and hints the compile check builds are
    the ones Triton's own JIT binder builds from launch arguments of those values: an int equal to
    1 (the MoE weights' stride_wk) is a constexpr, do_not_specialize arguments (num_pairs) get no
    hint, aligned pointers and strides get the divisibility hint."""
    script = tmp_path / "specialization_check.py"
    script.write_text(_SPECIALIZATION_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[2])  # this checkout's padfree
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("CHECKED"))
    assert int(line.split()[1]) > 100, line
    assert "stride_wk constexpr 1 num_pairs_attrs None" in line, line


_SHARED_MEMORY_SCRIPT = _GEMM_SCRIPT.split("signature = registry")[0] + '''
signature = registry.signature(gemm_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16"})
launch = registry.Launch("128x128x64 s5", signature, {"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=5,
                         aligned=("K",))
for arch in (80, 86, 89):
    result = compile_check.compile_launch(gemm_kernel, launch, arch)
    print(f"RESULT sm_{arch} ok={result.ok} shared={result.shared} error={result.error}")
'''


@pytest.mark.slow
def test_compile_check_fails_a_config_over_the_shared_memory_of_its_arch(tmp_path):
    """A 5-stage 128x128x64 fp16 GEMM needs 128 KB of shared memory (four 32 KB buffers): it fits an A100 (163 KB),
    not an A10G/L4 (99 KB), and the check must say so per arch."""
    script = tmp_path / "shared_check.py"
    script.write_text(_SHARED_MEMORY_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("RESULT")}
    assert "ok=True" in lines["sm_80"], lines
    for arch in ("sm_86", "sm_89"):
        assert "ok=False" in lines[arch] and f"{arch} allows 101376 B" in lines[arch], lines


def test_compile_check_queues_retargeted_archs_after_the_builds_they_reuse():
    """sm_86/sm_89 jobs retarget sm_80's build; queued after every build, they find it in Triton's
    cache instead of a second worker compiling it again (CI's compile check: sm_86 was 4.4x sm_89)."""
    from padfree import compile_check

    jobs = compile_check.plan([80, 86, 89, 90])
    retargeted = [index for index, (_, _, arch) in enumerate(jobs) if arch in compile_check.SAME_PTX_AS]
    built = [index for index, (_, _, arch) in enumerate(jobs) if arch not in compile_check.SAME_PTX_AS]
    assert retargeted and built and max(built) < min(retargeted)


def test_compile_check_compiles_extended_launches_only_when_asked():
    from padfree import compile_check
    from padfree.kernels import attention

    every = compile_check.plan([80, 90], extended=True)
    default = compile_check.plan([80, 90])
    assert set(default) < set(every)
    launches = {(entry.name, index): launch for entry in registry.all_kernels()
                for index, launch in enumerate(entry.launches())}
    assert all(not launches[name, index].extended for name, index, _ in default)
    # every kernel keeps its default launches on every arch
    assert {(name, arch) for name, _, arch in default} == {(name, arch) for name, _, arch in every}
    # the bf16 tiles the launchers pick without tuning are always compiled
    fwd = next(launch for (name, _), launch in launches.items() if name.endswith("attention_fwd_kernel")
               and launch.constexprs["HEAD_DIM_PAD"] == 128 and "bf16" in launch.label
               and not launch.constexprs["STRIDED"]
               and launch.constexprs["BLOCK_N"] == attention.TILES.choices(
                   attention.tile_key("fwd", 128, attention.torch.bfloat16), 80)[0].block_n)
    assert not fwd.extended
    assert any(launch.extended for (name, _), launch in launches.items() if name.endswith("lora_forward_kernel"))
    assert any(launch.extended for (name, _), launch in launches.items() if name.endswith("moe_down_kernel"))


def _table():
    tile = registry.Tile
    return registry.TileTable(
        {"a": tile(64, 64, 32, 4, 3), "b": tile(32, 32, 32, 4, 2)},
        arch_defaults={90: {"a": tile(128, 128, 64, 8, 3)}},
        candidates={"a": (tile(128, 64, 64, 4, 4), tile(64, 64, 32, 4, 3))},
        only_on={("a", tile(128, 128, 64, 8, 3)): (90,), ("a", tile(128, 64, 64, 4, 4)): (80, 90)})


def test_tile_labels_and_launch_options():
    """The shapes compile-check prints, and the BLOCK_* constexprs a tile gives a kernel (None: not one)."""
    assert registry.Tile(128, 64, None, 8, 3).label == "128x64 w8s3"
    assert registry.Tile(128, 128, 64, 8, 3).label == "128x128x64 w8s3"
    assert registry.Tile(64, None, 32, 4, 3).options == {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    launch = registry.Launch.of(registry.Tile(16, 32, None, 2, 1), "x", {}, {"FLAG": True}, archs=(90,))
    assert (launch.constexprs, launch.num_warps, launch.num_stages, launch.archs) == (
        {"BLOCK_M": 16, "BLOCK_N": 32, "FLAG": True}, 2, 1, (90,))


def test_tile_table_defaults_candidates_and_arch_limits():
    """Each arch's default first, then every other tile allowed there once; a tile limited to some
    archs is neither picked nor registered elsewhere; only no arch's default is a candidate-only launch."""
    table, tile = _table(), registry.Tile
    assert table.choices("a", 80) == (tile(64, 64, 32, 4, 3), tile(128, 64, 64, 4, 4))
    assert table.choices("a", 86) == (tile(64, 64, 32, 4, 3),)
    assert table.choices("a", 90) == (tile(128, 128, 64, 8, 3), tile(64, 64, 32, 4, 3), tile(128, 64, 64, 4, 4))
    assert table.choices("a") == (tile(64, 64, 32, 4, 3), tile(128, 128, 64, 8, 3), tile(128, 64, 64, 4, 4))
    assert table.choices("b", 90) == (tile(32, 32, 32, 4, 2),)
    assert list(table.registered("a")) == [(tile(64, 64, 32, 4, 3), registry.ARCHS, False),
                                           (tile(128, 128, 64, 8, 3), (90,), False),
                                           (tile(128, 64, 64, 4, 4), (80, 90), True)]


def test_tile_table_override_forces_one_tile_and_restores():
    table, forced = _table(), registry.Tile(16, 16, None, 4, 1)
    with table.override(forced):
        assert table.choices("a", 90) == table.choices("b") == (forced,)
        assert list(table.registered("b")) == [(forced, registry.ARCHS, False)]
    assert table.choices("b") == (registry.Tile(32, 32, 32, 4, 2),)


def test_tile_table_launch_tunes_over_the_arch_choices(monkeypatch):
    """TileTable.launch hands runtime.launch_tuned the choices of the tensor's arch."""
    import torch

    from padfree.kernels import runtime

    seen = []
    monkeypatch.setattr(runtime, "arch", lambda tensor: 86)
    monkeypatch.setattr(runtime, "launch_tuned", lambda name, candidates, launch, tensor, shape: seen.append(
        (name, candidates, shape)) or launch(candidates[0]))
    table = _table()
    assert table.launch("k", "a", lambda tile: tile.block_m, torch.empty(1), (3,)) == 64
    assert seen == [("k", table.choices("a", 86), (3,))]


def test_one_dot_and_one_dtype_map():
    """Every family multiplies with padfree.kernels.common.dot and names dtypes from common.DTYPES."""
    import torch

    from padfree.kernels import common, lora, lora_mixture, moe

    assert lora._dot is moe._dot is lora_mixture._dot is common.dot
    assert {dtype: (info.name, info.size, info.precision) for dtype, info in common.DTYPES.items()} == {
        torch.float16: ("fp16", 2, "tf32"), torch.bfloat16: ("bf16", 2, "tf32"), torch.float32: ("fp32", 4, "ieee")}
