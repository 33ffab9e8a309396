"""`padfree verify`: check on a random-weight model that packing with padfree changes nothing.

    padfree verify --model-type llama [--backend reference|triton|auto] [--dtype float32]
    padfree verify --config path/to/config.json [--full-size]
    padfree verify --all [--triton] [--markdown FILE]

`--model-type` takes any causal-LM model type of the installed transformers (padfree's preset
when it has one, else the type's default config made tiny).

Builds the model from padfree's architecture table (or a config.json), tiny unless `--full-size`,
with random weights (nothing is downloaded), and runs the same random sequences three ways:

  * one by one, each sequence alone, with transformers' eager attention (the oracle);
  * as a right-padded batch with an attention mask, eager;
  * packed into one row (positions reset per sequence, boundaries as `cu_seq_lens_*`) on the
    model switched to padfree, and the padded batch again through padfree (its unpadding path).

It prints one row per check (per-token logits, loss, the worst parameter gradient), with max abs
error, relative error ||x - ref|| / ||ref|| and the tolerance, and exits 1 if any check fails.

`--all` is the architecture sweep: every causal-LM type, built tiny from its default config, is
given to `padfree.patch` and, when served, proven as above on the reference backend (with
`--triton`, also on the Triton kernels, interpreted on CPU, for TRITON_SWEEP_TYPES). One row per
type: served and proven, refused with padfree's reason, or cannot be built or run tiny. A type
served but wrong or crashing fails the run (exit 1).

The batch builders and `run_*` functions are also what tests/hf uses for its model proofs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative tolerance per dtype: both sides run the whole model, in different summation orders.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEFAULT_LENGTHS = (5, 17, 3, 9)


def packing_collator():
    """padfree's padding-free collator (one row, positions reset, `cu_seq_lens_*` boundaries)."""
    from padfree.packing import PaddingFreeCollator

    return PaddingFreeCollator()


