"""A value head dim Dv different from the query/key head dim D (MLA: DeepSeek-V2/V3, MiniCPM3).

The reference computes Dv != D as is; the Triton kernels take one head dim and get the smaller
side zero-padded by `varlen_attention`. Forward and backward against float64 (the oracle and
helpers of test_attention_sinks), spies on what each backend received, the fake (meta) shape,
and the validation.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import padfree
from padfree.kernels import attention as kernels
from padfree.reference import attention as reference
from tests.ops.test_attention_sinks import check_against_float64, packed

DIMS = [pytest.param(32, 16, id="D32-Dv16"), pytest.param(16, 24, id="D16-Dv24"), pytest.param(24, 8, id="D24-Dv8")]


def _record_head_dims(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def spied(q, k, v, *args, **kwargs):
        calls.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, name, spied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dim, value_dim", DIMS)
def test_value_dim_against_float64(backend, dim, value_dim, dtype, monkeypatch):
    calls = []
    module, name = (kernels, "forward") if backend == "triton" else (reference, "attention")
    _record_head_dims(monkeypatch, module, name, calls)
    q, k, v, cu_q, cu_k = packed(dim=dim, value_dim=value_dim, dtype=dtype)
    out, _ = check_against_float64(q, k, v, cu_q, cu_k, scale=dim ** -0.5, window=(-1, 0))
    assert out.shape == (q.shape[0], q.shape[1], value_dim)
    width = max(dim, value_dim)
    # the kernels got one padded head dim; the reference got the true ones
    assert calls[0] == ((width,) * 3 if backend == "triton" else (dim, dim, value_dim))


def test_value_dim_with_sinks(backend):
    q, k, v, cu_q, cu_k = packed(dim=24, value_dim=8)
    check_against_float64(q, k, v, cu_q, cu_k, s_aux=torch.randn(4), scale=24 ** -0.5, window=(5, 0))


def test_default_scale_is_from_the_query_head_dim():
    q, k, v, cu_q, cu_k = packed(dim=16, value_dim=32)
    with padfree.use_backend("reference"):
        default = padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, causal=True)
        explicit = padfree.varlen_attention(q, k, v, cu_q, cu_k, 17, 17, causal=True, softmax_scale=16 ** -0.5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("dim, value_dim", DIMS)
def test_fake_tensor_shape(backend, dim, value_dim):
    """What torch.compile sees: out (total_q, Hq, Dv), without running anything."""
    q, k, v, cu_q, cu_k = packed(dim=dim, value_dim=value_dim)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (q, k, v, cu_q, cu_k)]
        out = padfree.varlen_attention(*fake, 17, 17, causal=True, check=False)
    assert tuple(out.shape) == (q.shape[0], q.shape[1], value_dim)


@pytest.mark.parametrize("value_shape, match", [
    (lambda k: (k.shape[0], k.shape[1], 300), r"v's head_dim must be in 1\.\.256"),
    (lambda k: (k.shape[0] - 1, k.shape[1], 16), "same tokens and heads"),
    (lambda k: (k.shape[0], 1, 16), "same tokens and heads"),
], ids=["too_wide", "tokens", "heads"])
def test_bad_value_shapes(value_shape, match):
    q, k, _, cu_q, cu_k = packed()
    with pytest.raises(ValueError, match=match):
        padfree.varlen_attention(q, k, torch.randn(value_shape(k)), cu_q, cu_k, 17, 17)
