"""MoE experts layer: padfree vs transformers' `eager`, `batched_mm` and `grouped_mm` experts.

    python -m pytest bench/test_moe.py --benchmark-json moe.json             # GPU, full sizes
    python -m pytest bench/test_moe.py --bench-device cpu --bench-size quick  # tiny shapes, CPU

Every implementation runs through transformers' own `ExpertsInterface` dispatch on one
`Qwen3MoeExperts` module (weights (E, 2I, H) / (E, H, I)), switched by its config's
`_experts_implementation`, so the baselines are exactly what a transformers model runs. Routing
is random top-k (uniform over experts). FLOPs: 6·T·k·H·I forward, 3x that forward+backward.
Memory: peak (CUDA) and `saved_bytes`, the activations the forward keeps for backward.
Target (H100, bf16): Qwen3-30B-A3B layer at 16k tokens, forward+backward >= 1.5x grouped_mm
with lower peak memory.
"""

from __future__ import annotations

import pytest
import torch

from bench import common
from bench.conftest import chosen_size

transformers = pytest.importorskip("transformers")

# name -> (experts E, intermediate I, hidden H, top_k)
FULL_SHAPES = {"mixtral_8x14336x4096_top2": (8, 14336, 4096, 2),
               "qwen3_30b_a3b_128x768x2048_top8": (128, 768, 2048, 8),
               "olmoe_64x1024x2048_top8": (64, 1024, 2048, 8)}
FULL_TOKENS = (1024, 4096, 16384, 65536)
QUICK_SHAPES = {"tiny_8x64x32_top2": (8, 64, 32, 2)}
QUICK_TOKENS = (64, 256)
IMPLEMENTATIONS = ("padfree", "grouped_mm", "batched_mm", "eager")
# batched_mm gathers one (2I, H) weight copy per (token, choice): skip it past this many bytes
BATCHED_MM_LIMIT_BYTES = 16 * 2**30


def _experts_module(num_experts, inter, hidden, implementation, dtype, device):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from padfree.hf.moe import NAME, padfree_experts_forward

    transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS.register(NAME, padfree_experts_forward)
    config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts)
    config._experts_implementation = implementation
    module = Qwen3MoeExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.gate_up_proj.normal_(0.0, hidden ** -0.5)
        module.down_proj.normal_(0.0, inter ** -0.5)
    return module


def pytest_generate_tests(metafunc):
    """Cases follow --bench-size."""
    if "moe_case" not in metafunc.fixturenames:
        return
    size = chosen_size(metafunc.config)
    shapes, tokens = (FULL_SHAPES, FULL_TOKENS) if size == "full" else (QUICK_SHAPES, QUICK_TOKENS)
    cases = [(name, shape, count) for name, shape in shapes.items() for count in tokens]
    metafunc.parametrize("moe_case", cases, ids=[f"{name}-T{count}" for name, _, count in cases])


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_moe_experts(benchmark, bench_device, moe_case, implementation, mode):
    name, (num_experts, inter, hidden, top_k), num_tokens = moe_case
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    if implementation == "batched_mm" and num_tokens * top_k * 2 * inter * hidden * 2 > BATCHED_MM_LIMIT_BYTES:
        pytest.skip("batched_mm would gather more than 16 GiB of expert weights")
    module = _experts_module(num_experts, inter, hidden, implementation, dtype, bench_device)
    hidden_states = torch.randn(num_tokens, hidden, dtype=dtype, device=bench_device)
    scores = torch.rand(num_tokens, num_experts, device=bench_device)
    top_k_weights, top_k_index = scores.topk(top_k, dim=-1)
    top_k_weights = (top_k_weights / top_k_weights.sum(-1, keepdim=True)).to(dtype)
    backward = mode == "forward_backward"
    if backward:
        hidden_states.requires_grad_()
    grad = torch.randn_like(hidden_states)

    def step():
        out = module(hidden_states, top_k_index, top_k_weights)
        if backward:
            out.backward(grad)
        return out

    flops = 6.0 * num_tokens * top_k * hidden * inter * (3 if backward else 1)
    common.run(benchmark, step, device=bench_device, flops=flops, shape=name, tokens=num_tokens, dtype=dtype,
               backend=implementation, mode=mode,
               forward=(lambda: module(hidden_states, top_k_index, top_k_weights)) if backward else None,
               existing=[hidden_states, top_k_index, top_k_weights, *module.parameters()])
