"""Mixture of LoRA experts and per-sequence adapters vs the loop over adapters a PEFT user writes vs
one adapter.

    python -m pytest bench/test_lora_mixture.py --benchmark-json lora_mixture.json    # GPU: bf16, 16k tokens
    python -m pytest bench/test_lora_mixture.py --bench-device cpu --bench-size quick

One frozen projection hidden -> hidden (rank r per adapter) on `tokens` tokens, forward ("fwd") or
forward + backward ("fwd_bwd", gradients for x, the adapters and the routing weights):

  test_lora_mixture       impl "padfree": `lora_mixture_linear`, top-2 routing over E experts;
                          impl "loop": the base linear, then for each expert its LoRA on every token
                          times the token's gate for it (zero when not chosen): one full pass per
                          expert, the way PEFT users write a mixture today;
                          impl "lora": `lora_linear` with one adapter of rank r (the floor).
  test_lora_per_sequence  8 adapters, one per packed sequence: "padfree" `lora_per_sequence_linear`,
                          "loop" (each adapter on every token, masked to its sequences), "lora".

FLOP counts are the useful ones (each token's base GEMM plus its chosen adapters' LoRA), the same
for every impl of a case, so TFLOP/s compares throughput. E = 4 and 8 (E * r <= 256) run the gated
single-LoRA kernels, E = 64 the many-experts kernels over token-expert pairs sorted by expert
(extra_info["path"]: "gated" or "segmented"); extra_info["backend"] says which backend ran. On CPU
every impl is PyTorch; the numbers that matter there
are `saved_bytes` (activations kept for backward). Targets on H100 (bf16, 4096 -> 4096, r=16, 16k
tokens): E=8 top-2 fwd_bwd <= 1.3x "lora" and >= 4x faster than "loop"; per-sequence <= 1.2x "lora".
"""

import pytest
import torch

import padfree
from bench import common
from padfree import _backend
from padfree.ops import lora_mixture as mixture_ops

FULL = dict(hidden=4096, rank=16, tokens=16384, experts=(4, 8, 64), dtype=torch.bfloat16)
QUICK = dict(hidden=64, rank=8, tokens=256, experts=(4, 8, 64), dtype=torch.float32)
TOP_K = 2
ADAPTERS = 8
SEQUENCES = 16
SCALING = 2.0


def _grid(config):
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    size = config.getoption("--bench-size") or ("full" if device == "cuda" else "quick")
    return size, FULL if size == "full" else QUICK


def pytest_generate_tests(metafunc):
    """Only the shapes of the chosen --bench-size (bench/conftest.py's default: full on cuda)."""
    if "grid" not in metafunc.fixturenames:
        return
    size, grid = _grid(metafunc.config)
    if "experts" in metafunc.fixturenames:
        metafunc.parametrize("grid, experts", [pytest.param(grid, e, id=f"{size}-e{e}") for e in grid["experts"]])
    else:
        metafunc.parametrize("grid", [pytest.param(grid, id=size)])


class _Layer:
    """A frozen base weight and E adapters (lora_a (E, r, H), lora_b (E, H, r)) as trainable tensors."""

    def __init__(self, hidden, rank, experts, dtype, device, trainable):
        torch.manual_seed(0)
        self.weight = (torch.randn(hidden, hidden, device=device) / hidden**0.5).to(dtype)
        self.lora_a = (torch.randn(experts, rank, hidden, device=device) / hidden**0.5).to(dtype)
        self.lora_b = (torch.randn(experts, hidden, rank, device=device) / rank**0.5).to(dtype)
        self.lora_a.requires_grad_(trainable)
        self.lora_b.requires_grad_(trainable)

    def loop(self, x, gates):
        """The PEFT-style mixture: base, then every expert on every token times its gate (M, E)."""
        y = torch.nn.functional.linear(x, self.weight)
        for expert in range(self.lora_a.shape[0]):
            lora = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a[expert]), self.lora_b[expert])
            y = y + SCALING * gates[:, expert:expert + 1].to(x.dtype) * lora
        return y

    def single(self, x):
        return padfree.lora_linear(x, self.weight, None, self.lora_a[0], self.lora_b[0], SCALING)


def _flops(tokens, hidden, rank, chosen, mode):
    base = 2 * tokens * hidden * hidden
    lora = chosen * 2 * tokens * rank * 2 * hidden
    # backward: dx for the base; dx, dA and dB for the LoRA part
    return base + lora if mode == "fwd" else 2 * base + 3 * lora


def _resolved_backend(x, lora_a):
    """The backend `lora_mixture_linear` runs for this input."""
    return _backend.resolve(mixture_ops.OP, x.device,
                            triton_unsupported=lambda: mixture_ops._triton_unsupported(x, lora_a))


