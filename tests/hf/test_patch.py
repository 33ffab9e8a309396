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
from padfree.hf import patch as padfree_patch
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


def tiny(model_type):
    """The sweep's tiny random model of any causal-LM type, eager."""
    import transformers

    config = models.tiny_config(model_type)
    config._attn_implementation = "eager"
    return getattr(transformers, verify.causal_lm_types()[model_type])(config).eval()


def test_a_type_with_no_preset_is_served_by_capability():
    """SmolLM3 (no entry anywhere in padfree) is served because its attention dispatches through
    AttentionInterface, and a packed batch then equals its sequences one by one."""
    model = tiny("smollm3")
    assert "smollm3" not in models.ARCHITECTURES
    checks = verify.verify_model(model, verify.random_sequences(LENGTHS, model.config.vocab_size), tol=1e-5)
    assert all(c.ok for c in checks), verify.format_table(checks)
    report = attention_only(model)
    assert [r.module for r in report.patched("attention")] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_a_renamed_model_type_is_still_served():
    model = models.ARCHITECTURES["llama"].build_model()
    model.config.model_type = "my_llama"
    assert len(attention_only(model).patched("attention")) == 2


@pytest.mark.parametrize("model_type, reason", [
    ("qwen3_next", "layer types 'linear_attention' (config.layer_types) mix tokens outside attention"),
    ("lfm2", "layer types 'conv'"),
    ("bart", "BartForCausalLM.forward takes no position_ids"),
    ("roberta", "numbers positions from padding_idx + 1"),
    ("bloom", "does not declare flash-attention support"),
])
def test_what_cannot_be_exact_is_refused_with_the_reason(model_type, reason):
    model = tiny(model_type)
    assert reason in models.refusal(model)
    with pytest.raises(padfree_patch.NotServedError, match="strict=False") as raised:
        attention_only(model)
    assert reason in str(raised.value)
    assert model.config._attn_implementation == "eager" and not is_patched(model)


def test_sequence_mixers_are_found_by_structure_too(monkeypatch):
    """Without config.layer_types, LFM2's short convolution is found as a module: by its class
    name, and by type (a Conv1d over the sequence) where the name says nothing."""
    model = tiny("lfm2")
    model.config.layer_types = None
    assert "Lfm2ShortConv (model.layers.0.conv) mixes tokens outside attention" in models.refusal(model)
    monkeypatch.setattr(models, "MIXER_CLASS_FRAGMENTS", ())
    assert "a convolution over the sequence (model.layers.0.conv.conv, kernel 3)" in models.refusal(model)


def test_not_strict_reports_and_refuses_packed_batches():
    model = tiny("qwen3_next")
    report = padfree.patch(model, lora=False, moe=False, strict=False)
    (record,) = report.skipped("attention")
    assert "linear_attention" in record.detail and report.patched() == []
    sequences = verify.random_sequences(LENGTHS, model.config.vocab_size)
    with pytest.raises(ValueError, match="a packed batch reached Qwen3NextForCausalLM"):
        logits(model, verify.packed_batch(sequences))
    with pytest.raises(ValueError, match="a packed batch reached"):  # restarting position_ids alone
        logits(model, {"input_ids": torch.cat(sequences)[None], "position_ids": verify.packed_batch(sequences)[
            "position_ids"]})
    padded = logits(model, verify.padded_batch(sequences))  # padded batches pass
    assert padded.shape[:2] == (len(LENGTHS), max(LENGTHS))
    assert len(model._forward_pre_hooks) == 1
    padfree.unpatch(model)
    assert not model._forward_pre_hooks  # the guard goes with unpatch


def test_is_packed_batch():
    assert padfree_patch.is_packed_batch({"cu_seq_lens_q": torch.tensor([0, 3])})
    assert padfree_patch.is_packed_batch({"position_ids": torch.tensor([[0, 1, 0, 1, 2]])})
    assert not padfree_patch.is_packed_batch({"position_ids": torch.tensor([[0, 1, 2], [4, 5, 6]])})
    assert not padfree_patch.is_packed_batch({"input_ids": torch.tensor([[5, 6]])})


def test_architecture_without_attention_interface_is_reported(monkeypatch):
    model = models.ARCHITECTURES["llama"].build_model()
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    (record,) = padfree.patch(model, lora=False, moe=False, strict=False).skipped("attention")
    assert "does not go through transformers' AttentionInterface" in record.detail
    assert model.config._attn_implementation == "eager"
    (record,) = padfree.patch(torch.nn.Linear(2, 2), lora=False, moe=False, strict=False).skipped("attention")
    assert "holds no transformers PreTrainedModel" in record.detail


def test_every_preset_builds_and_is_served():
    for model_type, architecture in models.ARCHITECTURES.items():
        model = architecture.build_model()
        assert model.config.model_type == model_type
        assert models.refusal(model) is None, model_type
        assert len(models.attention_modules(model)) == model.config.num_hidden_layers, model_type


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
