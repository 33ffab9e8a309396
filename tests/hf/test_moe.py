"""padfree.patch(model, moe=True): patched == eager experts (logits, loss, gradients) on tiny random
models of every MoE architecture padfree serves, and a clear report for the one it does not."""

import pytest
import torch

import padfree

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64)


def _configs():
    t = transformers
    return {
        "mixtral": lambda: t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**COMMON, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                              num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**COMMON, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                              head_dim=8, norm_topk_prob=True),
        "olmoe": lambda: t.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2),
        "granitemoe": lambda: t.GraniteMoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "deepseek_v3": lambda: t.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=24, first_k_dense_replace=1,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            routed_scaling_factor=2.5),
        "gpt_oss": lambda: t.GptOssConfig(**{**COMMON, "num_attention_heads": 4, "num_key_value_heads": 2},
                                          num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                          layer_types=["full_attention", "full_attention"]),
    }


def _build(arch):
    torch.manual_seed(0)
    config = _configs()[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # default init is tiny (std 0.02): widen the experts so differences show
        for name, param in model.named_parameters():
            if "experts" in name or "e_score_correction_bias" in name:
                param.normal_(0.0, 0.2)
    return model


def _step(model, input_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "deepseek_v3"])
def test_patched_experts_match_eager(triton_cpu, monkeypatch, arch):
    from padfree.kernels import moe as moe_kernels

    calls = []
    for fn in ("forward", "backward"):
        original = getattr(moe_kernels, fn)
        monkeypatch.setattr(moe_kernels, fn, lambda *a, _fn=original, _name=fn, **k: calls.append(_name) or _fn(*a, **k))
    model = _build(arch)
    input_ids = torch.randint(0, 64, (2, 9))
    model.set_experts_implementation("eager")
    logits, loss, grads = _step(model, input_ids)
    report = padfree.patch(model, attention=False, lora=False, moe=True)
    assert report.patched("moe") and not report.skipped("moe"), str(report)
    assert any("router: padfree.moe_route" in record.detail for record in report.patched("moe")), str(report)
    assert model.config._experts_implementation == "padfree"
    got_logits, got_loss, got_grads = _step(model, input_ids)
    assert "forward" in calls and "backward" in calls, "the padfree kernels did not run"
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)
    padfree.unpatch(model)
    assert model.config._experts_implementation == "eager"
    assert not any("forward" in vars(module) for module in model.modules())


def test_gpt_oss_is_reported_not_served_and_stays_correct(triton_cpu):
    model = _build("gpt_oss")
    input_ids = torch.randint(0, 64, (1, 7))
    model.set_experts_implementation("eager")
    logits, _, _ = _step(model, input_ids)
    with pytest.raises(ValueError, match="could not patch anything"):
        padfree.patch(model, attention=False, lora=False, moe=True)
    report = padfree.patch(model, attention=False, lora=False, moe=True, strict=False)
    experts = [record for record in report.records if record.module.endswith("experts")]
    assert experts and not any(record.patched for record in experts)
    assert all("transposed or interleaved" in record.detail for record in experts), str(report)
    assert any("router GptOssTopKRouter" in record.detail for record in report.skipped("moe")), str(report)
    got_logits, _, _ = _step(model, input_ids)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
    padfree.unpatch(model)


def test_model_without_experts_is_reported():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    report = padfree.patch(model, attention=False, lora=False, moe=True, strict=False)
    assert report.skipped("moe") and "no experts module" in report.skipped("moe")[0].detail
