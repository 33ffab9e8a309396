"""HF `Trainer` on CPU: a padfree-patched tiny model fed by `PaddingFreeCollator` logs the same losses
and ends with the same weights as the unpatched model on padded batches, gradient accumulation
included, in fp32 and under bf16 autocast on fp32 weights (`bf16=True`).

Equal losses alone prove nothing (transformers' eager and sdpa also split a packed row at its
`position_ids` resets), so every test also counts the calls of padfree's torch ops with
`PadfreeOpCalls`. The helpers here are shared by the TRL and FSDP tests.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import padfree
from padfree import verify
from padfree.hf.models import ARCHITECTURES

transformers = pytest.importorskip("transformers")

LENGTHS = [7, 3, 12, 5, 9, 2, 11, 6, 4, 8, 10, 3, 6, 9, 5, 7]
VOCAB = 128  # the tiny configs' vocab_size
MICRO_BATCHES = 4  # max_steps=2 x gradient_accumulation_steps=2 in `training_arguments`
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Fused LoRA calls per decoder layer and forward: q/k/v share one call, gate/up one, o and down one each.
LORA_CALLS_PER_LAYER = 4


class PadfreeOpCalls(TorchDispatchMode):
    """Counts the calls of padfree's torch custom ops (`padfree::*`, forward and backward) while active.

    It sits below autograd, so it sees the backward ops the autograd engine runs too, and it counts
    the ops themselves: however a model reaches padfree (patch, `attn_implementation`, a trainer's
    wrapper), a count of 0 means padfree did not run.
    """

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.dtypes: dict[str, set[torch.dtype]] = collections.defaultdict(set)  # op -> its first input's dtypes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "padfree":
            name = func.name().removeprefix("padfree::")
            self.calls[name] += 1
            if args and isinstance(args[0], torch.Tensor):
                self.dtypes[name].add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def attention_calls(layers: int, forwards: int, backwards: int | None = None) -> dict[str, int]:
    """The op calls of `forwards` forward passes (and `backwards` backward passes, default as many)
    through `layers` padfree attention layers."""
    backwards = forwards if backwards is None else backwards
    return {"varlen_attention_fwd": layers * forwards, "varlen_attention_bwd": layers * backwards}


def training_arguments(output_dir, cls=None, **overrides):
    """Two optimizer steps of two micro-batches of 4 examples, plain SGD with a large constant rate so
    the weights move far enough for a wrong gradient to show, no checkpoints, no reporting, CPU."""
    cls = cls or transformers.TrainingArguments
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                  disable_tqdm=True)
    values.update(overrides)
    return cls(**values)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(trainer) -> tuple[list[float], dict[str, torch.Tensor], PadfreeOpCalls]:
    """Run `trainer` on padfree's reference backend; (logged losses, final weights, padfree op calls)."""
    counter = PadfreeOpCalls()
    with padfree.use_backend("reference"), counter:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, weights(trainer.model), counter


def assert_same_training(losses, trained, reference_losses, reference_trained, initial, *, rtol, update_rtol,
                         weight_rtol=1e-6):
    """Same logged losses (relative `rtol`) and the same weight updates: per parameter,
    ||update - reference update|| <= update_rtol ||reference update|| + weight_rtol ||reference weight||.
    The second term is the float32 rounding of the weights themselves (each SGD step rounds the
    weight, ~6e-8 relative, which is large next to a small update). Parameters the reference did
    not change (frozen) must not change either."""
    assert len(losses) == len(reference_losses) >= 2 and losses[0] != losses[1]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=rtol, atol=0)
    assert trained.keys() == reference_trained.keys() == initial.keys()
    moved = 0
    for name, start in initial.items():
        update, reference_update = trained[name] - start, reference_trained[name] - start
        scale = reference_update.norm().item()
        if scale == 0:
            assert update.norm().item() == 0, f"{name} is frozen in the reference run but changed"
            continue
        moved += 1
        error = (update - reference_update).norm().item()
        bound = update_rtol * scale + weight_rtol * reference_trained[name].norm().item()
        assert error <= bound, f"{name}: update differs by {error:.2e} > {bound:.2e} (update norm {scale:.2e})"
    assert moved > 0, "nothing trained"


def twin_models(model_type: str, **build):
    """(padded baseline on sdpa, a copy with the same weights on eager, to be patched), and the weights."""
    architecture = ARCHITECTURES[model_type]
    padded = architecture.build_model(attn_implementation="sdpa", **build)
    packed = architecture.build_model(**build)
    packed.load_state_dict(padded.state_dict())
    return padded, packed, weights(padded)


def dataset():
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": s.tolist()} for s in verify.random_sequences(LENGTHS, VOCAB, generator)]


def pad_collator(features):
    return verify.padded_batch([torch.tensor(f["input_ids"]) for f in features])


def run_trainer(model, collator, output_dir, **overrides):
    args = training_arguments(output_dir, **overrides)
    return train(transformers.Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collator))


def test_trainer_packed_equals_padded(tmp_path):
    padded_model, packed_model, initial = twin_models("qwen2")
    report = padfree.patch(packed_model, attention=True, lora=False, moe=False)
    assert len(report.patched("attention")) == 2

    padded = run_trainer(padded_model, pad_collator, tmp_path / "padded")
    packed = run_trainer(packed_model, verify.packing_collator(), tmp_path / "packed")

    assert padded[2].calls == {}
    assert packed[2].calls == attention_calls(packed_model.config.num_hidden_layers, MICRO_BATCHES)
    assert_same_training(*packed[:2], *padded[:2], initial, rtol=1e-5, update_rtol=1e-5)


def test_trainer_bf16_autocast_on_fp32_weights(tmp_path):
    """`bf16=True` with fp32 weights: the forward runs under CPU bf16 autocast, where rotary and the
    q/k norms hand attention fp32 queries/keys next to bf16 values. The baseline is the padded
    batch on sdpa under the same autocast.

    Tolerances: both runs round to bf16 in different places; measured, the losses differ by ~1e-4
    relative and the weight updates by ~1e-2 (the padded bf16 run differs from the padded fp32 one
    by as much). Packing done wrong (one row, no boundaries) differs by 7e-3 and 0.8.
    """
    padded_model, packed_model, initial = twin_models("qwen3")
    assert {p.dtype for p in packed_model.parameters()} == {torch.float32}
    padfree.patch(packed_model, attention=True, lora=False, moe=False)

    padded = run_trainer(padded_model, pad_collator, tmp_path / "padded", bf16=True)
    packed = run_trainer(packed_model, verify.packing_collator(), tmp_path / "packed", bf16=True)

    assert packed[2].calls == attention_calls(packed_model.config.num_hidden_layers, MICRO_BATCHES)
    assert packed[2].dtypes["varlen_attention_fwd"] == {torch.bfloat16}  # attention ran in the autocast dtype
    assert_same_training(*packed[:2], *padded[:2], initial, rtol=2e-3, update_rtol=5e-2)
