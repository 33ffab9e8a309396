"""The `padfree` command.

    padfree env                         versions, usable backends, GPU and arch, padfree._C state
    padfree compile-check               compile every Triton kernel config to cubins (sm_80/86/89/90), no GPU
                        [--cuda]        and every csrc/*.cu with nvcc -c
                        [--efficiency [--json]]  static efficiency of the hot launches, and its gate
    padfree verify --model-type llama   packed batch == sequences one by one == padded, on a tiny random model
    padfree bench [--quick] [--json F]  end-to-end training throughput, padded vs padding-free batches
    padfree bench-compare OLD NEW       flag regressions beyond the spread of two saved benchmark runs

Each subcommand lives in a module exposing `add_arguments(parser)` and `run(args) -> int`; the
table `SUBCOMMANDS` maps names to those modules, which are imported only when chosen.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("padfree.cli", "print versions, usable backends, GPU and padfree._C state"),
    "compile-check": ("padfree.cli", "compile every Triton kernel config to cubins (no GPU needed)"),
    "verify": ("padfree.verify", "check packed == unpacked on a tiny random model"),
    "bench": ("padfree.benchmark.cli", "end-to-end training throughput: padded vs padding-free batches"),
    "bench-compare": ("padfree.benchmark.compare", "compare two benchmark JSON files, flag regressions"),
}


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-build", action="store_true", help="do not build padfree._C just to report on it")


def _env(args: argparse.Namespace) -> int:
    import platform

    import torch

    from padfree import _backend, _ext
    from padfree.kernels import runtime

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA", str(torch.version.cuda))]
    try:
        import triton

        reason = runtime.unchecked_triton(triton.__version__)
        rows.append(("triton", f"{triton.__version__} ({'unchecked: ' + reason if reason else 'checked'})"))
    except ImportError:
        rows.append(("triton", "not installed"))
    for name in ("transformers", "peft", "flash_attn"):
        try:
            rows.append((name, importlib.import_module(name).__version__))
        except ImportError:
            rows.append((name, "not installed"))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        rows.append(("GPU", f"{torch.cuda.get_device_name()} (sm_{major}{minor})"))
    else:
        rows.append(("GPU", "none (CUDA not available)"))
    rows.append(("backend requested", _backend.requested_backend()))
    triton_mode = ("interpreter (TRITON_INTERPRET=1)" if runtime.interpreting() else "compiled") \
        if runtime.HAS_TRITON else "unavailable"
    rows.append(("Triton kernels", triton_mode))
    status = _ext.status(build=not args.no_build)
    if status["loaded"]:
        rows.append(("padfree._C", f"loaded ({status['how']}), CUDA kernels: {'yes' if status['cuda_kernels'] else 'no'}"))
    else:
        rows.append(("padfree._C", f"not loaded: {status['error']}"))
    usable = ["reference"]
    if runtime.HAS_TRITON and (torch.cuda.is_available() or runtime.interpreting()):
        usable.append("triton")
    if status["loaded"] and status["cuda_kernels"] and torch.cuda.is_available():
        usable.append("cuda")
    rows.append(("usable backends", ", ".join(usable)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _compile_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=None,
                        help="compute capabilities to compile for (default: 80 86 89 90; sm_86 and sm_89 "
                             "assemble sm_80's PTX with ptxas for the arch; with --efficiency: 80 90)")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--cuda", action="store_true",
                        help="also compile every csrc/*.cu with nvcc -c per arch and syntax-check the CUDA glue")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA sources, no Triton kernels")
    parser.add_argument("--all", action="store_true",
                        help="also the extended launches: tuning candidates, fp16 twins of bf16 launches, "
                             "grid-stride attention variants of the flag subsets (see registry.Launch)")
    parser.add_argument("--efficiency", action="store_true",
                        help="instead, the static efficiency report of the hot bf16 launches (with --all: tuning "
                             "candidates too) and its gate: exit 1 when a row is flagged")
    parser.add_argument("--json", action="store_true", help="with --efficiency: JSON rows instead of a table")
    parser.add_argument("--baseline", default=None, metavar="REPORT.json",
                        help="with --efficiency: judge the rows against this report of the same launches "
                             "(`--json`, usually under another Triton) instead of the gate: exit 1 on a launch "
                             "that no longer compiles, changes MMA kind, replicates more, or whose main loop "
                             "grows past efficiency.MAX_TRITON_GROWTH")


def _compile_check(args: argparse.Namespace) -> int:
    from padfree import compile_check
    from padfree.kernels import registry

    if (args.json or args.baseline) and not args.efficiency:
        raise ValueError("--json and --baseline go with --efficiency")
    if args.efficiency:
        from padfree import efficiency

        baseline = None if args.baseline is None else efficiency.from_json(Path(args.baseline).read_text())
        rows = efficiency.run(args.arch or [80, 90], args.kernel, args.jobs, extended=args.all)
        print(efficiency.to_json(rows) if args.json else efficiency.table(rows))
        if baseline is not None:
            import triton

            failures = efficiency.against_baseline(rows, baseline)
            print(f"against {args.baseline} (Triton {triton.__version__} here): {len(rows) - len(failures)} "
                  f"as good, {len(failures)} worse", file=sys.stderr)
            for row, why in failures:
                print(f"  worse: {row.kernel} {row.label} sm_{row.arch}: {why}", file=sys.stderr)
            return 1 if failures else 0
        flagged = [row for row in rows if row.flags]
        print(f"efficiency gate: {len(rows) - len(flagged)} pass, {len(flagged)} flagged", file=sys.stderr)
        for row in flagged:
            print(f"  flagged: {row.kernel} {row.label} sm_{row.arch}: {'; '.join(row.flags)}", file=sys.stderr)
        return 1 if flagged else 0
    archs = args.arch or list(registry.ARCHS)
    results = [] if args.cuda_only else compile_check.run(archs, args.kernel, args.jobs, extended=args.all)
    if args.cuda or args.cuda_only:
        results += compile_check.run_cuda_sources(archs)
    failed = [r for r in results if not r.ok]
    print(f"compile-check: {len(results) - len(failed)} ok, {len(failed)} failed")
    return 0 if not failed else 1


_LOCAL = {"env": (_env_arguments, _env), "compile-check": (_compile_check_arguments, _compile_check)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="padfree", description="padding-free fine-tuning kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name in _LOCAL:
            add_arguments, run = _LOCAL[name]
        else:
            target = importlib.import_module(module)
            add_arguments, run = target.add_arguments, target.run
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"padfree {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
