"""`cu_seqlens_from_position_ids`: packed `position_ids` -> varlen offsets without a host sync.

Runs `torch.ops.padfree.cu_seqlens_from_position_ids` from `padfree._C` (C++ on CPU, CUDA on GPU)
when it is built, else the plain-PyTorch version in `padfree.reference.seqlens`.
"""

from __future__ import annotations

import torch

from padfree import _backend, _checks, _ext
from padfree.reference import seqlens as reference

OP = "cu_seqlens_from_position_ids"


def _fake(position_ids):
    cu_seqlens = position_ids.new_empty(position_ids.numel() + 1, dtype=torch.int32)
    return cu_seqlens, position_ids.new_empty((), dtype=torch.int32)


_ext.register_fake(OP, _fake)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed position_ids (..., T) int64 -> (cu_seqlens int32 (numel + 1,), max_seqlen int32 0-d).

    A new sequence starts at the first token of every row and wherever position_ids[i] !=
    position_ids[i - 1] + 1. cu_seqlens holds the S sequence starts, then numel repeated (empty
    sequences, skipped by attention): S is only known on the device, and nothing here copies to the
    host. `max_seqlen` stays a device tensor for the same reason; `varlen_attention` accepts any
    upper bound (e.g. T) as its int `max_seqlen`.
    """
    _checks.expect_tensor("position_ids", position_ids)
    _checks.expect_dtype("position_ids", position_ids, (torch.int64,))
    if position_ids.dim() < 1 or position_ids.numel() == 0:
        raise ValueError(f"position_ids must be a non-empty tensor (..., seq_len), got {tuple(position_ids.shape)}")
    if position_ids.numel() >= 2**31 - 1:
        raise ValueError(f"position_ids has {position_ids.numel()} tokens; cu_seqlens is int32")
    has_native = _ext.has_kernel(OP, position_ids.device)
    backend = _backend.resolve(OP, position_ids.device, has_native_kernel=has_native,
                               triton_unsupported=lambda: "no Triton kernel for this op")
    if backend == "cuda":
        return torch.ops.padfree.cu_seqlens_from_position_ids(position_ids)
    return reference.cu_seqlens_from_position_ids(position_ids)
