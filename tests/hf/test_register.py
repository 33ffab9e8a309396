"""`padfree.register()`: "padfree" becomes a valid attn_implementation at every entry point
transformers has (from_config / from_pretrained, set_attn_implementation, TRL's model_init_kwargs),
idempotently and with no other side effect."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import padfree
from padfree import verify
from padfree.hf import models

LENGTHS = (5, 11, 3)


def test_register_is_idempotent_and_only_adds_the_name():
    code = """
import padfree
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
registries = (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping,
              ALL_EXPERTS_FUNCTIONS._global_mapping)
before = [dict(r) for r in registries]
padfree.register()
after = [dict(r) for r in registries]
padfree.register()
assert [dict(r) for r in registries] == after
assert set(after[0]) - set(before[0]) == {"padfree"} and set(after[1]) - set(before[1]) == {"padfree"}
assert all(after[i][k] is before[i][k] for i in range(3) for k in before[i])
assert after[2] == before[2]
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_config_refuses_padfree_until_registered():
    code = """
import transformers, padfree
config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=64)
try:
    transformers.AutoModelForCausalLM.from_config(config, attn_implementation="padfree")
except ValueError as error:
    assert "padfree" in str(error)
else:
    raise AssertionError("transformers accepted an unregistered attn_implementation")
padfree.register()
model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="padfree")
assert model.config._attn_implementation == "padfree"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def _calls(monkeypatch) -> list:
    """Count calls of the registered "padfree" function (restored after the test)."""
    from transformers import AttentionInterface

    calls = []
    original = AttentionInterface._global_mapping["padfree"]

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "padfree", counting)
    return calls


def _packed_equals_one_by_one(model, eager):
    sequences = verify.random_sequences(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        alone = torch.cat([eager(input_ids=s[None]).logits[0] for s in sequences])
        batch = verify.packed_batch(sequences)
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", ["from_pretrained", "set_attn_implementation", "trl model_init_kwargs"])
def test_entry_points_run_padfree(entry, tmp_path, monkeypatch):
    eager = models.ARCHITECTURES["llama"].build_model()
    eager.save_pretrained(tmp_path)
    padfree.register()
    calls = _calls(monkeypatch)
    if entry == "from_pretrained":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="padfree")
    elif entry == "set_attn_implementation":
        model = models.ARCHITECTURES["llama"].build_model()
        model.load_state_dict(eager.state_dict())
        model.set_attn_implementation("padfree")
    else:
        trl_utils = pytest.importorskip("trl.trainer.utils")
        # What SFTTrainer(model=<path>, args=SFTConfig(model_init_kwargs={...})) calls.
        model = trl_utils.create_model_from_path(str(tmp_path), attn_implementation="padfree")
    model.eval()
    assert model.config._attn_implementation == "padfree"
    _packed_equals_one_by_one(model, eager)
    assert len(calls) == model.config.num_hidden_layers


def test_a_model_loaded_as_padfree_is_still_refused_when_its_config_says_so():
    """from_pretrained(attn_implementation="padfree") skips `patch`'s checks; the first attention
    call checks what the config tells (here: linear-attention layers)."""
    import transformers

    padfree.register()
    config = models.tiny_config("qwen3_next")
    model = transformers.Qwen3NextForCausalLM._from_config(config, attn_implementation="padfree").eval()
    with pytest.raises(ValueError, match="'linear_attention'.*mix tokens outside attention"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
