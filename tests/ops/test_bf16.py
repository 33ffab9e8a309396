"""Every op in bf16, forward and backward, on the Triton kernels (interpreted) against float64.

The interpreter cannot compute in bf16 by itself (triton#11584); tests/bf16_interpreter.py, which
tests/conftest.py installs, makes it compute what a GPU computes (tests/kernels/test_bf16_interpreter.py
proves that). The error rule is the fp16 one (tests/numerics.py): at most 2x (outputs) / 3x
(gradients) the error of plain PyTorch run in bf16, plus bf16's floor. Shapes are small but cross
the 16-wide tiles the attention tests use (interpreter) and the 64-wide tiles of LoRA and MoE.
Each test runs twice: interpreted on CPU, and compiled on a GPU (marked `gpu`, production tiles).
"""

import functools

import pytest
import torch

import padfree
from padfree.kernels import runtime
from padfree.reference import attention as attention_reference
from padfree.reference import lora as lora_reference
from padfree.reference import moe as moe_reference
from tests import bf16_interpreter
from tests.numerics import assert_close
from tests.ops.test_attention import OPTIONS, check_against_reference, kernels, materialise, packed
from tests.ops.test_lora import _check as check_lora
from tests.ops.test_moe import EXPERT_CASES, check_experts

# a fallback to the reference would make these tests pass without running a kernel
pytestmark = pytest.mark.filterwarnings("error::padfree._backend.PadfreeFallbackWarning")


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Where the Triton kernels run: interpreted on CPU tensors, or compiled on the GPU; tensors the
    tests create without a device land there."""
    if request.param == "interpreter":
        request.getfixturevalue("triton_cpu")
        yield torch.device("cpu")
        return
    with padfree.use_backend("triton"), torch.device("cuda"):
        yield torch.device("cuda")


@pytest.fixture
def small_tiles(device):
    """16 x 16 attention tiles in the interpreter, so short sequences cross many tile edges."""
    if device.type == "cuda":
        yield
        return
    with kernels.override_tiles(16, 16):
        yield


LENGTHS_Q = [17, 0, 1, 16]
LENGTHS_K = [17, 3, 1, 16]


@pytest.mark.parametrize("name, heads", [(name, (4, 2)) for name in OPTIONS] + [("causal", (2, 2))],
                         ids=[f"gqa-{name}" for name in OPTIONS] + ["mha-causal"])
def test_attention_bf16_every_option(small_tiles, name, heads):
    """Forward, backward and lse (return_lse) for every option: causal, window, softcap, alibi, dropout."""
    q, k, v, cu_q, cu_k = packed(LENGTHS_Q, LENGTHS_K, heads_q=heads[0], heads_k=heads[1], dim=16,
                                 dtype=torch.bfloat16)
    check_against_reference(q, k, v, cu_q, cu_k, **materialise(OPTIONS[name], heads[0], len(LENGTHS_Q)))


def test_attention_bf16_public_api_returns_lse(device):
    q, k, v, cu_q, cu_k = packed([5, 12], [5, 12], dtype=torch.bfloat16, tail=0)
    out, lse = padfree.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, causal=True, return_lse=True)
    scale = q.shape[-1] ** -0.5
    want, want_lse = attention_reference.attention(q.double(), k.double(), v.double(), cu_q, cu_k, scale, -1, 0)
    base, _ = attention_reference.attention(q, k, v, cu_q, cu_k, scale, -1, 0, upcast=False)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close("out", out, want, base, factor=2)
    assert (lse.double() - want_lse).abs().max().item() < 1e-4


@pytest.fixture
def unfixed_interpreter(triton_cpu, monkeypatch):
    """The interpreter as Triton ships it, and the process's bf16 probe not yet run."""
    monkeypatch.setattr(runtime, "_BF16_DOT_EXACT", None)
    monkeypatch.setattr(padfree._backend, "_warned", set())
    bf16_interpreter.uninstall()
    try:
        yield
    finally:
        bf16_interpreter.install()


@pytest.mark.filterwarnings("default::padfree._backend.PadfreeFallbackWarning")
def test_unfixed_interpreter_falls_back_to_the_reference_with_a_warning(unfixed_interpreter):
    """Without the fix the kernels would compute garbage: each op must say so and use the reference."""
    q, k, v, cu_q, cu_k = packed([5], [5], dtype=torch.bfloat16, tail=0)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    weight, lora_a, lora_b = (torch.randn(*s, dtype=torch.bfloat16) for s in ((8, 16), (4, 16), (8, 4)))
    index = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])
    weights = torch.rand(5, 2)
    gate_up, down = torch.randn(3, 8, 16, dtype=torch.bfloat16), torch.randn(3, 16, 4, dtype=torch.bfloat16)
    calls = {
        "varlen_attention": lambda: padfree.varlen_attention(q, k, v, cu_q, cu_k, 5, 5),
        "lora_linear": lambda: padfree.lora_linear(x, weight, None, lora_a, lora_b, 1.0),
        "moe_experts": lambda: padfree.moe_experts(x, index, weights, gate_up, down),
    }
    for name, call in calls.items():
        with pytest.warns(padfree._backend.PadfreeFallbackWarning, match=r"triton#11584"):
            got = call()
        with padfree.use_backend("reference"):
            assert torch.equal(got, call()), name
    assert runtime._BF16_DOT_EXACT is False


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_bf16(device, monkeypatch, dropout_p, bias):
    if device.type == "cuda":  # the float64 formula's dropout mask, on the inputs' device
        monkeypatch.setattr(lora_reference, "keep_mask", functools.partial(lora_reference.keep_mask, device=device))
    # M = 66, K = 65, N = 67: one past the 64 tiles
    check_lora((6, 11), 65, [67], [8], torch.bfloat16, bias, dropout_p)


def test_lora_bf16_frozen_weight_grads_and_shared_input(device, monkeypatch):
    if device.type == "cuda":
        monkeypatch.setattr(lora_reference, "keep_mask", functools.partial(lora_reference.keep_mask, device=device))
    check_lora((5, 13), 40, [48, 24, 24], [4, 4, 8], torch.bfloat16, True, 0.1, weight_grad=True)


@pytest.mark.parametrize("case", ["top2", "idle_experts", "tile_edge_65"])
def test_moe_experts_bf16(device, case):
    spec = dict(EXPERT_CASES[case])
    check_experts(spec["num_tokens"], spec["num_experts"], spec["top_k"], 32, 48, torch.bfloat16, spec.get("experts"))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_moe_route_bf16(device, scoring):
    logits = torch.randn(37, 8).bfloat16()
    grad = torch.randn(37, 2)
    kernel_logits = logits.clone().requires_grad_()
    weights, index = padfree.moe_route(kernel_logits, 2, scoring=scoring)
    weights.backward(grad)
    oracle_logits = logits.double().requires_grad_()
    oracle_weights, oracle_index = moe_reference.route(oracle_logits, 2, scoring=scoring)
    oracle_weights.backward(grad.double())
    assert torch.equal(index, oracle_index)  # bf16 logits are exact in float32: same ranking
    assert weights.dtype == torch.float32 and kernel_logits.grad.dtype == torch.bfloat16
    assert_close("weights", weights, oracle_weights, None, factor=2)
    base_logits = logits.clone().requires_grad_()
    with padfree.use_backend("reference"):
        base_weights, _ = padfree.moe_route(base_logits, 2, scoring=scoring)
    base_weights.backward(grad)
    assert_close("d router_logits", kernel_logits.grad, oracle_logits.grad, base_logits.grad, factor=3)
