"""Packed (varlen) attention: padfree vs the ways to run the same batch without it.

    python -m pytest bench/test_attention.py                        # CPU: quick shapes, reference backend
    python -m pytest bench/test_attention.py --bench-size full      # GPU: bf16, D=128, causal, 16k tokens

The batch is one set of FLAN-like example lengths (padfree.benchmark.distributions) run causal by:

    padfree_varlen             padfree.varlen_attention on the packed (T, H, D) tokens
    sdpa_padded                SDPA on (B, H, longest, D) right-padded. is_causal=True is exact for the
                               real tokens of right-padded rows (a padding key sits after every real
                               query), so SDPA may pick its fastest kernel; padding is still computed.
    sdpa_block_diagonal_mask   SDPA on the packed tokens with a dense (T, T) block-diagonal causal mask
    flex_document_mask         FlexAttention (torch.compile'd on GPU) with a document causal block mask
    flash_attn_varlen          flash_attn_varlen_func, only when flash-attn is installed

each for `forward` and `forward_backward`. FLOPs follow flash-attn on the real lengths:
4·Σsᵢ²·H·D forward, halved when causal; backward 2.5× forward. Padding is never counted, so a
padded baseline's TFLOP/s is the useful rate. Inputs are built outside the timed function (masks
and block masks included).
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from bench import common
from padfree.benchmark import distributions

SIZES = {
    # (total tokens, max example length, heads, head dim, dtype on cuda, dtype on cpu)
    "quick": (1024, 256, 4, 32, torch.float16, torch.float32),
    "full": (16384, 4096, 16, 128, torch.bfloat16, torch.float32),
}
CAUSAL = True
IMPLEMENTATIONS = ("padfree_varlen", "sdpa_padded", "sdpa_block_diagonal_mask", "flex_document_mask",
                   "flash_attn_varlen")
PASSES = ("forward", "forward_backward")


def flan_lengths(total_tokens: int, max_length: int, seed: int = 0) -> list[int]:
    """FLAN-like lengths adding up to exactly `total_tokens` (the last one trimmed to fit)."""
    # Every drawn length is >= MIN_LENGTH, so this many always reach the total.
    drawn = distributions.builtin_lengths("flan", total_tokens // distributions.MIN_LENGTH + 1, seed, max_length)
    ends = torch.tensor(drawn).cumsum(0)
    count = int(torch.searchsorted(ends, total_tokens)) + 1
    return drawn[:count - 1] + [total_tokens - (int(ends[count - 2]) if count > 1 else 0)]


def attention_flops(lengths: list[int], heads: int, head_dim: int, causal: bool, backward: bool) -> float:
    forward = 4 * sum(s * s for s in lengths) * heads * head_dim / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


@functools.cache
def _problem(size: str, device_type: str):
    total, max_length, heads, head_dim, gpu_dtype, cpu_dtype = SIZES[size]
    device = torch.device(device_type)
    dtype = gpu_dtype if device.type == "cuda" else cpu_dtype
    lengths = flan_lengths(total, max_length)
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(total, heads, head_dim, generator=generator).to(device, dtype) for _ in range(4))
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    return {"lengths": lengths, "q": q, "k": k, "v": v, "dout": dout, "cu_seqlens": cu_seqlens,
            "heads": heads, "head_dim": head_dim, "dtype": dtype, "device": device}


def _padded(packed: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(T, H, D) -> (B, H, longest, D), zero-padded on the right."""
    rows = torch.nn.utils.rnn.pad_sequence(list(packed.split(lengths)), batch_first=True)
    return rows.transpose(1, 2).contiguous()


def _document_ids(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def _padfree_varlen(p):
    import padfree

    longest = max(p["lengths"])
    inputs = [p[name].clone() for name in "qkv"]

    def call(*qkv):
        return padfree.varlen_attention(*qkv, p["cu_seqlens"], p["cu_seqlens"], longest, longest, causal=CAUSAL,
                                        check=False)
    return call, inputs, p["dout"]


def _sdpa_padded(p):
    inputs = [_padded(p[name], p["lengths"]) for name in "qkv"]

    def call(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL)
    return call, inputs, _padded(p["dout"], p["lengths"])


def _sdpa_block_diagonal_mask(p):
    documents = _document_ids(p["lengths"], p["device"])
    mask = documents[:, None] == documents[None, :]
    if CAUSAL:
        mask = mask.tril()
    inputs = [p[name].transpose(0, 1)[None].contiguous() for name in "qkv"]

    def call(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return call, inputs, p["dout"].transpose(0, 1)[None].contiguous()


def _flex_document_mask(p):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    if p["backward"] and p["device"].type == "cpu":
        pytest.skip("FlexAttention has no backward on CPU")
    documents = _document_ids(p["lengths"], p["device"])

    def document_causal(batch, head, query, key):
        same = documents[query] == documents[key]
        return same & (query >= key) if CAUSAL else same

    total = documents.numel()
    block_mask = flex.create_block_mask(document_causal, None, None, total, total, device=p["device"])
    # Eager FlexAttention is a slow reference path; on CUDA it is meant to run compiled.
    attention = torch.compile(flex.flex_attention) if p["device"].type == "cuda" else flex.flex_attention
    inputs = [p[name].transpose(0, 1)[None].contiguous() for name in "qkv"]

    def call(q, k, v):
        return attention(q, k, v, block_mask=block_mask)
    return call, inputs, p["dout"].transpose(0, 1)[None].contiguous()


def _flash_attn_varlen(p):
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    if p["device"].type != "cuda" or p["dtype"] == torch.float32:
        pytest.skip("flash-attn needs CUDA and fp16/bf16")
    from flash_attn import flash_attn_varlen_func

    longest = max(p["lengths"])
    inputs = [p[name].clone() for name in "qkv"]

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, p["cu_seqlens"], p["cu_seqlens"], longest, longest, causal=CAUSAL)
    return call, inputs, p["dout"]


_BUILD = {"padfree_varlen": _padfree_varlen, "sdpa_padded": _sdpa_padded,
          "sdpa_block_diagonal_mask": _sdpa_block_diagonal_mask, "flex_document_mask": _flex_document_mask,
          "flash_attn_varlen": _flash_attn_varlen}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_attention(benchmark, bench_device, bench_size, pass_name, implementation):
    backward = pass_name == "forward_backward"
    p = {**_problem(bench_size, bench_device.type), "backward": backward}
    call, inputs, dout = _BUILD[implementation](p)
    inputs = [tensor.requires_grad_(backward) for tensor in inputs]

    def step():
        out = call(*inputs)
        if backward:
            out.backward(dout)
            for tensor in inputs:
                tensor.grad = None
        return out

    benchmark.group = f"attention {pass_name}"
    common.run(benchmark, step, device=bench_device,
               flops=attention_flops(p["lengths"], p["heads"], p["head_dim"], CAUSAL, backward),
               shape={"tokens": sum(p["lengths"]), "sequences": len(p["lengths"]), "longest": max(p["lengths"]),
                      "heads": p["heads"], "head_dim": p["head_dim"], "causal": CAUSAL, "lengths": p["lengths"]},
               dtype=p["dtype"], backend=implementation, implementation=implementation, pass_name=pass_name,
               forward=(lambda: call(*inputs)) if backward else None, existing=inputs)