def _path(lora_a) -> str:
    """Which Triton path the mixture takes: one gated LoRA of rank E * r, or the pair kernels."""
    from padfree.kernels import lora_mixture

    return "segmented" if lora_mixture.segmented(lora_a.shape[0], lora_a.shape[1]) else "gated"


def _time(benchmark, device, forward, leaves, grad, mode, **extra):
    def fwd():
        with torch.no_grad():
            return forward()

    def fwd_bwd():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad)

    common.run(benchmark, fwd if mode == "fwd" else fwd_bwd, device=device, mode=mode,
               forward=forward if mode == "fwd_bwd" else None, existing=leaves, **extra)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["padfree", "loop", "lora"])
def test_lora_mixture(benchmark, bench_device, grid, experts, impl, mode):
    tokens, hidden, rank, dtype = grid["tokens"], grid["hidden"], grid["rank"], grid["dtype"]
    trainable = mode == "fwd_bwd"
    layer = _Layer(hidden, rank, experts, dtype, bench_device, trainable)
    x = torch.randn(tokens, hidden, device=bench_device, dtype=dtype, requires_grad=trainable)
    logits = torch.randn(tokens, experts, device=bench_device)
    top_k_weights, top_k_index = torch.topk(logits.softmax(-1), TOP_K, dim=-1)
    top_k_weights.requires_grad_(trainable)
    grad = torch.randn(tokens, hidden, device=bench_device, dtype=dtype)
    leaves = [x, layer.lora_a, layer.lora_b, top_k_weights]
    if impl == "padfree":
        def forward():
            return mixture_ops.lora_mixture_linear(x, layer.weight, None, layer.lora_a, layer.lora_b,
                                                  SCALING, top_k_index, top_k_weights, check=False)
        backend = _resolved_backend(x, layer.lora_a)
    elif impl == "loop":
        def forward():
            gates = torch.zeros(tokens, experts, device=bench_device).scatter_add(1, top_k_index, top_k_weights)
            return layer.loop(x, gates)
        backend = "torch"
    else:
        def forward():
            return layer.single(x)
        backend = _backend.resolve("lora_linear", x.device)
    _time(benchmark, bench_device, forward, leaves, grad, mode, backend=backend,
          flops=_flops(tokens, hidden, rank, 1 if impl == "lora" else TOP_K, mode),
          shape=(tokens, hidden, hidden), rank=rank, experts=experts, top_k=TOP_K, dtype=dtype, impl=impl,
          tokens=tokens)
    if impl == "padfree" and backend == "triton":
        benchmark.extra_info["path"] = _path(layer.lora_a)


def _packed(tokens, device):
    """cu_seqlens of SEQUENCES random lengths summing to `tokens`, and each sequence's adapter."""
    generator = torch.Generator().manual_seed(0)
    cuts = torch.randperm(tokens - 1, generator=generator)[:SEQUENCES - 1].add(1).sort().values
    cu_seqlens = torch.cat([torch.tensor([0]), cuts, torch.tensor([tokens])]).to(torch.int32)
    adapter_ids = torch.randint(0, ADAPTERS, (SEQUENCES,), generator=generator)
    return cu_seqlens.to(device), adapter_ids.to(device)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["padfree", "loop", "lora"])
def test_lora_per_sequence(benchmark, bench_device, grid, impl, mode):
    tokens, hidden, rank, dtype = grid["tokens"], grid["hidden"], grid["rank"], grid["dtype"]
    trainable = mode == "fwd_bwd"
    layer = _Layer(hidden, rank, ADAPTERS, dtype, bench_device, trainable)
    x = torch.randn(tokens, hidden, device=bench_device, dtype=dtype, requires_grad=trainable)
    cu_seqlens, adapter_ids = _packed(tokens, bench_device)
    grad = torch.randn(tokens, hidden, device=bench_device, dtype=dtype)
    leaves = [x, layer.lora_a, layer.lora_b]
    if impl == "padfree":
        def forward():
            return mixture_ops.lora_per_sequence_linear(x, layer.weight, None, layer.lora_a, layer.lora_b, SCALING,
                                                        adapter_ids, cu_seqlens, check=False)
        backend = _resolved_backend(x, layer.lora_a)
    elif impl == "loop":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        token_adapter = torch.repeat_interleave(adapter_ids, lengths)
        masks = torch.nn.functional.one_hot(token_adapter, ADAPTERS).float()

        def forward():
            return layer.loop(x, masks)
        backend = "torch"
    else:
        def forward():
            return layer.single(x)
        backend = _backend.resolve("lora_linear", x.device)
    _time(benchmark, bench_device, forward, leaves, grad, mode, backend=backend,
          flops=_flops(tokens, hidden, rank, 1, mode), shape=(tokens, hidden, hidden), rank=rank,
          adapters=ADAPTERS, sequences=SEQUENCES, dtype=dtype, impl=impl, tokens=tokens)
