"""The end-to-end run behind `padfree bench`: train a small model under each batching mode.

For every length distribution the runner draws the examples once (random token ids, seeded) and
forms the steps once (`batches.greedy_steps`). Every mode gets its own copy of the same initial
weights and its own AdamW, and trains on its own batches of those examples.

Timing runs in rounds: after the untimed warmup steps of every mode, each round times one step
of every mode, the modes in an order rotated by one per round. A change of machine load then
hits every mode of a round alike instead of whichever mode happened to run at the time, and
each round gives one ratio per mode against `padded` (useful tokens/s of the mode's step over
padded's). A mode's `speedup_vs_padded` is the median of its per-round ratios and
`speedup_range` their minimum and maximum; `speedup_flag` says when that range crosses 1.0x or
is wider than the effect (|median - 1|), or when there are too few rounds to have a range.
`padded`, `naive_packing` and `padding_free` time the same examples in the same round;
`padded_sorted` regroups the examples (its step r holds other examples than padded's step r),
so its per-round ratios also carry the differences between its steps.

A timed step is forward + backward + optimizer step, with the device synchronised before the
clock stops; batches are built and moved to the device before timing (data loading is not what
is measured). The machine's load average and CPU clock are recorded before and after the run.

Memory: `activation_bytes` (any device) is the largest, over the timed steps, of the bytes the
forward saved for backward (`padfree.benchmark.memory.SavedTensors`: the activations a step
holds, weights and inputs excluded), the part of a step's memory that padding inflates. On CUDA,
`peak_memory_bytes` is what one mode alone would peak at: the largest allocator peak of a timed
step above what was allocated before it, plus the mode's own weights and optimizer state (the
other modes' copies are resident too, and are not counted).

Baselines: `padded` and `padded_sorted` run transformers' `sdpa` attention with the padding
mask; `naive_packing` runs `sdpa` causal over the whole concatenation; `padding_free` runs its
copy of the model after `padfree.patch(model, attention=True, lora=<--lora>, moe=<--moe>)`,
unpatched afterwards.
"""

from __future__ import annotations

import copy
import datetime
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from padfree.benchmark import batches as batching
from padfree.benchmark import distributions, machine, memory

