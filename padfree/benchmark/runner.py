"""The end-to-end run behind `padfree bench`: train a small model under each batching mode.

For every length distribution the runner draws the examples once (random token ids, seeded),
forms the steps once (`batches.greedy_steps`), and then for each mode restores the same initial
weights, builds a fresh AdamW and trains `warmup + steps` steps. Warmup steps are not timed.
Each timed step is forward + backward + optimizer step, with the device synchronised before the
clock stops; batches are built and moved to the device before timing (data loading is not what
is measured).

The modes run one after another on one model instance. Taking turns step by step (each mode on
its own model copy) was tried to even out load changes on a shared CPU, and dropped: it slowed
whichever mode followed another by a factor up to 2 (cold allocator and caches), a worse bias.
Benchmark on a quiet machine.

Memory: peak memory is CUDA's allocator peak (GPU only); `activation_bytes` (any device) is the
largest, over the timed steps, of the bytes the forward saved for backward
(`padfree.benchmark.memory.SavedTensors`: the activations a step holds, weights and inputs
excluded), the part of a step's memory that padding inflates.

Baselines: `padded` and `padded_sorted` run transformers' `sdpa` attention with the padding
mask; `naive_packing` runs `sdpa` causal over the whole concatenation; `padding_free` runs the
same model after `padfree.patch(model, attention=True, lora=<--lora>, moe=<--moe>)`, unpatched
afterwards.
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
    lengths_file: str | None = None
    dataset: str | None = None
    tokenizer: str | None = None
    text_field: str = "text"
    progress: bool = True

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
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={self.steps} warmup={self.warmup}")
        if (self.dataset is None) != (self.tokenizer is None):
            raise ValueError("--dataset and --tokenizer go together (a local JSONL file and a local tokenizer)")
        if self.dataset is not None and self.lengths_file is not None:
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
    speedup_vs_padded: float | None = None
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
    if config.lengths_file is not None:
        return distributions.lengths_from_file(config.lengths_file, config.max_length)
    if config.dataset is not None:
        return distributions.lengths_from_dataset(config.dataset, config.tokenizer, config.text_field,
                                                  config.max_length)
    spec = distributions.DISTRIBUTIONS[distribution]
    expected = spec.median(config.max_length) * math.exp(spec.sigma ** 2 / 2)
    count = int(2 * (config.steps + config.warmup + 1) * config.tokens_per_step / expected) + 16
    return distributions.builtin_lengths(distribution, count, config.seed, config.max_length)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ModeRun:
    """One mode's optimizer, losses and step times on the shared model; patches for padding_free."""

    def __init__(self, model: torch.nn.Module, initial_state: dict[str, torch.Tensor], config: BenchConfig,
                 mode: str, timed_batches: list[batching.Batch]):
        self.model, self.mode, self.device = model, mode, torch.device(config.device)
        self.timed_batches = timed_batches
        model.load_state_dict(initial_state)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.activation_bytes: list[int] = []
        self.parameters = list(model.parameters())
        self.patched = None
        if mode == "padding_free":
            import padfree

            report = padfree.patch(model, attention=True, lora=config.lora, moe=config.moe)
            self.patched = ", ".join(f"{part} {done}/{done + skipped}"
                                     for part, (done, skipped) in report.summary().items())

    def step(self, batch: batching.Batch, timed: bool) -> None:
        _synchronize(self.device)
        start = time.perf_counter()
        existing = [*self.parameters, *(v for v in batch.inputs.values() if torch.is_tensor(v))]
        with memory.SavedTensors(existing) as saved:
            loss = self.model(**batch.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        if timed:
            self.seconds.append(time.perf_counter() - start)
            self.activation_bytes.append(saved.bytes)
        self.losses.append(float(loss.detach().float()))

    def finish(self) -> None:
        if self.mode == "padding_free":
            import padfree

            padfree.unpatch(self.model)

    def result(self, distribution: str, peak_memory: int | None) -> ModeResult:
        useful = sum(batch.useful_tokens for batch in self.timed_batches)
        processed = sum(batch.processed_tokens for batch in self.timed_batches)
        return ModeResult(distribution=distribution, mode=self.mode, steps=len(self.timed_batches),
                          useful_tokens=useful, processed_tokens=processed,
                          useful_tokens_per_s=useful / sum(self.seconds),
                          step_time_s=statistics.mean(self.seconds), peak_memory_bytes=peak_memory,
                          activation_bytes=max(self.activation_bytes),
                          loss=self.losses[-1], mean_loss=statistics.mean(self.losses),
                          fill_ratio=useful / processed, losses=self.losses, patched=self.patched)


def _run_modes(model, initial_state, config, distribution, prepared, on_step) -> list[ModeResult]:
    """One mode after the other on one model instance; CUDA peak memory per mode."""
    results = []
    for mode, (warmup_batches, timed_batches) in prepared.items():
        run = _ModeRun(model, initial_state, config, mode, timed_batches)
        try:
            for batch in warmup_batches:
                run.step(batch, timed=False)
                on_step()
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            for batch in timed_batches:
                try:
                    run.step(batch, timed=True)
                except torch.cuda.OutOfMemoryError as err:
                    raise RuntimeError(
                        f"{mode} on {distribution} ran out of GPU memory on a step of {batch.processed_tokens} "
                        f"token slots ({batch.useful_tokens} useful); lower --tokens-per-step or --max-length, "
                        f"or use a smaller --model-size") from err
                on_step()
            peak = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
        finally:
            run.finish()
        results.append(run.result(distribution, peak))
    return results


def _add_ratios(results: list[ModeResult]) -> None:
    """Fill the *_vs_padded fields against the `padded` result of the same distribution."""
    padded = next(r for r in results if r.mode == "padded")
    for result in results:
        result.speedup_vs_padded = result.useful_tokens_per_s / padded.useful_tokens_per_s
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


def run(config: BenchConfig) -> dict:
    """Run every (distribution, mode) and return the JSON-ready report (see report.py)."""
    config.validate()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    model = build_model(config)
    initial_state = copy.deepcopy(model.state_dict())
    sources = ["lengths-file"] if config.lengths_file else ["dataset"] if config.dataset else config.distributions
    vocab_size = MODEL_SIZES[config.model_size]["vocab_size"]
    results: list[ModeResult] = []
    length_stats = {}
    total_steps = len(sources) * len(config.modes) * (config.steps + config.warmup)
    with _progress(total_steps, config.progress) as bar:
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
            prepared = {mode: (_device_batches(mode, examples, warmup_steps, config),
                               _device_batches(mode, examples, timed_steps, config)) for mode in config.modes}
            # padded_sorted may form a different number of steps from the same examples.
            bar.total += sum(len(w) + len(t) for w, t in prepared.values()) - len(config.modes) * len(
                warmup_steps + timed_steps)
            bar.set_description(distribution)
            per_distribution = _run_modes(model, initial_state, config, distribution, prepared, bar.update)
            _add_ratios(per_distribution)
            results += per_distribution
    return {"device": machine.device_name(device), "versions": machine.versions(), "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "config": asdict(config), "length_stats": length_stats,
            "peak_memory_note": _peak_memory_note(device),
            "activation_note": "bytes of the tensors the forward saves for backward (weights and inputs excluded), "
                               "largest timed step",
            "results": [asdict(r) for r in results]}


def _peak_memory_note(device: torch.device) -> str:
    if device.type != "cuda":
        return "not measured on CPU (no allocator statistics): null"
    return "torch.cuda.max_memory_allocated over each mode's timed steps (weights and optimizer state included)"


