"""HF `Trainer` on CPU: a padfree-patched tiny model fed by `PaddingFreeCollator` logs the same losses
and ends with the same weights as the unpatched model on padded batches, gradient accumulation
included."""

from __future__ import annotations

import pytest
import torch

import padfree
from padfree import verify
from padfree.hf.models import ARCHITECTURES

transformers = pytest.importorskip("transformers")

LENGTHS = [7, 3, 12, 5, 9, 2, 11, 6, 4, 8, 10, 3, 6, 9, 5, 7]


def pad_collator(features):
    return verify.padded_batch([torch.tensor(f["input_ids"]) for f in features])


def train(model, collator, output_dir, dataset):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trainer_packed_equals_padded(tmp_path):
    dataset = [{"input_ids": s.tolist()} for s in verify.random_sequences(LENGTHS, 128)]
    padded_model = ARCHITECTURES["qwen2"].build_model()
    packed_model = ARCHITECTURES["qwen2"].build_model()
    packed_model.load_state_dict(padded_model.state_dict())
    initial = {name: p.detach().clone() for name, p in padded_model.named_parameters()}
    report = padfree.patch(packed_model, attention=True, lora=False, moe=False)
    assert len(report.patched("attention")) == 2

    padded_losses, padded_weights = train(padded_model, pad_collator, tmp_path / "padded", dataset)
    packed_losses, packed_weights = train(packed_model, verify.packing_collator(), tmp_path / "packed", dataset)

    assert len(packed_losses) == 2 and packed_losses[1] != packed_losses[0]
    torch.testing.assert_close(torch.tensor(packed_losses), torch.tensor(padded_losses), rtol=1e-5, atol=0)
    assert max((padded_weights[n] - initial[n]).abs().max().item() for n in initial) > 1e-3  # it trained
    for name, weight in packed_weights.items():
        torch.testing.assert_close(weight, padded_weights[name], rtol=1e-5, atol=1e-6, msg=name)
