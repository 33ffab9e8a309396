"""Static efficiency of compiled Triton launches: what the compiler's output says about speed, no GPU.

For one launch compiled for one arch (`compile_check.build`), read:

- from the TTGIR, every `tt.dot` / `ttng.warp_group_dot` with its result layout. `#ttg.nvidia_mma`
  versionMajor 3 is Hopper's wgmma, 2 Ampere's mma.sync; a blocked layout is an FMA dot. A layout
  covers `warpsPerCTA[0] * instrShape[0]` rows and `warpsPerCTA[1] * instrShape[1]` columns; a
  result tile smaller than that is computed by several warps at once, each doing the same work.
  **Replication** = MMA work issued / work needed, FLOP-weighted over the kernel's dots (1.00 when
  every warp computes its own part; Triton lays chained dots out with warpsPerCTA = [num_warps, 1],
  so 8 warps on a 64-row attention tile issue every score GEMM twice).
- from `cuobjdump -res-usage`: registers and spill/stack bytes; from the metadata: shared memory;
  from those and the arch limits, **CTAs per SM**.
- from the PTX: pipelining (`cp.async` software pipeline, or TMA `cp.async.bulk.tensor`).
- from the SASS (`cuobjdump -sass`, shipped with Triton): the **main loop**, i.e. of the innermost
  backward-branching regions that hold MMA instructions (HGMMA / HMMA), the one with the fewest
  instructions per useful FLOP (for attention: the unmasked key/query loop, the steady state).
  Useful FLOPs per iteration = the MMA FLOPs its HGMMA/HMMA instructions issue (per warpgroup /
  per warp) divided by the replication. **Instructions per useful MFLOP** = loop instructions x
  num_warps / useful MFLOP: the issue slots a CTA spends per unit of real tensor-core work.

`reference_for` maps each hot launch to a textbook kernel (padfree.kernels.textbook) at the same
tile, warps and stages, so each row gets a ratio against a plain structure of the same shape, and
`gate` flags what the CI gate rejects.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

# Per SM: registers, resident threads, resident CTAs, shared memory (bytes, the CTA's 1 KiB system
# reserve included in what a CTA takes).
ARCH_LIMITS = {80: (65536, 2048, 32, 164 * 1024), 86: (65536, 1536, 16, 100 * 1024),
               89: (65536, 1536, 24, 100 * 1024), 90: (65536, 2048, 32, 228 * 1024)}
RESERVED_SHARED = 1024
MAX_REFERENCE_RATIO = 1.2

_LAYOUT = re.compile(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[(\d+), (\d+)\]"
                     r".*?instrShape = \[(\d+), (\d+)", re.M)
# a dot's first operand (rows x K) and its fp32 result (M x N, layout)
_DOT = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot) .*? : (?:tensor|!ttg\.memdesc)<\d+x(\d+)x\w+.*?"
                  r"-> tensor<(\d+)x(\d+)xf32, (#\w+)>")
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")


@dataclass
class Dot:
    m: int
    n: int
    k: int
    kind: str  # "wgmma", "mma.sync" or "fma"
    replication: float

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


def dots(ttgir: str) -> list[Dot]:
    """Every dot of a TTGIR module with its MMA kind and replication factor."""
    layouts = {name: (int(major), int(wm), int(wn), int(im), int(inn))
               for name, major, wm, wn, im, inn in _LAYOUT.findall(ttgir)}
    found = []
    for k, m, n, layout in _DOT.findall(ttgir):
        m, n, k = int(m), int(n), int(k)
        if layout not in layouts:
            found.append(Dot(m, n, k, "fma", 1.0))
            continue
        major, wm, wn, im, inn = layouts[layout]
        replication = max(1.0, wm * im / m) * max(1.0, wn * inn / n)
        found.append(Dot(m, n, k, "wgmma" if major == 3 else "mma.sync", replication))
    return found


def _mma_flops(opcode: str, num_warps: int) -> int:
    """MMA FLOPs one static HGMMA / HMMA instruction issues per CTA (all warps executing it)."""
    if opcode.startswith("HGMMA."):
        m, n, k = (int(v) for v in opcode.split(".")[1].split("x"))
        return 2 * m * n * k * (num_warps // 4)  # one per warpgroup
    shape = opcode.split(".")[1]  # HMMA.16816: m16 n8 k16; HMMA.1688: m16 n8 k8
    return 2 * int(shape[:2]) * int(shape[2]) * int(shape[3:]) * num_warps


def main_loop(sass: str, num_warps: int, replication: float) -> tuple[int, float, int] | None:
    """(instructions, useful MFLOP, MUFU instructions) per iteration of the main loop of a SASS
    listing, or None when no loop holds an MMA instruction."""
    code = [(int(addr, 16), opcode, operands) for addr, opcode, operands in _SASS.findall(sass) if opcode != "NOP"]
    loops = []
    for addr, opcode, operands in code:
        target = re.match(r"\s*0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < addr:
            body = [op for a, op, _ in code if int(target.group(1), 16) <= a <= addr]
            flops = sum(_mma_flops(op, num_warps) for op in body if op.startswith(("HGMMA.", "HMMA.")))
            if flops:
                mufu = sum(op.startswith("MUFU") for op in body)
                loops.append((int(target.group(1), 16), addr, len(body), flops, mufu))
    innermost = [loop for loop in loops
                 if not any(o is not loop and loop[0] <= o[0] and o[1] <= loop[1] for o in loops)]
    if not innermost:
        return None
    best = min(innermost, key=lambda loop: loop[2] * replication / loop[3])
    return best[2], best[3] / replication / 1e6, best[4]


def ctas_per_sm(arch: int, registers: int | None, num_warps: int, shared: int) -> int | None:
    if arch not in ARCH_LIMITS or registers is None:
        return None
    max_regs, max_threads, max_ctas, max_shared = ARCH_LIMITS[arch]
    per_warp = -(-max(registers, 1) // 8) * 8 * 32  # allocated per warp in units of 8 registers a thread
    by_regs = (max_regs // per_warp) // num_warps
    by_threads = max_threads // (32 * num_warps)
    by_shared = max_shared // (shared + RESERVED_SHARED)
    return min(by_regs, by_threads, by_shared, max_ctas)


@dataclass
class Efficiency:
    kernel: str
    label: str
    arch: int
    num_warps: int
    num_stages: int
    mma: str = "none"
    replication: float = 1.0
    registers: int | None = None
    spill: int | None = None
    shared: int = 0
    ctas_per_sm: int | None = None
    pipelining: str = "none"
    loop_instructions: int | None = None
    loop_mflop: float | None = None
    instr_per_mflop: float | None = None
    mufu_per_mflop: float | None = None
    reference: str = ""
    reference_instr_per_mflop: float | None = None
    error: str = ""
    flags: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.instr_per_mflop is None or not self.reference_instr_per_mflop:
            return None
        return self.instr_per_mflop / self.reference_instr_per_mflop


def analyze(compiled, arch: int, kernel: str = "", label: str = "") -> Efficiency:
    """The static efficiency of one `triton.compile` result for sm_`arch`."""
    from padfree.compile_check import _resource_usage

    num_warps, num_stages = compiled.metadata.num_warps, compiled.metadata.num_stages
    result = Efficiency(kernel, label, arch, num_warps, num_stages)
    found = dots(compiled.asm["ttgir"])
    if found:
        kinds = {d.kind for d in found}
        result.mma = kinds.pop() if len(kinds) == 1 else "mixed"
        result.replication = sum(d.flops * d.replication for d in found) / sum(d.flops for d in found)
    result.registers, result.spill = _resource_usage(compiled.asm["cubin"])
    result.shared = int(compiled.metadata.shared)
    result.ctas_per_sm = ctas_per_sm(arch, result.registers, num_warps, result.shared)
    ptx = compiled.asm["ptx"]
    result.pipelining = ("TMA" if "cp.async.bulk.tensor" in ptx else
                         "cp.async" if re.search(r"\bcp\.async\.", ptx) else "none")
    loop = main_loop(_sass(compiled.asm["cubin"]), num_warps, result.replication)
    if loop is not None:
        result.loop_instructions, result.loop_mflop, mufu = loop
        result.instr_per_mflop = loop[0] * num_warps / loop[1]
        result.mufu_per_mflop = mufu * num_warps / loop[1]
    return result


def _sass(cubin: bytes) -> str:
    from padfree.compile_check import _cuobjdump

    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither on PATH nor in triton's nvidia backend)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True, check=True).stdout


def gate(row: Efficiency) -> list[str]:
    """Why the CI gate rejects a 16-bit hot launch (empty when it passes)."""
    if row.error:
        return [f"does not compile: {row.error}"]
    flags = []
    if row.replication > 1.005:
        flags.append(f"MMA replicated {row.replication:.2f}x")
    if row.arch >= 90 and row.mma != "wgmma":
        flags.append(f"{row.mma} instead of wgmma on sm_{row.arch}")
    if row.spill:
        flags.append(f"spills {row.spill} B")
    if row.ratio is not None and row.ratio > MAX_REFERENCE_RATIO:
        flags.append(f"{row.ratio:.2f}x the reference's instructions per MFLOP")
    if row.instr_per_mflop is None:
        flags.append("no MMA main loop found in the SASS")
    return flags


# ---- the same launches under another Triton ---------------------------------------------------------
# The JIT compiles with the Triton the user's torch pins, which need not be the one the gate reads
# (CI's 3.9; torch 2.11 pins 3.6, which once ran the LoRA GEMM loops at 2.2x their 3.9 count).
# `against_baseline` judges a report of one Triton by the rows of another's: a launch fails when it
# no longer compiles, changes MMA kind, replicates more, or its main loop grows past this factor.
MAX_TRITON_GROWTH = 1.25


def from_json(text: str) -> list[Efficiency]:
    """Rows written by `to_json` (the `ratio` key, a derived property, is dropped)."""
    return [Efficiency(**{key: value for key, value in row.items() if key != "ratio"}) for row in json.loads(text)]


def _key(row: Efficiency) -> tuple[str, str, int]:
    return row.kernel.rsplit(".", 1)[-1], row.label, row.arch


def against_baseline(rows: list[Efficiency], baseline: list[Efficiency]) -> list[tuple[Efficiency, str]]:
    """(row, why) for each row that compiles worse than the same (kernel, launch, arch) of
    `baseline`, a report of the same launches under another Triton; a row the baseline lacks fails
    too (the two reports must cover the same launches)."""
    by_key = {_key(row): row for row in baseline}
    failures = []
    for row in rows:
        other = by_key.get(_key(row))
        if other is None:
            failures.append((row, "not in the baseline report"))
        elif row.error:
            failures.append((row, f"does not compile: {row.error}"))
        elif row.mma != other.mma:
            failures.append((row, f"{row.mma} instead of the baseline's {other.mma}"))
        elif row.replication > other.replication + 0.005:
            failures.append((row, f"MMA replicated {row.replication:.2f}x, the baseline {other.replication:.2f}x"))
        elif row.instr_per_mflop is None:
            failures.append((row, "no MMA main loop found in the SASS"))
        elif other.instr_per_mflop and row.instr_per_mflop > MAX_TRITON_GROWTH * other.instr_per_mflop:
            failures.append((row, f"main loop {row.instr_per_mflop / other.instr_per_mflop:.2f}x the baseline's "
                                  f"instructions per MFLOP ({row.instr_per_mflop:.0f} against "
                                  f"{other.instr_per_mflop:.0f})"))
    return failures


# ---- which launches, and their references ---------------------------------------------------------

ATTENTION = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel")
LORA = ("lora_forward_kernel", "lora_dx_kernel", "lora_da_kernel", "lora_shrink_kernel")


def is_hot(name: str, launch) -> bool:
    """The bf16 launches the gate covers: attention at head dims 64/128/256 plain and causal (no
    left window, softcap, ALiBi or dropout), every bf16 LoRA, LoRA-mixture and grouped MoE launch."""
    short = name.rsplit(".", 1)[-1]
    values = launch.constexprs
    if short in ATTENTION:
        return (launch.signature["Q"] == "*bf16" and values["HEAD_DIM_PAD"] in (64, 128, 256)
                and not any(values[f] for f in ("HAS_LEFT", "SOFTCAP", "ALIBI", "DROPOUT")))
    if short in LORA or name.startswith(("padfree.kernels.moe.", "padfree.kernels.lora_mixture.")):
        data = next(t for n, t in launch.signature.items() if n.endswith("_ptr") and t.startswith("*"))
        return data == "*bf16" and short.endswith("_kernel")
    return False


# kernels whose DROPOUT launches drop out an operand in the main loop (lora_da_kernel always does;
# lora_mixture_grad_x_kernel applies its mask once, in the epilogue)
_MAIN_LOOP_DROPOUT = ("lora_shrink_kernel", "lora_mixture_shrink_kernel", "lora_mixture_weight_grad_kernel")


def reference_for(name: str, launch):
    """(textbook kernel, its Launch) at the tile of `launch`, or None."""
    from padfree.kernels import textbook
    from padfree.kernels.registry import Tile

    short = name.rsplit(".", 1)[-1]
    c, warps, stages = launch.constexprs, launch.num_warps, launch.num_stages
    kernels = {"attention_fwd_kernel": textbook.textbook_attention_fwd_kernel,
               "attention_bwd_dq_kernel": textbook.textbook_attention_dq_kernel,
               "attention_bwd_dkdv_kernel": textbook.textbook_attention_dkdv_kernel}
    if short in kernels:
        return kernels[short], textbook.attention_launch(kernels[short], "bf16",
                                                         Tile(c["BLOCK_M"], c["BLOCK_N"], None, warps, stages),
                                                         c["HEAD_DIM_PAD"], c.get("OUTPUT", "dkdv"))
    # (rows, columns, reduction) of the output tile of each GEMM-shaped kernel
    shapes = {"lora_forward_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
              "lora_dx_kernel": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
              "lora_da_kernel": ("BLOCK_K", "BLOCK_R", "BLOCK_M"),
              "lora_shrink_kernel": ("BLOCK_M", "BLOCK_R", "BLOCK_K"),
              "lora_mixture_shrink_kernel": ("BLOCK_M", "BLOCK_R", "BLOCK_K"),
              "lora_mixture_grad_h_kernel": ("BLOCK_M", "BLOCK_R", "BLOCK_N"),
              "lora_mixture_weight_grad_kernel": ("BLOCK_K", "BLOCK_R", "BLOCK_M"),
              "lora_mixture_grad_x_kernel": ("BLOCK_M", "BLOCK_K", "BLOCK_R")}
    if short in shapes:
        m, n, k = (c[key] for key in shapes[short])
        # the kernels that drop out their operand in the main loop are held to a GEMM doing the same
        if short == "lora_da_kernel" or (c.get("DROPOUT") and short in _MAIN_LOOP_DROPOUT):
            return textbook.textbook_gemm_kernel, textbook.gemm_launch("bf16", Tile(m, n, k, warps, stages), dropout=True)
    elif name.startswith("padfree.kernels.moe."):
        # the gate_up kernel computes gate and up tiles of BLOCK_N columns from one row tile
        m, n, k = c["BLOCK_M"], c["BLOCK_N"] * (2 if short == "moe_gate_up_kernel" else 1), c["BLOCK_K"]
    else:
        return None
    return textbook.textbook_gemm_kernel, textbook.gemm_launch("bf16", Tile(m, n, k, warps, stages))


def _analyze_one(job: tuple[str, str, int, int]) -> Efficiency:
    """Worker: `job` = (kernel name, "hot" or "reference", launch index or -1, arch)."""
    from padfree import compile_check
    from padfree.kernels import registry

    name, role, index, arch = job
    entry = next(e for e in registry.all_kernels() if e.name == name)
    launch = list(entry.launches())[index]
    kernel = entry.kernel
    if role == "reference":
        kernel, launch = reference_for(name, launch)
        name = kernel.fn.__name__
    try:
        return analyze(compile_check.build(kernel, launch, arch), arch, name, launch.label)
    except Exception as err:  # report every failure, keep compiling the rest
        lines = str(err).strip().splitlines()
        return Efficiency(name, launch.label, arch, launch.num_warps, launch.num_stages,
                          error=(lines[-1] if lines else type(err).__name__)[:300])


def hot_launches(archs: list[int], kernel_filter: str | None = None, extended: bool = True
                 ) -> list[tuple[str, int, int]]:
    """(kernel name, launch index, arch) of every hot launch registered for each of `archs`;
    `extended=False` leaves out the launches `compile-check` compiles only with `--all` (tuning
    candidates, grid-stride variants of flag subsets): what CI compiles anyway."""
    from padfree.kernels import registry

    return [(entry.name, index, arch) for entry in registry.all_kernels()
            if not kernel_filter or kernel_filter in entry.name
            for index, launch in enumerate(entry.launches())
            if is_hot(entry.name, launch) and (extended or not launch.extended)
            for arch in archs if arch in launch.archs]


def evaluate(launches: list[tuple[str, int, int]], jobs: int | None = None) -> list[Efficiency]:
    """Analyze each (kernel name, launch index, arch) and its reference; gate flags filled in."""
    import multiprocessing

    from padfree.kernels import registry, runtime

    if runtime.interpreting():
        raise RuntimeError("the efficiency report needs compiled kernels: unset TRITON_INTERPRET and run again")
    entries = {entry.name: list(entry.launches()) for entry in registry.all_kernels()}
    keys, references = [], {}
    for name, index, arch in launches:
        kernel, ref = reference_for(name, entries[name][index])
        keys.append((kernel.fn.__name__, ref.label, arch))
        references.setdefault(keys[-1], (name, "reference", index, arch))
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1, mp_context=context) as pool:
        rows = list(pool.map(_analyze_one, [(name, "hot", index, arch) for name, index, arch in launches]))
        measured = dict(zip(references, pool.map(_analyze_one, references.values())))
    for row, key in zip(rows, keys):
        row.reference = f"{key[0].removeprefix('textbook_').removesuffix('_kernel')} {key[1]}"
        row.reference_instr_per_mflop = measured[key].instr_per_mflop
        row.flags = gate(row)
    return rows


def run(archs: list[int], kernel_filter: str | None = None, jobs: int | None = None, extended: bool = True
        ) -> list[Efficiency]:
    """The report: every hot launch (and its reference) for every arch (`extended`: see hot_launches)."""
    launches = hot_launches(archs, kernel_filter, extended)
    if not launches:
        raise RuntimeError(f"no hot launch matches {kernel_filter!r}")
    return evaluate(launches, jobs)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[Efficiency]) -> str:
    """A Markdown table of the rows."""
    lines = ["| kernel | launch | arch | MMA | repl. | regs | spill | smem KiB | CTAs/SM | pipeline | "
             "instr/MFLOP | reference | ratio | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.kernel.removeprefix('padfree.kernels.')} | {r.label} | sm_{r.arch} | {r.mma} | "
            f"{r.replication:.2f} | {_cell(r.registers, 'd')} | {_cell(r.spill, 'd')} | {r.shared / 1024:.0f} | "
            f"{_cell(r.ctas_per_sm, 'd')} | {r.pipelining} | {_cell(r.instr_per_mflop, '.0f')} | "
            f"{_cell(r.reference_instr_per_mflop, '.0f')} | {_cell(r.ratio, '.2f')} | "
            f"{'; '.join(r.flags) or 'ok'} |")
    return "\n".join(lines)


def to_json(rows: list[Efficiency]) -> str:
    return json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=1)


# ---- static performance model (predictions, not measurements) -------------------------------------
# H100 SXM5: dense bf16 tensor-core peak 989 TFLOP/s = 132 SMs x 1.83 GHz x 4096 FLOP/clock/SM;
# four schedulers issue one warp-instruction a clock each; the SFU (MUFU.EX2) does 16 lanes a
# clock per SM, so one warp-instruction holds it 2 SM clocks. mma.sync on Hopper is assumed to reach
# 62% of wgmma's peak (no async issue, register operands).
H100_PEAK_TFLOPS = 989.0
H100_BANDWIDTH_TBS = 3.35
FLOP_PER_CLOCK_SM = 4096
MMA_SYNC_FRACTION = 0.62


def clocks_per_mflop(row: Efficiency) -> float | None:
    """SM clocks per useful MFLOP of the main loop: tensor-core time (replication included) plus
    instruction issue plus SFU time, added as if nothing overlapped (no warp specialization)."""
    if row.instr_per_mflop is None:
        return None
    kind = 1.0 if row.mma == "wgmma" else MMA_SYNC_FRACTION
    tensor = 1e6 * row.replication / (FLOP_PER_CLOCK_SM * kind)
    return tensor + row.instr_per_mflop / 4 + 2 * (row.mufu_per_mflop or 0.0)


def predicted_tflops(row: Efficiency) -> float | None:
    """Useful TFLOP/s of the main loop on an H100, by `clocks_per_mflop`."""
    clocks = clocks_per_mflop(row)
    return None if clocks is None else H100_PEAK_TFLOPS * (1e6 / FLOP_PER_CLOCK_SM) / clocks


def pair_quantization(lengths, block_rows: int, block_cols: int, causal: bool, keys_side: bool = False) -> float:
    """Score pairs a block-tiled attention kernel computes / the pairs it needs, for sequences of
    `lengths`. A program owns `block_rows` rows (queries; keys when `keys_side`, the dk/dv kernel)
    and steps over the other side `block_cols` at a time: non-causal every block of the sequence,
    causal (bottom-right aligned, equal lengths) those up to its last query row / from its first
    key row."""
    executed = needed = 0
    for length in lengths:
        needed += length * (length + 1) // 2 if causal else length * length
        for start in range(0, length, block_rows):
            if not causal:
                span = length
            elif keys_side:
                span = length - start // block_cols * block_cols
            else:
                span = min(start + block_rows, length)
            executed += block_rows * -(-span // block_cols) * block_cols
    return executed / needed


def attention_tile(label: str) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of an attention launch label ("bf16 d128 128x64 w8s3 plain")."""
    size = re.search(r"(\d+)x(\d+) w", label)
    return int(size.group(1)), int(size.group(2))


