"""How padfree's ops follow `torch.autocast`.

The public op casts its floating inputs to the autocast dtype at its boundary, in Python, before
validation; the custom op it then calls runs with autocast off. This is what transformers' flash
integration does (it casts q/k/v to the autocast dtype before calling flash-attn), and it is
chosen over `torch.library.register_autocast` because:

  * `register_autocast(op, device, cast_inputs)` casts every float input of the op to one dtype
    fixed at registration, not to the dtype of the autocast region the op runs in (bf16 and fp16
    autocast would need different ops), and it casts the inputs that must stay fp32 too
    (alibi_slopes, attention sinks, MoE routing weights);
  * a custom op gets no autocast kernel of its own, so without `disabled` below the torch ops
    inside its implementation (the reference backend's matmuls, the kernels' host-side tensor
    ops) would be autocast again, each by its own rule: the reference would compute its fp32
    upcast in bf16, and what an op computes would depend on the caller's autocast state;
  * the casts are ordinary differentiable `.to` calls, so autograd returns the gradient of an
    fp32 parameter in fp32, exactly as for autocast's own casts.

Autocast's eligibility rule applies: only floating tensors other than float64 are cast (an fp64
input then meets the op's dtype check, as it would without autocast). Outside autocast nothing is
cast, and inputs of mixed dtypes are a TypeError.
"""

from __future__ import annotations

import contextlib
import functools

import torch

DEVICE_TYPES = ("cpu", "cuda")
# Asked once here, not per call: torch.compile (Dynamo of torch 2.11) cannot trace
# torch.amp.is_autocast_available and would break the graph at every op.
_AUTOCAST_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(t))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the autocast region active for `device`'s type, or None outside one (and for
    device types autocast does not know, e.g. meta)."""
    if device.type in _AUTOCAST_TYPES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast_inputs(*values):
    """`values` with each eligible tensor (floating, not float64), also inside a list or tuple, cast
    to the dtype of the autocast region active for the first tensor's device (lists come back as
    lists). All unchanged outside autocast or without a tensor: the op's validation then names
    what is wrong."""
    device = next((value.device for value in values if isinstance(value, torch.Tensor)), None)
    dtype = None if device is None else autocast_dtype(device)
    if dtype is None:
        return values

    def one(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
            return value.to(dtype)
        return value

    return tuple([one(item) for item in value] if isinstance(value, (list, tuple)) else one(value)
                 for value in values)


def disabled(fn):
    """Run `fn` with autocast off (on CPU and CUDA): a custom op's implementation or backward
    computes in the dtypes it was given (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in DEVICE_TYPES:
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper
