"""SavedTensors counts the activations a forward keeps for backward; padfree's ops keep fewer
than the implementations they replace (the memory half of the LoRA and MoE targets, measured on
CPU: the saved tensors depend on shapes, not on the device)."""

import pytest
import torch

import padfree
from padfree.benchmark.memory import SavedTensors


def test_counts_new_saved_storages_once_and_skips_existing_ones():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 8)
    with SavedTensors(existing=[w, x]) as saved:
        h = torch.relu(x @ w)          # mm saves x (existing); relu saves its output h
        (h * h).sum()                  # mul saves h twice: one storage
    assert saved.bytes == h.numel() * 4
    with SavedTensors() as everything:
        torch.relu(x @ w).sum()
    assert everything.bytes == saved.bytes + x.numel() * 4
    with SavedTensors(existing=[w, x]) as views:
        (x[:4, :4] * w[:4].t()).sum()  # views of existing tensors cost nothing
    assert views.bytes == 0


def test_custom_ops_are_counted():
    x = torch.randn(10, 16, requires_grad=True)
    weight, lora_a, lora_b = torch.randn(12, 16), torch.randn(4, 16, requires_grad=True), torch.randn(12, 4)
    with padfree.use_backend("reference"), SavedTensors(existing=[x, weight, lora_a, lora_b]) as saved:
        padfree.lora_linear(x, weight, None, lora_a, lora_b, 2.0)
    # xa (10 x 4) and the dropout seed (an int64 scalar), nothing at (M, K) size
    assert saved.bytes == 10 * 4 * 4 + 8


def _lora_saved(impl, dropout_p, tokens=64, hidden=48, rank=8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(hidden, hidden, bias=False))
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=16, lora_dropout=dropout_p, target_modules=["proj"],
                                              init_lora_weights=False))
    layer = model.base_model.model.proj
    x = torch.randn(tokens, hidden, requires_grad=True)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with padfree.use_backend("reference"), SavedTensors(existing=[x, *model.parameters()]) as saved:
        if impl == "padfree":
            padfree.lora_linear(x, layer.base_layer.weight, None, lora_a, lora_b, 16 / rank, dropout_p)
        else:
            layer(x)
    return saved.bytes


def test_lora_saves_less_than_peft_with_dropout_and_no_more_without():
    pytest.importorskip("peft")
    tokens, hidden, rank = 64, 48, 8
    # PEFT with dropout keeps dropout(x) and its mask (both M x K); padfree keeps xa (M x r) + seed
    assert _lora_saved("padfree", 0.1) == tokens * rank * 4 + 8
    assert _lora_saved("peft", 0.1) >= tokens * hidden * 4 + _lora_saved("padfree", 0.1)
    assert _lora_saved("padfree", 0.0) <= _lora_saved("peft", 0.0) + 8


# ---- the targets' shapes, counted under FakeTensorMode (shapes only, nothing computed) --------

def _register_padfree_experts():
    import transformers

    from padfree.hf.moe import NAME, padfree_experts_forward

    transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS.register(NAME, padfree_experts_forward)


def _fake_moe_saved(implementation, tokens, hidden, inter, experts, top_k, dtype):
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    _register_padfree_experts()
    with FakeTensorMode():
        config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts)
        config._experts_implementation = implementation
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            module = Qwen3MoeExperts(config)
        finally:
            torch.set_default_dtype(default)
        hidden_states = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
        weights, index = torch.rand(tokens, experts).topk(top_k, dim=-1)
        weights = weights.to(dtype)
        with SavedTensors([hidden_states, weights, index, *module.parameters()]) as counter:
            module(hidden_states, index, weights)
    return counter.bytes


def test_fake_tensor_count_equals_the_real_count(triton_cpu):
    """The FakeTensorMode count of padfree's experts (the op's fake impl) is the interpreted run's."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    _register_padfree_experts()
    config = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=8)
    config._experts_implementation = "padfree"
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0.0, 32 ** -0.5)
        module.down_proj.normal_(0.0, 24 ** -0.5)
    hidden_states = torch.randn(70, 32, requires_grad=True)
    weights, index = torch.rand(70, 8).topk(2, dim=-1)
    with SavedTensors([hidden_states, weights, index, *module.parameters()]) as real:
        module(hidden_states, index, weights)
    assert real.bytes > 0
    assert _fake_moe_saved("padfree", 70, 32, 24, 8, 2, torch.float32) == real.bytes


def test_moe_saves_under_half_of_grouped_mm_at_the_target_shape(triton_cpu):
    """Qwen3-30B-A3B layer (128 experts, I=768, H=2048, top-8), 16k tokens, 16-bit (fp16 for the
    interpreter-backed op, bf16 for grouped_mm, which needs it: same bytes per element)."""
    pytest.importorskip("transformers")
    shape = dict(tokens=16384, hidden=2048, inter=768, experts=128, top_k=8)
    padfree_bytes = _fake_moe_saved("padfree", **shape, dtype=torch.float16)
    grouped_bytes = _fake_moe_saved("grouped_mm", **shape, dtype=torch.bfloat16)
    # padfree: gate/up output of the block-padded pairs, (T k + E (64 - 1)) rows x 2I x 2 bytes
    rows = 16384 * 8 + 128 * 63
    assert rows * 2 * 768 * 2 <= padfree_bytes < 1.02 * rows * 2 * 768 * 2
    assert padfree_bytes < 0.5 * grouped_bytes, (padfree_bytes / 2**20, grouped_bytes / 2**20)


def test_lora_with_dropout_saves_a_tenth_of_peft_at_the_target_shape():
    """4096 -> 4096, r=16, 16k tokens, 16-bit, dropout 0.1: PEFT keeps dropout(x) and its mask."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from torch._subclasses.fake_tensor import FakeTensorMode

    tokens, hidden, rank = 16384, 4096, 16
    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(hidden, hidden, bias=False, dtype=torch.float16))
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.1, target_modules=["proj"]))
    layer = model.base_model.model.proj.to(torch.float16)
    saved = {}
    with FakeTensorMode() as mode:
        params = {name: mode.from_tensor(p) for name, p in layer.named_parameters()}
        x = torch.randn(tokens, hidden, dtype=torch.float16, requires_grad=True)
        for impl in ("padfree", "peft"):
            with padfree.use_backend("reference"), SavedTensors([x, *params.values()]) as counter:
                if impl == "padfree":
                    padfree.lora_linear(x, params["base_layer.weight"], None, params["lora_A.default.weight"],
                                        params["lora_B.default.weight"], 2.0, 0.1)
                else:
                    torch.func.functional_call(layer, params, (x,))
            saved[impl] = counter.bytes
    assert saved["padfree"] == tokens * rank * 2 + 8      # xa and the seed
    assert saved["padfree"] < 0.1 * saved["peft"], saved