def prediction_table(rows: list[Efficiency], max_length: int = 4096) -> str:
    """Markdown: per sm_90 row, the model's main-loop TFLOP/s, and for attention the useful TFLOP/s
    after block quantization at the FLAN-like and OrcaMath-like lengths (`padfree.benchmark`)."""
    from padfree.benchmark.distributions import builtin_lengths

    lengths = {name: builtin_lengths(name, 2000, 0, max_length) for name in ("flan", "orcamath")}
    lines = ["| kernel | launch | clocks/MFLOP | main loop TFLOP/s | FLAN useful TFLOP/s | OrcaMath useful TFLOP/s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if row.arch != 90 or predicted_tflops(row) is None:
            continue
        tflops = predicted_tflops(row)
        cells = ["", ""]
        short = row.kernel.rsplit(".", 1)[-1]
        if short.startswith("attention_"):
            block_m, block_n = attention_tile(row.label)
            keys_side = "dkdv" in short
            rows_, cols = (block_n, block_m) if keys_side else (block_m, block_n)
            causal = "has_right" in row.label
            cells = [f"{tflops / pair_quantization(lengths[name], rows_, cols, causal, keys_side):.0f}"
                     for name in ("flan", "orcamath")]
        lines.append(f"| {short} | {row.label} | {clocks_per_mflop(row):.0f} | {tflops:.0f} | {cells[0]} | "
                     f"{cells[1]} |")
    return "\n".join(lines)


# ---- MoE layer (static prediction; its grouped_mm comparison is conditional) ------------------------
# The Qwen3-30B-A3B layer of the >= 1.5x grouped_mm target (docs/moe.md): 16k tokens, bf16.
MOE_TARGET = dict(tokens=16384, experts=128, hidden=2048, inter=768, top_k=8)
# padfree's MoE kernels: (FLOPs per pair in units of hidden * inter, which the padded rows multiply)
MOE_KERNELS = {"moe_gate_up_kernel": 4, "moe_down_kernel": 2, "moe_down_backward_kernel": 2,
               "moe_down_weight_grad_kernel": 2, "moe_gate_up_backward_input_kernel": 4,
               "moe_gate_up_weight_grad_kernel": 4}


def moe_layer(rows: dict[str, Efficiency], tokens: int, experts: int, hidden: int, inter: int, top_k: int,
              block: int = 64) -> dict[str, float]:
    """Predicted H100 milliseconds of padfree's MoE experts forward and backward, and what
    transformers' `grouped_mm` path spends outside its GEMMs, from the sm_90 rows of the six MoE
    kernels (`rows`: kernel short name -> its default launch's row).

    A kernel takes max(FLOPs x padding / main-loop rate, compulsory bytes / 3.35 TB/s): the rows
    cover the main loop; the bytes are each operand read and each output written once (bf16). The
    block padding is its expectation under uniform routing, (P + E (block - 1) / 2) / P rows for
    P = tokens x top_k pairs. grouped_mm's GEMMs are CUTLASS kernels the report cannot read; its
    other passes (eager PyTorch, counted from transformers' `grouped_mm_experts_forward` and its
    autograd) are charged at bandwidth: forward the x gather, SiLU and product, routing weights,
    un-permute and sum over k; backward their gradients and the scatter into d hidden. Returns
    per-kernel and total milliseconds, grouped_mm's memory milliseconds and its GEMM FLOPs."""
    pairs, unit, size = tokens * top_k, hidden * inter, 2
    padding = (pairs + experts * (block - 1) / 2) / pairs
    capacity = pairs * padding
    weights = experts * 3 * unit * size
    byte_counts = {  # compulsory DRAM bytes of each kernel (and of its torch sum over k)
        "moe_gate_up_kernel": (tokens * hidden + capacity * 3 * inter) * size + 2 * weights / 3,
        "moe_down_kernel": (capacity * inter + 2 * pairs * hidden + tokens * hidden) * size + weights / 3,
        "moe_down_backward_kernel": (tokens * hidden + capacity * 5 * inter) * size + weights / 3,
        "moe_down_weight_grad_kernel": (pairs * hidden + capacity * inter) * size + weights / 3,
        "moe_gate_up_backward_input_kernel": (capacity * 2 * inter + 2 * pairs * hidden + tokens * hidden) * size
        + 2 * weights / 3,
        "moe_gate_up_weight_grad_kernel": (capacity * 2 * inter + pairs * hidden) * size + 2 * weights / 3,
    }
    result = {}
    for name, units in MOE_KERNELS.items():
        compute = units * pairs * unit * padding / (predicted_tflops(rows[name]) * 1e12)
        result[name] = 1e3 * max(compute, byte_counts[name] / (H100_BANDWIDTH_TBS * 1e12))
    result["forward"] = result["moe_gate_up_kernel"] + result["moe_down_kernel"]
    result["forward+backward"] = sum(result[name] for name in MOE_KERNELS)
    forward_bytes = (7 * pairs * hidden + tokens * hidden + 5 * pairs * inter) * size
    backward_bytes = (10 * pairs * hidden + tokens * hidden + 9 * pairs * inter) * size
    result["grouped_mm memory forward"] = 1e3 * forward_bytes / (H100_BANDWIDTH_TBS * 1e12)
    result["grouped_mm memory forward+backward"] = 1e3 * (forward_bytes + backward_bytes) / (H100_BANDWIDTH_TBS * 1e12)
    result["gemm flop forward"] = 6 * pairs * unit
    result["gemm flop forward+backward"] = 18 * pairs * unit
    return result


def grouped_mm_break_even(layer: dict[str, float], speedup: float = 1.5, part: str = "forward+backward") -> float:
    """The grouped-GEMM rate (TFLOP/s) at or below which padfree is `speedup` x faster than the
    grouped_mm path, by `moe_layer`'s prediction (inf: at any rate)."""
    budget = speedup * layer[part] - layer[f"grouped_mm memory {part}"]
    return float("inf") if budget <= 0 else layer[f"gemm flop {part}"] / (budget * 1e-3) / 1e12


def moe_prediction_table(rows: list[Efficiency]) -> str:
    """Markdown: `moe_layer` at MOE_TARGET from the sm_90 rows of the MoE kernels' sm_90 defaults."""
    import torch

    from padfree.kernels import moe
    from padfree.kernels.common import DTYPES

    bf16 = DTYPES[torch.bfloat16]
    by_name = {}
    for tile, kernel in moe.KERNELS.items():
        label = moe.make_launch(kernel, moe.POINTERS[tile], bf16, moe.TILES.choices((tile, bf16.size), 90)[0],
                                {"STORE_HW": True} if tile == "down_backward" else None).label
        found = [r for r in rows if r.arch == 90 and r.kernel.endswith(kernel.fn.__name__) and r.label == label]
        if not found or predicted_tflops(found[0]) is None:
            return f"(no sm_90 row of {kernel.fn.__name__} {label} in the report)"
        by_name[kernel.fn.__name__] = found[0]
    layer = moe_layer(by_name, **MOE_TARGET)
    lines = ["| kernel (sm_90 default) | launch | main loop TFLOP/s | predicted ms |", "|---|---|---|---|"]
    for name, row in by_name.items():
        lines.append(f"| {name} | {row.label} | {predicted_tflops(row):.0f} | {layer[name]:.3f} |")
    for part in ("forward", "forward+backward"):
        lines.append(f"| padfree {part} | | | {layer[part]:.3f} |")
        lines.append(f"| grouped_mm {part}: passes outside its GEMMs | | | "
                     f"{layer[f'grouped_mm memory {part}']:.3f} |")
        lines.append(f"| grouped_mm {part}: GEMM rate for padfree >= 1.5x | | "
                     f"<= {grouped_mm_break_even(layer, 1.5, part):.0f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m padfree.efficiency REPORT.json: the model's predictions for a saved --json report
    with open(sys.argv[1]) as handle:
        saved = from_json(handle.read())
    print(prediction_table(saved))
    if any(".moe." in row.kernel and row.arch == 90 for row in saved):
        print()
        print(moe_prediction_table(saved))
