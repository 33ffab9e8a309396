"""Measured vs predicted: a GPU run of bench/test_attention.py next to the static model's time.

    python -m padfree.benchmark.predict bench/results/attention-DATE-GPU.json

The prediction of one padfree attention benchmark (bf16, head dim D, H heads, the packed lengths
it recorded) is the sum over the kernels its pass launches, each at the tile the launcher picks on
sm_90, of

    useful FLOPs x block quantization / (the kernel's main-loop rate on an H100)

with the rate from `padfree.efficiency.predicted_tflops` (static counts of the compiled sm_90
code; no GPU) and the quantization from `padfree.efficiency.pair_quantization` (score pairs the
tiles compute / pairs the sequences need). Useful FLOPs per head, with P the needed score pairs:
forward 2 GEMMs = 4 P D; dq 3 GEMMs (Q Kᵀ again, dO Vᵀ, dS K) = 6 P D; dk/dv 4 GEMMs (Q Kᵀ, dO Vᵀ,
Pᵀ dO, dSᵀ Q) = 8 P D; the backward's row-sum of dO * O moves 2 T H D 16-bit values at the
H100's bandwidth. Masked diagonal blocks and launch gaps are not modelled, so the prediction is a
floor: a measured/predicted ratio far above 1 points at what the model leaves out.
"""

from __future__ import annotations

import json
import sys

# Useful GEMM FLOPs of each attention kernel per score pair, head and head-dim unit, and whether
# its program owns a block of keys (dk/dv) instead of queries.
ATTENTION_KERNELS = {"fwd": ("attention_fwd_kernel", 4, False), "dq": ("attention_bwd_dq_kernel", 6, False),
                     "dkdv": ("attention_bwd_dkdv_kernel", 8, True)}


def attention_launch(kind: str, head_dim: int, causal: bool, arch: int = 90) -> tuple[str, int]:
    """(registry kernel name, launch index) of the bf16 launch the attention launcher runs for
    `kind` on sm_`arch` (its default tile, plain or causal, no other option)."""
    import torch

    from padfree.kernels import attention, registry

    padded = attention.head_dim_pad(head_dim)
    tile = attention.TILES.choices(attention.tile_key(kind, padded, torch.bfloat16), arch)[0]
    label = f"bf16 d{padded} {tile.label} {'has_right' if causal else 'plain'}"
    name = f"padfree.kernels.attention.{ATTENTION_KERNELS[kind][0]}"
    entry = next(e for e in registry.all_kernels() if e.name == name)
    for index, launch in enumerate(entry.launches()):
        if launch.label == label and arch in launch.archs:
            return name, index
    raise LookupError(f"no registered launch {label!r} of {name} for sm_{arch}")


def attention_seconds(lengths: list[int], heads: int, head_dim: int, causal: bool, backward: bool,
                      rows: dict[str, object]) -> float:
    """Predicted H100 seconds of one padfree attention pass; `rows` maps "fwd", "dq", "dkdv" to the
    `efficiency.Efficiency` of the launch `attention_launch` names."""
    from padfree import efficiency

    pairs = sum(s * (s + 1) // 2 if causal else s * s for s in lengths)
    seconds = 0.0
    for kind in ("fwd", "dq", "dkdv") if backward else ("fwd",):
        _, flops_per_pair, keys_side = ATTENTION_KERNELS[kind]
        row = rows[kind]
        rate = efficiency.predicted_tflops(row)
        if rate is None:
            raise ValueError(f"no main loop found in {row.kernel} {row.label}: no prediction")
        block_m, block_n = efficiency.attention_tile(row.label)
        block_rows, block_cols = (block_n, block_m) if keys_side else (block_m, block_n)
        quantization = efficiency.pair_quantization(lengths, block_rows, block_cols, causal, keys_side)
        seconds += flops_per_pair * pairs * heads * head_dim * quantization / (rate * 1e12)
    if backward:
        seconds += 2 * sum(lengths) * heads * head_dim * 2 / (efficiency.H100_BANDWIDTH_TBS * 1e12)
    return seconds


def compare(benchmark_json: dict, jobs: int | None = None) -> str:
    """A Markdown table: each padfree attention benchmark of a pytest-benchmark JSON, its measured
    median, the prediction, and measured / predicted; where the run recorded them (CUDA runs since
    bench/common.py splits a call), also the host's launch time and the kernels' device time, and
    device / predicted, which leaves the host out of the comparison."""
    from padfree import efficiency

    cases = [b for b in benchmark_json["benchmarks"] if b.get("extra_info", {}).get("backend") == "padfree_varlen"]
    if not cases:
        raise ValueError("no padfree_varlen benchmark in this JSON (is it bench/test_attention.py's?)")
    split = any("device_s" in case["extra_info"] for case in cases)
    header = ["benchmark", "measured ms", "predicted ms (static, H100)", "measured / predicted"]
    if split:
        header += ["host ms", "device ms", "device / predicted"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        info = case["extra_info"]
        shape = info["shape"]
        if "lengths" not in shape or info.get("dtype") != "torch.bfloat16":
            lines.append(f"| {case['name']} | {case['stats']['median'] * 1e3:.4g} | no prediction (needs bf16 and "
                         "the recorded lengths) | -" + " | -" * (len(header) - 4) + " |")
            continue
        backward = info["pass_name"] == "forward_backward"
        wanted = {kind: attention_launch(kind, shape["head_dim"], shape["causal"])
                  for kind in (("fwd", "dq", "dkdv") if backward else ("fwd",))}
        analyzed = efficiency.evaluate([(name, index, 90) for name, index in wanted.values()], jobs)
        rows = dict(zip(wanted, analyzed))
        predicted = attention_seconds(shape["lengths"], shape["heads"], shape["head_dim"], shape["causal"],
                                      backward, rows)
        measured = case["stats"]["median"]
        cells = [case["name"], f"{measured * 1e3:.4g}", f"{predicted * 1e3:.4g}", f"{measured / predicted:.2f}"]
        if split:
            if "device_s" in info:
                cells += [f"{info['host_s'] * 1e3:.4g}", f"{info['device_s'] * 1e3:.4g}",
                          f"{info['device_s'] / predicted:.2f}"]
            else:
                cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m padfree.benchmark.predict ATTENTION_BENCHMARK.json")
    with open(sys.argv[1]) as handle:
        print(compare(json.load(handle)))
