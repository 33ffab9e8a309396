"""padfree.patch(model, lora=True) on tiny PEFT LoRA models: same logits, loss, LoRA gradients and
training curve as PEFT's own forward; merge/unmerge, save_pretrained and unpatch still work.

With dropout > 0 the unpatched model's PEFT dropout modules are replaced by `_MaskDropout`, which
applies the mask padfree's op draws (same seed sequence from torch's generator, same stream index
per shared-group member, `padfree.reference.lora.keep_mask`).
"""

import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

import padfree  # noqa: E402
from padfree.hf import lora as hf_lora  # noqa: E402
from padfree.ops import lora as lora_ops  # noqa: E402
from padfree.reference import lora as reference  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)


def _base(arch):
    config = LlamaConfig(**TINY) if arch == "llama" else Qwen3Config(**TINY, head_dim=16)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _peft_model(arch, dropout, **lora_kwargs):
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                        init_lora_weights=False, **lora_kwargs)
    return get_peft_model(_base(arch), config)


def _patch(model, strict=True):
    return padfree.patch(model, attention=False, lora=True, moe=False, strict=strict)


class _MaskDropout(torch.nn.Module):
    """PEFT dropout replaced by padfree's mask: stream 0 of a group draws the seed, others reuse it."""

    def __init__(self, p, stream, shared_seed):
        super().__init__()
        self.p, self.stream, self.shared_seed = p, stream, shared_seed

    def forward(self, x):
        if not self.training:
            return x
        if self.stream == 0:
            self.shared_seed["seed"] = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        rows = x.numel() // x.shape[-1]
        keep = reference.keep_mask(self.shared_seed["seed"], self.stream, rows, x.shape[-1], self.p)
        return x * keep.view(x.shape).to(x.dtype) / (1 - self.p)


def _use_padfree_masks(model, p):
    layers = {name: m for name, m in model.named_modules() if isinstance(m, lora_layer.Linear)}
    seeds = {}
    for name, module in layers.items():
        parent, _, leaf = name.rpartition(".")
        stream, key = 0, name
        for group in hf_lora.SHARED_GROUPS:
            if leaf in group and all(f"{parent}.{g}" in layers for g in group):
                stream, key = group.index(leaf), (parent, group)
        module.lora_dropout["default"] = _MaskDropout(p, stream, seeds.setdefault(key, {}))


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def _step(model, input_ids):
    model.zero_grad()
    torch.manual_seed(99)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), _lora_grads(model)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patched_matches_peft(arch, dropout):
    model = _peft_model(arch, dropout)
    patched = copy.deepcopy(model)
    report = _patch(patched)
    assert len(report.patched("lora")) == 14 and not report.skipped("lora"), str(report)
    assert sum("shared input" in r.detail for r in report.patched("lora")) == 10
    if dropout:
        _use_padfree_masks(model, dropout)
    model.train()
    patched.train()
    input_ids = torch.randint(0, 128, (2, 7))
    logits, loss, grads = _step(model, input_ids)
    p_logits, p_loss, p_grads = _step(patched, input_ids)
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == p_grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_patched_model_on_the_triton_kernels(triton_cpu):
    model = _peft_model("llama", 0.1)
    patched = copy.deepcopy(model)
    _patch(patched)
    _use_padfree_masks(model, 0.1)
    input_ids = torch.randint(0, 128, (2, 5))
    logits, loss, grads = _step(model.train(), input_ids)
    p_logits, p_loss, p_grads = _step(patched.train(), input_ids)
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _train(model, input_ids, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(5)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_gives_the_same_loss_curve():
    model = _peft_model("qwen3", 0.1)
    patched = copy.deepcopy(model)
    _patch(patched)
    _use_padfree_masks(model, 0.1)
    input_ids = torch.randint(0, 128, (2, 9))
    expected = _train(model.train(), input_ids)
    got = _train(patched.train(), input_ids)
    assert expected[-1] < expected[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def _count_fused_calls(monkeypatch):
    calls = []
    original = lora_ops.lora_linear_shared

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_ops, "lora_linear_shared", spy)
    return calls


def test_merge_unmerge_and_unpatch(monkeypatch):
    model = _peft_model("llama", 0.0).eval()
    input_ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    _patch(model)
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)
        # per layer: one q/k/v call, one gate/up call, o_proj and down_proj alone
        assert sorted(calls) == [1, 1, 1, 1, 2, 2, 3, 3]
        calls.clear()
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert calls == []  # merged: PEFT's plain base-layer forward
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert len(calls) == 8
        calls.clear()
        with model.disable_adapter():
            model(input_ids=input_ids)
        assert calls == []
    padfree.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, lora_layer.Linear))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert calls == []


def test_every_layer_fuses_under_bf16_autocast_on_fp32_weights(monkeypatch):
    """fp32 weights + bf16 autocast (Trainer's bf16=True): o_proj and down_proj get bf16 inputs while
    their weights are fp32; they must still take the fused op, and match PEFT under the same autocast."""
    model = _peft_model("llama", 0.0).eval()
    input_ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=input_ids).logits.float()
    _patch(model)
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=input_ids).logits.float()
    assert sorted(calls) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert (got - expected).norm() / expected.norm() < 2e-2


def test_save_pretrained_after_patching(tmp_path):
    model = _peft_model("qwen3", 0.0).eval()
    _patch(model)
    input_ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(_base("qwen3"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_ineligible_layers_are_reported_with_the_reason():
    model = _peft_model("llama", 0.0, use_dora=True)
    with pytest.raises(ValueError, match="variant"):
        _patch(model)
    report = _patch(model, strict=False)
    assert not report.patched("lora")
    assert len(report.skipped("lora")) == 14
    assert all("variant" in r.detail for r in report.skipped("lora")), str(report)

    model = _peft_model("llama", 0.0)
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    report = _patch(model)
    reasons = {r.module.rpartition(".")[2]: r.detail for r in report.skipped("lora")}
    assert "2 active adapters" in reasons["q_proj"]
    # k/v still fused on their own: q_proj left the q/k/v group
    assert any(r.module.endswith("k_proj") and r.detail == "fused LoRA linear" for r in report.patched("lora"))

    model = _peft_model("llama", 0.0)
    model.merge_adapter()
    report = _patch(model, strict=False)
    assert all("merged" in r.detail for r in report.skipped("lora")) and len(report.skipped("lora")) == 14


def test_group_member_called_with_another_input_stops_sharing():
    model = _peft_model("llama", 0.0).eval()
    _patch(model)
    attention = model.base_model.model.model.layers[0].self_attn
    x, other = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    with torch.no_grad():
        q = attention.q_proj(x)
        k = attention.k_proj(other)
        padfree.unpatch(model)
        torch.testing.assert_close(q, attention.q_proj(x))
        torch.testing.assert_close(k, attention.k_proj(other))
