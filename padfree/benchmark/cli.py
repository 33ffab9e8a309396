"""`padfree bench`: end-to-end training throughput, padded vs padding-free (see runner.py).

    padfree bench                                   CPU default: tiny Llama-like, fp32, flan + orcamath
    padfree bench --quick                           3 rounds instead of 5 (CPU)
    padfree bench --device cuda --model-size 1b     a real GPU run, bf16
    padfree bench --moe --lora --json out.json --plot out.png
    padfree bench --lengths my_lengths.txt          one length per line (or numbers: --lengths 12 300 77)
    padfree bench --dataset data.jsonl --tokenizer ./tokenizer_dir --text-field text
"""

from __future__ import annotations

import argparse

# Per-device defaults: (model size, dtype, tokens per step, max example length, rounds, warmup).
# A round times one step of every mode (runner.py); --quick keeps runner.MIN_ROUNDS rounds, the
# fewest that give a spread, on the same problem, so its ratios estimate the same thing.
# The CUDA budget keeps the padded baseline in an 80 GB GPU: its largest FLAN-like step pads to
# about 34k token slots at 4096/2048 (181k at 16384/4096, far past any GPU for `small`).
_DEFAULTS = {"cpu": ("tiny", "fp32", 4096, 1024, 5, 1), "cuda": ("small", "bf16", 4096, 2048, 20, 3)}
_QUICK_STEPS = {"cpu": (3, 1), "cuda": (8, 2)}


def _default_text(index: int) -> str:
    return ", ".join(f"{values[index]} on {device}" for device, values in _DEFAULTS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from padfree.benchmark import batches, distributions, runner

    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cpu (the CPU run uses padfree's reference backend)")
    parser.add_argument("--model-size", choices=sorted(runner.MODEL_SIZES), default=None,
                        help="Llama-like config: micro/tiny (CPU), small (~0.5B), 1b (~1B); default tiny on "
                             "cpu, small on cuda")
    parser.add_argument("--dtype", choices=sorted(runner.DTYPES), default=None,
                        help="default fp32 on cpu, bf16 on cuda")
    parser.add_argument("--moe", action="store_true",
                        help=f"Mixtral-like model ({runner.MOE_EXPERTS} experts, top-{runner.MOE_TOP_K})")
    parser.add_argument("--lora", action="store_true",
                        help=f"train PEFT LoRA adapters (r={runner.LORA_RANK}, all linear layers) on a frozen base")
    parser.add_argument("--distributions", nargs="+", choices=sorted(distributions.DISTRIBUTIONS),
                        default=["flan", "orcamath"], help="built-in length distributions (default: both)")
    parser.add_argument("--lengths", nargs="+", default=None,
                        help="example lengths: numbers, or a file with one length per line (replaces "
                             "--distributions; the form padfree verify --lengths takes)")
    parser.add_argument("--dataset", default=None, help="local JSONL file to take example lengths from")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory for --dataset")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--modes", nargs="+", choices=batches.MODES, default=list(batches.MODES),
                        help="batching modes (padded is always needed: ratios are against it)")
    parser.add_argument("--steps", type=int, default=None,
                        help="rounds: each times one step of every mode, modes rotated per round "
                             f"(default {_default_text(4)}; a spread needs at least {runner.MIN_ROUNDS})")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warmup steps per mode")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help=f"useful-token budget of one step (default {_default_text(2)})")
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"longest example; built-in distributions scale with it (default {_default_text(3)})")
    quick = ", ".join(f"{rounds} on {device}" for device, (rounds, _) in _QUICK_STEPS.items())
    parser.add_argument("--quick", action="store_true", help=f"fewer rounds: {quick}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on cpu: 1, so that a busy machine slows every mode "
                             "alike; on cuda: torch's)")


def config_from_args(args: argparse.Namespace):
    from padfree.benchmark import distributions
    from padfree.benchmark.runner import BenchConfig

    device = args.device or "cpu"
    size, dtype, tokens, max_length, steps, warmup = _DEFAULTS[device]
    if args.quick:
        steps, warmup = _QUICK_STEPS[device]
    pick = lambda given, default: default if given is None else given  # noqa: E731
    return BenchConfig(device=device, dtype=pick(args.dtype, dtype), model_size=pick(args.model_size, size),
                       moe=args.moe, lora=args.lora, distributions=args.distributions, modes=args.modes,
                       steps=pick(args.steps, steps), warmup=pick(args.warmup, warmup),
                       tokens_per_step=pick(args.tokens_per_step, tokens),
                       max_length=pick(args.max_length, max_length), seed=args.seed, lr=args.lr,
                       lengths=None if args.lengths is None else tuple(distributions.parse_lengths(
                           args.lengths, pick(args.max_length, max_length))),
                       dataset=args.dataset, tokenizer=args.tokenizer,
                       text_field=args.text_field, progress=not args.no_progress,
                       threads=pick(args.threads, 1 if device == "cpu" else None))


def run(args: argparse.Namespace) -> int:
    from padfree.benchmark import report, runner

    result = runner.run(config_from_args(args))
    print(report.table(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