def random_sequences(lengths, vocab_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Random token ids (avoiding the ids 0-2 the tiny configs use for pad/bos/eos)."""
    return [torch.randint(3, vocab_size, (n,), generator=generator) for n in lengths]


def packed_batch(sequences, device="cpu") -> dict:
    """One row (1, T): sequences back to back, positions reset, boundaries as flash kwargs."""
    batch = packing_collator()([{"input_ids": s.tolist()} for s in sequences])
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def concatenated_batch(sequences, device="cpu") -> dict:
    """Packing done wrong: one row, no position reset, no boundaries (labels still split)."""
    labels = [torch.cat([torch.tensor([-100]), s[1:]]) for s in sequences]
    return dict(input_ids=torch.cat(sequences)[None].to(device), labels=torch.cat(labels)[None].to(device))


def padded_batch(sequences, pad_id: int = 0, device="cpu") -> dict:
    """(B, longest) right-padded, a 2D attention mask, labels -100 on padding."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


@dataclass
class Result:
    logits: torch.Tensor             # (real tokens, vocab), sequences in order
    loss: torch.Tensor               # mean next-token loss over every predicted token
    grads: dict[str, torch.Tensor]   # parameter name -> gradient of `loss`


def _take_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def run_batch(model, batch: dict) -> Result:
    """Forward + backward of one batch; logits of its real (unpadded) tokens only."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    logits = out.logits.detach()
    if "attention_mask" in batch:
        logits = logits[batch["attention_mask"].bool()]
    else:
        logits = logits.reshape(-1, logits.shape[-1])
    return Result(logits, out.loss.detach(), _take_grads(model))


def run_one_by_one(model, sequences, device="cpu") -> Result:
    """Each sequence alone; loss and gradients weighted into one mean over all predicted tokens."""
    model.zero_grad(set_to_none=True)
    predicted = sum(len(s) - 1 for s in sequences)
    logits, loss = [], torch.zeros((), device=device)
    for s in sequences:
        ids = s[None].to(device)
        out = model(input_ids=ids, labels=ids)
        weighted = out.loss * (len(s) - 1) / predicted
        weighted.backward()
        logits.append(out.logits.detach()[0])
        loss = loss + weighted.detach()
    return Result(torch.cat(logits), loss, _take_grads(model))


@dataclass
class Check:
    name: str
    max_abs: float
    rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.tol  # NaN compares False: a NaN fails


# A gradient's relative error is taken against at least this fraction of the largest gradient's
# norm: some gradients are zero in exact arithmetic (a key bias: softmax ignores a shift shared by
# all keys) and hold only rounding noise, which no relative error can bound.
GRAD_NORM_FLOOR = 1e-3


def _errors(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> tuple[float, float]:
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    diff = x.double() - ref.double()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    return max_abs, (diff.norm() / ref.double().norm().clamp_min(floor)).item()


def compare(label: str, result: Result, reference: Result, tol: float, per_parameter: bool = False) -> list[Check]:
    """Checks of `result` against `reference`: logits, loss, and the gradients (the worst one, or each)."""
    checks = [Check(f"{label}: logits", *_errors(result.logits, reference.logits), tol),
              Check(f"{label}: loss", *_errors(result.loss, reference.loss), tol)]
    if result.grads.keys() != reference.grads.keys():
        missing = sorted(set(result.grads) ^ set(reference.grads))
        return checks + [Check(f"{label}: gradients of {missing}", float("nan"), float("nan"), tol)]
    floor = GRAD_NORM_FLOOR * max((g.double().norm().item() for g in reference.grads.values()), default=0.0)
    grads = [Check(f"{label}: grad {name}", *_errors(result.grads[name], reference.grads[name], max(floor, 1e-30)),
                   tol) for name in result.grads]
    if per_parameter:
        return checks + grads
    worst = max(grads, key=lambda c: (c.rel != c.rel, c.rel))  # NaN first
    worst.name = f"{label}: grads ({len(grads)} params, worst {worst.name.split('grad ', 1)[1]})"
    return checks + [worst]


def verify_model(model, sequences, tol: float, device="cpu", per_parameter: bool = False,
                 padded_padfree: bool = True) -> list[Check]:
    """Run `sequences` one by one and padded (eager), then packed (and, with `padded_padfree`, padded)
    on padfree; compare.

    `model` is a transformers causal LM using eager attention; it is patched for the padfree runs
    and unpatched again before returning.
    """
    from padfree.hf import patch as hf_patch

    alone = run_one_by_one(model, sequences, device)
    padded = run_batch(model, padded_batch(sequences, device=device))
    report = hf_patch.patch(model, attention=True, lora=False, moe=False)
    try:
        if not report.patched("attention"):
            raise ValueError(f"padfree could not patch this model:\n{report}")
        packed = run_batch(model, packed_batch(sequences, device))
        padded_through_padfree = run_batch(model, padded_batch(sequences, device=device)) if padded_padfree else None
    finally:
        hf_patch.unpatch(model)
    checks = (compare("packed vs one by one", packed, alone, tol, per_parameter)
              + compare("packed vs padded", packed, padded, tol, per_parameter))
    if padded_through_padfree is not None:
        checks += compare("padded padfree vs eager", padded_through_padfree, padded, tol, per_parameter)
    return checks


# The sweep (`padfree verify --all`): every causal-LM model type of the installed transformers.
PROVEN, REFUSED, NOT_BUILT, WRONG, CRASHED = "served, proven", "refused", "cannot be built or run tiny", \
    "SERVED WRONG", "SERVED, CRASHED"
SWEEP_LENGTHS = (5, 11, 3, 7)  # 11 and 7 > the tiny sliding window (4); 3 < it
MAX_SWEEP_PARAMETERS = 20_000_000
TRITON_SWEEP_TYPES = ("llama", "gemma2", "qwen3", "mistral", "gpt2", "deepseek_v3", "gpt_oss", "exaone4")


@dataclass
class SweepRow:
    model_type: str
    model_class: str
    flash: bool    # the class declares flash-attention support (_supports_flash_attn)
    status: str    # one of PROVEN, REFUSED, NOT_BUILT, WRONG, CRASHED
    detail: str    # one line: the features exercised, the refusal reason, or the error

    @property
    def failed(self) -> bool:
        return self.status in (WRONG, CRASHED)


def causal_lm_types() -> dict[str, str]:
    """model_type -> *ForCausalLM class name, for every causal-LM type of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _exercised(model) -> str:
    """The attention options the tiny model exercises, for the table."""
    config, found = model.config.get_text_config(), []
    if getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        found.append("sliding window")
    if getattr(config, "attn_logit_softcapping", None):
        found.append("softcap")
    if getattr(config, "v_head_dim", None) and getattr(config, "qk_nope_head_dim", None):
        found.append("MLA")
    if any(hasattr(m, "sinks") for m in model.modules()):
        found.append("sinks")
    if getattr(config, "num_key_value_heads", None) not in (None, getattr(config, "num_attention_heads", None)):
        found.append("GQA")
    if any("expert" in name for name, _ in model.named_modules()):
        found.append("MoE")
    return ", ".join(found)


def _refusal_without_a_model(model_class, model_type: str) -> str | None:
    """What `models.refusal` would say from the class and the default config alone."""
    from padfree.hf import models

    if not getattr(model_class, "_supports_flash_attn", False):
        return f"{model_class.__name__} does not declare flash-attention support (_supports_flash_attn)"
    if models.exception(model_type) is not None:  # even where the default config does not build
        return models.exception(model_type)
    try:
        return models.config_refusal(model_class.config_class())
    except Exception:  # noqa: BLE001 - no default config either: nothing to tell
        return None


def sweep_one(model_type: str, class_name: str, backends=("reference",), lengths=SWEEP_LENGTHS,
              tol: float = RTOL[torch.float32]) -> SweepRow:
    """Build `model_type` tiny, ask padfree to serve it, and prove packed == one by one == padded
    on each backend. A type that padfree patches but gets wrong (or crashes on) is a failure."""
    import padfree
    import transformers
    from padfree.hf import models

    model_class = getattr(transformers, class_name)
    flash = bool(getattr(model_class, "_supports_flash_attn", False))
    row = lambda status, detail: SweepRow(model_type, class_name, flash, status, detail)  # noqa: E731
    try:
        torch.manual_seed(0)
        config = models.tiny_config(model_type, model_class.config_class)
        config._attn_implementation = "eager"
        with torch.device("meta"):  # sized before anything is allocated
            parameters = sum(p.numel() for p in model_class(config).parameters())
        if parameters > MAX_SWEEP_PARAMETERS:
            raise ValueError(f"still {parameters / 1e6:.0f}M parameters with every size tiny")
        model = model_class(config).float().eval()
    except Exception as error:  # any failure to build is reported, the sweep goes on
        reason = _refusal_without_a_model(model_class, model_type)
        return row(REFUSED, reason) if reason is not None else row(NOT_BUILT, _one_line(error))
    reason = models.refusal(model)
    if reason is not None:
        return row(REFUSED, reason)
    vocab_size = model.config.get_text_config().vocab_size
    sequences = random_sequences(lengths, vocab_size, torch.Generator().manual_seed(0))
    try:  # the oracle itself: transformers' eager attention on each sequence alone
        run_one_by_one(model, sequences)
    except Exception as error:
        return row(NOT_BUILT, f"transformers' own eager forward fails: {_one_line(error)}")
    for backend in backends:
        try:
            with padfree.use_backend(backend):
                checks = verify_model(model, sequences, tol)
        except Exception as error:
            return row(CRASHED, f"{backend}: {_one_line(error)}")
        failed = [c for c in checks if not c.ok]
        if failed:
            worst = max(failed, key=lambda c: (c.rel != c.rel, c.rel))
            return row(WRONG, f"{backend}: {worst.name} rel err {worst.rel:.2e} > {worst.tol:.0e}")
    return row(PROVEN, f"{'/'.join(backends)}; {_exercised(model) or 'causal MHA'}")


def sweep(model_types: dict[str, str], triton_types=(), progress=print) -> list[SweepRow]:
    """`sweep_one` for every type (reference backend, plus interpreted Triton for `triton_types`)."""
    rows = []
    for index, (model_type, class_name) in enumerate(model_types.items(), 1):
        backends = ("reference", "triton") if model_type in triton_types else ("reference",)
        rows.append(sweep_one(model_type, class_name, backends))
        progress(f"[{index}/{len(model_types)}] {model_type}: {rows[-1].status} ({rows[-1].detail})")
    return rows


def sweep_summary(rows: list[SweepRow]) -> str:
    flash = [r for r in rows if r.flash]
    counts = {status: sum(r.status == status for r in flash) for status in (PROVEN, REFUSED, NOT_BUILT, WRONG,
                                                                            CRASHED)}
    return (f"{len(rows)} causal-LM types, {len(flash)} declare flash-attention support; of those: "
            + ", ".join(f"{count} {status}" for status, count in counts.items()))


def sweep_table(rows: list[SweepRow]) -> str:
    """A markdown table, flash-capable types first."""
    lines = ["| model type | class | flash | result | detail |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (not r.flash, r.model_type)):
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {r.model_type} | {r.model_class} | {'yes' if r.flash else 'no'} | {r.status} | {detail} |")
    return "\n".join(lines)


def format_table(checks: list[Check]) -> str:
    width = max(len("check"), *(len(c.name) for c in checks))
    lines = [f"{'check':<{width}}  {'max abs err':>11}  {'rel err':>9}  {'tol':>7}  result"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.max_abs:>11.3e}  {c.rel:>9.2e}  {c.tol:>7.0e}  "
                     f"{'PASS' if c.ok else 'FAIL'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-type", help="any causal-LM model type of the installed transformers (padfree's "
                                             "presets in padfree.hf.models.ARCHITECTURES, else its default config)")
    source.add_argument("--config", help="a transformers config.json (any causal-LM model_type)")
    source.add_argument("--all", action="store_true",
                        help="the sweep: every causal-LM model type, tiny, on the reference backend; prints "
                             "served and proven / refused and why / cannot be built or run tiny")
    parser.add_argument("--triton", action="store_true",
                        help=f"with --all: also run the Triton kernels (interpreted on CPU) on "
                             f"{', '.join(TRITON_SWEEP_TYPES)}")
    parser.add_argument("--markdown", default=None, help="with --all: write the table to this file")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "reference"),
                        help="padfree backend for the packed runs (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default: float32)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--full-size", action="store_true",
                        help="keep the config's sizes (default: shrink to a tiny model)")
    parser.add_argument("--lengths", nargs="+", default=[str(n) for n in DEFAULT_LENGTHS],
                        help="sequence lengths to pack: numbers, or a file with one length per line (the form "
                             f"padfree bench --lengths takes) (default: {' '.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: 0)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative tolerance (default: 1e-5 float32, 1e-2 float16, 5e-2 bfloat16)")
    parser.add_argument("--per-parameter", action="store_true", help="one row per parameter gradient")


