"""Fused LoRA linear vs PEFT's LoRA Linear vs the frozen base linear alone.

    python -m pytest bench/test_lora.py --benchmark-json lora.json          # GPU: bf16, 16k tokens
    python -m pytest bench/test_lora.py --bench-device cpu --bench-size quick

Each case times the forward ("fwd") or forward + backward ("fwd_bwd") of one projection
hidden -> hidden on `tokens` tokens; extra_info holds tokens/s, TFLOP/s, peak memory and (fwd_bwd)
the bytes saved for backward. The base
weight is frozen in every variant, so "base" is the floor the LoRA variants are measured against
(target on H100, bf16, 4096 -> 4096, r=16, 16k tokens: padfree fwd_bwd <= 1.15x base and >= 1.3x
faster than PEFT).
"""

import pytest
import torch

import padfree
from bench import common
from bench.conftest import chosen_size

FULL = dict(hidden=(2048, 4096, 8192), rank=(8, 16, 64), tokens=16384, dtype=torch.bfloat16)
QUICK = dict(hidden=(64,), rank=(8,), tokens=256, dtype=torch.float32)
ALPHA = 16.0


def pytest_generate_tests(metafunc):
    """Only the shapes of the chosen --bench-size."""
    if "hidden" not in metafunc.fixturenames:
        return
    size = chosen_size(metafunc.config)
    grid = FULL if size == "full" else QUICK
    cases = [pytest.param(grid, hidden, rank, id=f"{size}-h{hidden}-r{rank}")
             for hidden in grid["hidden"] for rank in grid["rank"]]
    metafunc.parametrize("grid, hidden, rank", cases)


class _Layers:
    """One frozen base linear with a LoRA adapter, as raw tensors and as a PEFT LoRA Linear."""

    def __init__(self, hidden, rank, dtype, device):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        holder = torch.nn.Sequential()
        holder.add_module("proj", torch.nn.Linear(hidden, hidden, bias=False))
        model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["proj"],
                                                  init_lora_weights=False))
        self.peft = model.base_model.model.proj.to(device=device, dtype=dtype)
        self.weight = self.peft.base_layer.weight
        self.lora_a = self.peft.lora_A["default"].weight
        self.lora_b = self.peft.lora_B["default"].weight
        self.scaling = ALPHA / rank

    def forward(self, impl):
        if impl == "padfree":
            return lambda x: padfree.lora_linear(x, self.weight, None, self.lora_a, self.lora_b, self.scaling)
        if impl == "peft":
            return self.peft
        return lambda x: torch.nn.functional.linear(x, self.weight)


def _flops(tokens, hidden, rank, impl, mode):
    base = 2 * tokens * hidden * hidden
    lora = 0 if impl == "base" else 2 * tokens * rank * 2 * hidden
    # backward: dx for the base; dx, dA and dB for the LoRA part
    return base + lora if mode == "fwd" else 2 * base + 3 * lora


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["padfree", "peft", "base"])
def test_lora_linear(benchmark, bench_device, grid, hidden, rank, impl, mode):
    pytest.importorskip("peft")
    tokens, dtype = grid["tokens"], grid["dtype"]
    layers = _Layers(hidden, rank, dtype, bench_device)
    forward = layers.forward(impl)
    x = torch.randn(tokens, hidden, device=bench_device, dtype=dtype, requires_grad=mode == "fwd_bwd")
    grad = torch.randn(tokens, hidden, device=bench_device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return forward(x)

    def fwd_bwd():
        x.grad = None
        layers.lora_a.grad = layers.lora_b.grad = None
        forward(x).backward(grad)

    common.run(benchmark, fwd if mode == "fwd" else fwd_bwd, device=bench_device,
               flops=_flops(tokens, hidden, rank, impl, mode), shape=(tokens, hidden, hidden), rank=rank,
               dtype=dtype, backend=impl, mode=mode, forward=(lambda: forward(x)) if mode == "fwd_bwd" else None,
               existing=[x, layers.weight, layers.lora_a, layers.lora_b], tokens=tokens)
