"""`padfree.patch(model, attention=True)`: what it reports, that it is per instance and reversible,
and that an architecture padfree cannot serve is reported and left untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import padfree
from padfree import verify
from padfree.hf import models
from padfree.hf.patch import is_patched

LENGTHS = (5, 17, 3, 9)


def attention_only(model):
    return padfree.patch(model, attention=True, lora=False, moe=False)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_report_names_every_attention_module():
    model = models.ARCHITECTURES["gemma2"].build_model()
    report = attention_only(model)
    records = report.patched("attention")
    assert [r.module for r in records] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "sliding window 4" in records[0].detail and "softcap 0.5" in records[0].detail
    assert "sliding window" not in records[1].detail
    assert report.skipped("attention") == []
    assert model.config._attn_implementation == "padfree" and is_patched(model)
    assert "attention: 2 patched, 0 not patched" in str(report)


@pytest.mark.parametrize("start", ["eager", "sdpa"])
def test_unpatch_restores_implementation_and_outputs(start):
    model = models.ARCHITECTURES["qwen2"].build_model(attn_implementation=start)
    sequences = verify.random_sequences(LENGTHS, model.config.vocab_size)
    batch = verify.padded_batch(sequences)
    before = logits(model, batch)
    attention_only(model)
    assert model.config._attn_implementation == "padfree"
    padfree.unpatch(model)
    assert model.config._attn_implementation == start and not is_patched(model)
    assert all(layer.self_attn.config._attn_implementation == start for layer in model.model.layers)
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)


def test_patch_twice_then_unpatch_once_restores():
    model = models.ARCHITECTURES["llama"].build_model()
    first = attention_only(model)
    second = attention_only(model)
    assert [r.module for r in second.records] == [r.module for r in first.records]
    padfree.unpatch(model)
    assert model.config._attn_implementation == "eager"
    padfree.unpatch(model)  # not patched any more: nothing to do
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("order", ["patch then move", "move then patch"])
def test_patch_and_move_in_either_order(order):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.ARCHITECTURES["mistral"].build_model()
    sequences = verify.random_sequences(LENGTHS, model.config.vocab_size)
    alone = torch.cat([logits(model, {"input_ids": s[None]})[0] for s in sequences])
    if order == "patch then move":
        attention_only(model)
        model.to(device)
    else:
        model.to(device)
        attention_only(model)
    packed = logits(model, verify.packed_batch(sequences, device))[0]
    torch.testing.assert_close(packed.cpu(), alone, rtol=1e-5, atol=1e-5)


def test_only_the_patched_instance_changes():
    patched, other = models.ARCHITECTURES["llama"].build_model(), models.ARCHITECTURES["llama"].build_model()
    attention_only(patched)
    assert patched.config._attn_implementation == "padfree"
    assert other.config._attn_implementation == "eager"


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    base = models.ARCHITECTURES["llama"].build_model()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = attention_only(model)
    assert [r.module for r in report.patched("attention")] == [
        "base_model.model.model.layers.0.self_attn", "base_model.model.model.layers.1.self_attn"]
    assert base.config._attn_implementation == "padfree"
    padfree.unpatch(model)
    assert base.config._attn_implementation == "eager"


def test_unsupported_architecture_is_reported_and_untouched():
    import transformers

    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       vocab_size=128, num_local_experts=4, num_experts_per_tok=2)
    config._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(config)
    report = attention_only(model)
    assert report.patched("attention") == []
    (record,) = report.skipped("attention")
    assert "attention sinks" in record.detail
    assert model.config._attn_implementation == "eager"


def test_unknown_architecture_and_non_transformers_module_are_reported():
    model = models.ARCHITECTURES["llama"].build_model()
    model.config.model_type = "my_llama"
    (record,) = attention_only(model).skipped("attention")
    assert "'my_llama' is not in padfree's architecture table" in record.detail
    assert model.config._attn_implementation == "eager"
    (record,) = attention_only(torch.nn.Linear(2, 2)).skipped("attention")
    assert "holds no transformers PreTrainedModel" in record.detail


def test_architecture_without_attention_interface_is_reported(monkeypatch):
    model = models.ARCHITECTURES["llama"].build_model()
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    (record,) = attention_only(model).skipped("attention")
    assert "does not go through transformers' AttentionInterface" in record.detail
    assert model.config._attn_implementation == "eager"


def test_every_table_entry_builds_and_names_its_attention_class():
    for model_type, architecture in models.ARCHITECTURES.items():
        model = architecture.build_model()
        assert model.config.model_type == model_type
        found = {type(m).__name__ for m in model.modules()}
        assert set(architecture.attention_classes) <= found, model_type
        assert models.lookup(model) == (architecture, None)


def test_shrink_keeps_attention_options():
    values = dict(model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=256, vocab_size=256000, intermediate_size=14336,
                  sliding_window=4096, attn_logit_softcapping=50.0,
                  layer_types=["sliding_attention", "full_attention"] * 21)
    small = models.shrink(values)
    assert small["hidden_size"] == 64 and small["num_hidden_layers"] == 2 and small["head_dim"] == 16
    assert small["layer_types"] == ["sliding_attention", "full_attention"]
    assert small["sliding_window"] == 4096 and small["attn_logit_softcapping"] == 50.0


def test_importing_padfree_registers_nothing():
    code = ("import padfree, padfree.hf.attention, padfree.hf.patch\n"
            "from transformers import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "assert 'padfree' not in AttentionInterface._global_mapping\n"
            "assert 'padfree' not in AttentionMaskInterface._global_mapping\n")
    subprocess.run([sys.executable, "-c", code], check=True)