def parse_lengths(values: list[str]) -> list[int]:
    """`--lengths`: numbers (each >= 1), or one file with a length per line (as `padfree bench`)."""
    from padfree.benchmark.distributions import parse_lengths

    return parse_lengths(values, minimum=1)


def build_tiny_model(model_type: str, dtype: torch.dtype = torch.float32, full_size: bool = False,
                     values: dict | None = None):
    """A random-weight eager causal LM of any causal-LM `model_type`: padfree's preset
    (padfree.hf.models.ARCHITECTURES) or the tiny default config, or from config.json `values`
    (shrunk unless `full_size`)."""
    import transformers
    from padfree.hf import models

    if values is None and model_type in models.ARCHITECTURES:
        return models.ARCHITECTURES[model_type].build_model(full_size, dtype=dtype)
    types = causal_lm_types()
    if model_type not in types:
        raise ValueError(f"model type {model_type!r} is not a causal-LM type of transformers "
                         f"{transformers.__version__}; known: {', '.join(types)}")
    if values is None:
        config = models.tiny_config(model_type, getattr(transformers, types[model_type]).config_class)
    else:
        config = transformers.CONFIG_MAPPING[model_type](**(values if full_size else models.shrink(values)))
    config._attn_implementation = "eager"
    return getattr(transformers, types[model_type])(config).to(dtype).eval()