# Llama-like sizes. tiny: the CPU default, small enough for a 2-core run in minutes, large
# enough that the matmuls (not Python overhead) dominate a step.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
MOE_EXPERTS = 8
MOE_TOP_K = 2
LORA_RANK = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: str = "fp32"
    model_size: str = "tiny"
    moe: bool = False
    lora: bool = False
    distributions: list[str] = field(default_factory=lambda: ["flan", "orcamath"])
    modes: list[str] = field(default_factory=lambda: list(batching.MODES))
    steps: int = 3
    warmup: int = 1
    tokens_per_step: int = 4096
    max_length: int = 1024
    seed: int = 0
    lr: float = 1e-3
    lengths: tuple[int, ...] | None = None  # the user's example lengths (else drawn)
    dataset: str | None = None
    tokenizer: str | None = None
    text_field: str = "text"
    progress: bool = True
    threads: int | None = None

    def validate(self) -> None:
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size must be one of {sorted(MODEL_SIZES)}, got {self.model_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for mode in self.modes:
            if mode not in batching.MODES:
                raise ValueError(f"modes must be among {batching.MODES}, got {mode!r}")
        if "padded" not in self.modes:
            raise ValueError("modes must include 'padded': every ratio is measured against it")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={self.steps} warmup={self.warmup}")
        if (self.dataset is None) != (self.tokenizer is None):
            raise ValueError("--dataset and --tokenizer go together (a local JSONL file and a local tokenizer)")
        if self.dataset is not None and self.lengths is not None:
            raise ValueError("give --lengths or --dataset, not both")
        for name in self.distributions:
            if name not in distributions.DISTRIBUTIONS:
                raise ValueError(f"distributions must be among {sorted(distributions.DISTRIBUTIONS)}, got {name!r}")


@dataclass
class ModeResult:
    distribution: str
    mode: str
    steps: int
    useful_tokens: int
    processed_tokens: int
    useful_tokens_per_s: float
    step_time_s: float
    peak_memory_bytes: int | None
    activation_bytes: int
    loss: float
    mean_loss: float
    fill_ratio: float
    losses: list[float]
    round_tokens_per_s: list[float]
    speedup_vs_padded: float | None = None
    speedup_range: list[float] | None = None
    speedup_rounds: list[float] | None = None
    speedup_flag: str | None = None
    step_time_vs_padded: float | None = None
    memory_vs_padded: float | None = None
    activations_vs_padded: float | None = None
    loss_gap_vs_padded: float | None = None
    patched: str | None = None


def build_model(config: BenchConfig) -> torch.nn.Module:
    """A seeded random-init Llama-like (or Mixtral-like with `moe`) causal LM, LoRA-wrapped if asked."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    size = dict(MODEL_SIZES[config.model_size])
    torch.manual_seed(config.seed)
    common = dict(max_position_embeddings=max(config.max_length, config.tokens_per_step),
                  attn_implementation="sdpa", pad_token_id=batching.PAD_TOKEN_ID)
    if config.moe:
        size["intermediate_size"] = size["intermediate_size"] // MOE_TOP_K
        model = MixtralForCausalLM(MixtralConfig(**size, **common, num_local_experts=MOE_EXPERTS,
                                                 num_experts_per_tok=MOE_TOP_K))
    else:
        model = LlamaForCausalLM(LlamaConfig(**size, **common))
    model.to(device=config.device, dtype=DTYPES[config.dtype])
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                 target_modules="all-linear", lora_dropout=0.0))
    model.train()
    return model


def example_lengths(config: BenchConfig, distribution: str) -> list[int]:
    """Enough lengths for warmup + steps at the token budget (the user's own, or drawn)."""
    if config.lengths is not None:
        return [min(n, config.max_length) for n in config.lengths]
    if config.dataset is not None:
        return distributions.lengths_from_dataset(config.dataset, config.tokenizer, config.text_field,
                                                  config.max_length)
    spec = distributions.DISTRIBUTIONS[distribution]
    expected = spec.median(config.max_length) * math.exp(spec.sigma ** 2 / 2)
    count = int(2 * (config.steps + config.warmup + 1) * config.tokens_per_step / expected) + 16
    return distributions.builtin_lengths(distribution, count, config.seed, config.max_length)


_clock = time.perf_counter  # one name for the step timer, so tests can drive it


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.parameters(), *(value for state in optimizer.state.values() for value in state.values()
                                       if torch.is_tensor(value))]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class _ModeRun:
    """One mode's model copy, optimizer, batches and measurements; patched for padding_free."""

    def __init__(self, model: torch.nn.Module, config: BenchConfig, mode: str,
                 warmup_batches: list[batching.Batch], timed_batches: list[batching.Batch]):
        self.model, self.mode, self.device = model, mode, torch.device(config.device)
        self.warmup_batches, self.timed_batches = warmup_batches, timed_batches
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        self.parameters = list(model.parameters())
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.activation_bytes: list[int] = []
        self.step_peaks: list[int] = []
        self.useful: list[int] = []
        self.processed: list[int] = []
        self.patched = None
        if mode == "padding_free":
            import padfree

            report = padfree.patch(model, attention=True, lora=config.lora, moe=config.moe)
            self.patched = ", ".join(f"{part} {done}/{done + skipped}"
                                     for part, (done, skipped) in report.summary().items())

    def step(self, batch: batching.Batch, timed: bool) -> None:
        cuda = self.device.type == "cuda"
        _synchronize(self.device)
        if cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = _clock()
        existing = [*self.parameters, *(v for v in batch.inputs.values() if torch.is_tensor(v))]
        with memory.SavedTensors(existing) as saved:
            loss = self.model(**batch.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        if timed:
            self.seconds.append(_clock() - start)
            self.activation_bytes.append(saved.bytes)
            self.useful.append(batch.useful_tokens)
            self.processed.append(batch.processed_tokens)
            if cuda:
                self.step_peaks.append(torch.cuda.max_memory_allocated(self.device) - before)
        self.losses.append(float(loss.detach().float()))

    def finish(self) -> None:
        if self.mode == "padding_free":
            import padfree

            padfree.unpatch(self.model)

    def result(self, distribution: str) -> ModeResult:
        peak = max(self.step_peaks) + _state_bytes(self.model, self.optimizer) if self.step_peaks else None
        useful, processed = sum(self.useful), sum(self.processed)
        return ModeResult(distribution=distribution, mode=self.mode, steps=len(self.seconds),
                          useful_tokens=useful, processed_tokens=processed,
                          useful_tokens_per_s=useful / sum(self.seconds),
                          step_time_s=statistics.mean(self.seconds), peak_memory_bytes=peak,
                          activation_bytes=max(self.activation_bytes),
                          loss=self.losses[-1], mean_loss=statistics.mean(self.losses),
                          fill_ratio=useful / processed, losses=self.losses,
                          round_tokens_per_s=[u / s for u, s in zip(self.useful, self.seconds)],
                          patched=self.patched)


def round_orders(modes: list[str], rounds: int) -> list[list[str]]:
    """The order of the modes in each round: rotated by one per round, so each leads in turn."""
    return [modes[r % len(modes):] + modes[:r % len(modes)] for r in range(rounds)]


def _run_rounds(runs: dict[str, _ModeRun], config: BenchConfig, distribution: str, bar) -> None:
    """Every mode's warmup steps, then `config.steps` rounds of one timed step of every mode."""
    for run in runs.values():
        for batch in run.warmup_batches:
            bar.set_description(f"{distribution} {run.mode} (warmup)")
            run.step(batch, timed=False)
            bar.update()
    for round_index, order in enumerate(round_orders(list(runs), config.steps)):
        for mode in order:
            run = runs[mode]
            batch = run.timed_batches[round_index % len(run.timed_batches)]
            bar.set_description(f"{distribution} {mode}")
            try:
                run.step(batch, timed=True)
            except torch.cuda.OutOfMemoryError as err:
                raise RuntimeError(
                    f"{mode} on {distribution} ran out of GPU memory on a step of {batch.processed_tokens} "
                    f"token slots ({batch.useful_tokens} useful); lower --tokens-per-step or --max-length, "
                    f"or use a smaller --model-size") from err
            bar.update()


MIN_ROUNDS = 3


def spread_flag(ratios: list[float]) -> str | None:
    """Why the median of these per-round ratios should not be trusted, or None when it can be."""
    if len(ratios) < MIN_ROUNDS:
        return f"{len(ratios)} round(s): too few for a spread (use --steps {MIN_ROUNDS} or more)"
    median, low, high = statistics.median(ratios), min(ratios), max(ratios)
    if low < 1.0 < high:
        return f"spread {low:.2f}-{high:.2f}x crosses 1.0x"
    if high - low > abs(median - 1.0):
        return f"spread {low:.2f}-{high:.2f}x is wider than the effect ({median:.2f}x)"
    return None


def _add_ratios(results: list[ModeResult]) -> None:
    """Fill the *_vs_padded fields against the `padded` result of the same distribution."""
    padded = next(r for r in results if r.mode == "padded")
    for result in results:
        ratios = [mine / base for mine, base in zip(result.round_tokens_per_s, padded.round_tokens_per_s)]
        result.speedup_rounds = ratios
        result.speedup_vs_padded = statistics.median(ratios)
        result.speedup_range = [min(ratios), max(ratios)]
        result.speedup_flag = None if result is padded else spread_flag(ratios)
        result.step_time_vs_padded = result.step_time_s / padded.step_time_s
        if result.peak_memory_bytes is not None and padded.peak_memory_bytes:
            result.memory_vs_padded = result.peak_memory_bytes / padded.peak_memory_bytes
        result.activations_vs_padded = result.activation_bytes / padded.activation_bytes
        # padded_sorted trains on other examples per step: its losses are not comparable step by step.
        if result.mode != "padded_sorted":
            result.loss_gap_vs_padded = max(abs(a - b) for a, b in zip(result.losses, padded.losses))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True)


def _device_batches(mode: str, examples: list[torch.Tensor], steps: list[list[int]],
                    config: BenchConfig) -> list[batching.Batch]:
    if not steps:
        return []
    built = batching.build_batches(mode, examples, steps, config.tokens_per_step)
    return [batch.to(torch.device(config.device)) for batch in built]


def _sources(config: BenchConfig) -> list[str]:
    if config.lengths:
        return ["lengths"]
    return ["dataset"] if config.dataset else list(config.distributions)


def run(config: BenchConfig) -> dict:
    """Run every (distribution, mode) and return the JSON-ready report (see report.py)."""
    config.validate()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    threads = torch.get_num_threads()
    # On a CPU busier than its cores, torch's threads wait on each other at every op; one thread does not.
    torch.set_num_threads(config.threads or threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig) -> dict:
    device = torch.device(config.device)
    started, start = machine.conditions(), time.perf_counter()
    model = build_model(config)
    sources = _sources(config)
    vocab_size = MODEL_SIZES[config.model_size]["vocab_size"]
    results: list[ModeResult] = []
    length_stats = {}
    with _progress(len(sources) * len(config.modes) * (config.warmup + config.steps), config.progress) as bar:
        for distribution in sources:
            lengths = example_lengths(config, distribution)
            examples = batching.make_examples(lengths, vocab_size, config.seed)
            steps = batching.greedy_steps(lengths, config.tokens_per_step)
            if len(steps) < config.warmup + config.steps:
                raise ValueError(f"{distribution}: only {len(steps)} steps of examples at "
                                 f"--tokens-per-step {config.tokens_per_step}; need warmup + steps = "
                                 f"{config.warmup + config.steps}")
            warmup_steps, timed_steps = steps[:config.warmup], steps[config.warmup:config.warmup + config.steps]
            used = [i for step in warmup_steps + timed_steps for i in step]
            length_stats[distribution] = distributions.summary([lengths[i] for i in used])
            runs = {}
            try:
                for mode in config.modes:
                    # padded_sorted regroups the examples and may form another number of steps: a mode
                    # runs exactly `warmup` untimed steps and `steps` timed ones, cycling its batches.
                    warmup = _device_batches(mode, examples, warmup_steps, config)
                    runs[mode] = _ModeRun(copy.deepcopy(model), config, mode,
                                          [warmup[i % len(warmup)] for i in range(config.warmup)],
                                          _device_batches(mode, examples, timed_steps, config))
                _run_rounds(runs, config, distribution, bar)
            finally:
                for mode_run in runs.values():
                    mode_run.finish()
            per_distribution = [mode_run.result(distribution) for mode_run in runs.values()]
            _add_ratios(per_distribution)
            results += per_distribution
            del runs
    return {"device": machine.device_name(device), "versions": machine.versions(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "config": asdict(config),
            "machine": {"before": started, "after": machine.conditions()},
            "wall_s": round(time.perf_counter() - start, 1), "length_stats": length_stats,
            "peak_memory_note": _peak_memory_note(device),
            "activation_note": "bytes of the tensors the forward saves for backward (weights and inputs excluded), "
                               "largest timed step",
            "results": [asdict(r) for r in results]}


def _peak_memory_note(device: torch.device) -> str:
    if device.type != "cuda":
        return "not measured on CPU (no allocator statistics): null"
    return ("torch.cuda.max_memory_allocated of the largest timed step above what was allocated before it, "
            "plus the mode's weights and optimizer state")
