"""Plain-PyTorch `cu_seqlens_from_position_ids`, with no device->host copy (see csrc/seqlens.cpp)."""

from __future__ import annotations

import torch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed position_ids (..., T) -> (cu_seqlens int32 (numel + 1,), max_seqlen int32 0-d).

    A sequence starts at each row start and wherever position_ids[i] != position_ids[i-1] + 1.
    The first S entries of cu_seqlens are the sequence starts, the rest equal numel (empty
    sequences), because S is only known on the device.
    """
    flat = position_ids.reshape(-1)
    numel = flat.numel()
    index = torch.arange(numel, device=flat.device)
    previous = torch.cat([flat[:1], flat[:-1]])
    starts = (index % position_ids.shape[-1] == 0) | (flat != previous + 1)
    sequence = torch.cumsum(starts.to(torch.int64), 0) - 1
    num_sequences = sequence[-1] + 1
    # Non-start tokens scatter into a spare slot past the end, so no boolean indexing (a sync).
    slot = torch.where(starts, sequence, torch.full_like(sequence, numel + 1))
    offsets = torch.full((numel + 2,), numel, dtype=torch.int64, device=flat.device)
    offsets = offsets.scatter(0, slot, index)[: numel + 1]
    positions = torch.arange(numel + 1, device=flat.device)
    cu_seqlens = torch.where(positions < num_sequences, offsets, torch.full_like(offsets, numel))
    max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
    return cu_seqlens.to(torch.int32), max_seqlen.to(torch.int32)