def build_model(args: argparse.Namespace):
    """The eager random-weight model `args` asks for (tiny unless --full-size)."""
    dtype = DTYPES[args.dtype]
    if args.model_type is not None:
        return build_tiny_model(args.model_type, dtype, args.full_size)
    with open(args.config) as f:
        values = json.load(f)
    values.pop("architectures", None)
    return build_tiny_model(values.pop("model_type", None), dtype, args.full_size, values)


def _device(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {args.device}: {why} (torch {torch.__version__}); use --device cpu")
    return device


def run_sweep(args: argparse.Namespace) -> int:
    import os

    # Tiny models gain nothing from intra-op threads; on a busy machine they cost 10-100x.
    torch.set_num_threads(1)
    if args.triton and not torch.cuda.is_available():
        # The kernels run interpreted on CPU tensors; Triton reads this when they are first defined,
        # which is later than here (padfree.kernels is imported on first use).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = sweep(causal_lm_types(), TRITON_SWEEP_TYPES if args.triton else (),
                 progress=lambda line: print(line, flush=True))
    table = sweep_table(rows)
    print(table)
    print(sweep_summary(rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    failed = [r for r in rows if r.failed]
    for r in failed:
        print(f"FAILED {r.model_type}: {r.status}: {r.detail}")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    import padfree

    if args.all:
        return run_sweep(args)
    lengths = parse_lengths(args.lengths)
    device = _device(args)
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    sequences = random_sequences(lengths, model.config.vocab_size, generator)
    tol = args.rtol if args.rtol is not None else RTOL[DTYPES[args.dtype]]
    with padfree.use_backend(args.backend):
        checks = verify_model(model, sequences, tol, device, args.per_parameter)
    print(f"padfree verify: {model.config.model_type} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters())} parameters), {args.dtype}, backend {args.backend}, "
          f"device {device}, lengths {lengths}")
    print(format_table(checks))
    failed = [c for c in checks if not c.ok]
    print(f"{len(failed)} of {len(checks)} checks failed" if failed else f"all {len(checks)} checks passed")
    return 1 if failed else 0
