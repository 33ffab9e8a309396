"""TRL `SFTTrainer` on CPU with tiny random models: padding-free training on a padfree-patched model
logs the same losses and ends with the same weights as padded training (sdpa, attention mask) on
the same data, seed and steps, within float32 tolerance; padfree's ops are counted to prove they ran.

Covered: `padding_free=True` (TRL's own collator, which emits `cu_seq_lens_*`), `packing=True` with
the "bfd" strategy, a PEFT LoRA model (padfree's fused LoRA linear) and a Mixture-of-Experts model
(padfree's router and grouped experts). TRL's defaults are kept (gradient checkpointing on, so each
micro-batch runs its forward twice) except `bf16`, which is off: these runs are float32.
"""

from __future__ import annotations

import pytest
import torch

import padfree
from padfree import verify
from tests.hf.test_trainer import (LORA_CALLS_PER_LAYER, LORA_TARGETS, MICRO_BATCHES, VOCAB, assert_same_training,
                                   attention_calls, dataset, train, training_arguments, twin_models, weights)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # two trainer runs per test: tens of seconds on 2 cores

FORWARDS = 2 * MICRO_BATCHES  # gradient checkpointing recomputes each forward during the backward


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, built here (nothing is downloaded).
    SFTTrainer needs one for its pad and eos tokens; the datasets are already tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t3")),
                                   pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


def sft_trainer(model, output_dir, train_dataset, data_collator=None, **config):
    args = training_arguments(output_dir, trl.SFTConfig, bf16=False, **config)
    return trl.SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tiny_tokenizer(),
                          data_collator=data_collator)


def sft_dataset():
    return datasets.Dataset.from_list(dataset())


def padding_free_vs_padded(padded_model, packed_model, tmp_path):
    """Train both on the same examples: the patched model with `padding_free=True`, the baseline on
    TRL's padded batches. `max_length=None`: TRL does not truncate in padding-free mode without packing."""
    padded = train(sft_trainer(padded_model, tmp_path / "padded", sft_dataset(), max_length=None))
    packed = train(sft_trainer(packed_model, tmp_path / "packed", sft_dataset(), padding_free=True, max_length=None))
    assert padded[2].calls == {}  # the baseline never reaches padfree, so a count proves padfree ran
    return padded, packed


def test_sft_padding_free_equals_padded(tmp_path):
    padded_model, packed_model, initial = twin_models("qwen3")
    padfree.patch(packed_model)

    padded, packed = padding_free_vs_padded(padded_model, packed_model, tmp_path)

    assert packed[2].calls == attention_calls(packed_model.config.num_hidden_layers, FORWARDS, MICRO_BATCHES)
    assert_same_training(*packed[:2], *padded[:2], initial, rtol=1e-5, update_rtol=1e-5)


def unpack_and_pad(features):
    """The baseline's collator for TRL's packed rows: every packed sequence its own padded row."""
    sequences = [s for f in features for s in torch.tensor(f["input_ids"]).split(f["seq_lengths"])]
    return verify.padded_batch(sequences)


def test_sft_bfd_packing_equals_padded(tmp_path):
    padded_model, packed_model, initial = twin_models("llama")
    padfree.patch(packed_model)
    config = dict(per_device_train_batch_size=2, max_length=16)
    packing = sft_trainer(packed_model, tmp_path / "packed", sft_dataset(), packing=True, packing_strategy="bfd",
                          **config)
    packs = packing.train_dataset
    assert len(packs) < len(dataset()) and max(len(lengths) for lengths in packs["seq_lengths"]) > 1
    # The baseline trains on the very same packs (so the same examples share a micro-batch), unpacked
    # into padded rows.
    padding = sft_trainer(padded_model, tmp_path / "padded", packs, data_collator=unpack_and_pad,
                          dataset_kwargs={"skip_prepare_dataset": True}, **config)

    padded, packed = train(padding), train(packing)

    assert padded[2].calls == {}
    assert packed[2].calls == attention_calls(packed_model.config.num_hidden_layers, FORWARDS, MICRO_BATCHES)
    assert_same_training(*packed[:2], *padded[:2], initial, rtol=1e-5, update_rtol=1e-5)


def test_sft_lora_equals_padded(tmp_path):
    padded_model, packed_model, _ = twin_models("llama")
    # init_lora_weights=False: B starts random, not 0, so the LoRA path changes the loss from step 1.
    config = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(0)
    padded_model = peft.get_peft_model(padded_model, peft.LoraConfig(**config))
    torch.manual_seed(0)
    packed_model = peft.get_peft_model(packed_model, peft.LoraConfig(**config))
    initial = weights(padded_model)
    assert all(torch.equal(initial[name], p) for name, p in packed_model.named_parameters())
    report = padfree.patch(packed_model)
    layers = packed_model.config.num_hidden_layers
    assert len(report.patched("lora")) == len(LORA_TARGETS) * layers and not report.skipped("lora")

    padded, packed = padding_free_vs_padded(padded_model, packed_model, tmp_path)

    assert packed[2].calls == {**attention_calls(layers, FORWARDS, MICRO_BATCHES),
                               "lora_linear_fwd": LORA_CALLS_PER_LAYER * layers * FORWARDS,
                               "lora_linear_bwd": LORA_CALLS_PER_LAYER * layers * MICRO_BATCHES}
    assert_same_training(*packed[:2], *padded[:2], initial, rtol=1e-5, update_rtol=1e-5)
    assert all(not p.requires_grad for name, p in packed_model.named_parameters() if "lora_" not in name)


def test_sft_moe_equals_padded(tmp_path):
    """Mixtral: TRL adds the router's load-balancing loss (config.router_aux_loss_coef) in both runs;
    the padded run averages it over the unpadded tokens, so it is the same sum."""
    padded_model, packed_model, initial = twin_models("mixtral")
    report = padfree.patch(packed_model)
    layers = packed_model.config.num_hidden_layers
    assert len(report.patched("moe")) == 2 * layers  # every layer's router and experts

    padded, packed = padding_free_vs_padded(padded_model, packed_model, tmp_path)

    moe_calls = {f"moe_{op}_{way}": layers * count for op in ("route", "experts")
                 for way, count in (("fwd", FORWARDS), ("bwd", MICRO_BATCHES))}
    assert packed[2].calls == {**attention_calls(layers, FORWARDS, MICRO_BATCHES), **moe_calls}
    assert_same_training(*packed[:2], *padded[:2], initial, rtol=1e-5, update_rtol=1e-5)


def test_sft_attn_implementation_padfree_by_name(tmp_path):
    """`padfree.register()`, then TRL loads the checkpoint itself with
    `model_init_kwargs={"attn_implementation": "padfree"}`: no `patch` call, and padfree runs."""
    padfree.register()
    checkpoint = tmp_path / "checkpoint"
    _, model, initial = twin_models("qwen3")
    model.save_pretrained(checkpoint)

    def by_name(attn_implementation, output_dir, **config):
        trainer = sft_trainer(str(checkpoint), output_dir, sft_dataset(), max_length=None,
                              model_init_kwargs={"attn_implementation": attn_implementation}, **config)
        assert trainer.model.config._attn_implementation == attn_implementation
        return train(trainer)

    padded = by_name("sdpa", tmp_path / "padded")
    packed = by_name("padfree", tmp_path / "packed", padding_free=True)

    assert padded[2].calls == {}
    assert packed[2].calls == attention_calls(model.config.num_hidden_layers, FORWARDS, MICRO_BATCHES)
    assert_same_training(*packed[:2], *padded[:2], initial, rtol=1e-5, update_rtol=1e-5)
