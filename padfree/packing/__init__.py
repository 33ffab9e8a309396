"""Padding-free batching: collator, bin packing, token-budget distributed sampler, packed loss.

Depends on torch only (transformers is optional and never imported here).

    PaddingFreeCollator      a batch of examples -> one row + cu_seq_lens / position_ids
    pack_lengths, PackResult, Piece
                             bin packing of sequence lengths into fixed-capacity packs
    MultipackBatchSampler    token-budget batches balanced across data-parallel ranks
    packed_cross_entropy, count_loss_tokens, count_loss_sequences
                             loss of a packed row, equal to unpacked training's
"""

from padfree.packing.binpack import PackResult, Piece, pack_lengths
from padfree.packing.collator import PaddingFreeCollator
from padfree.packing.loss import count_loss_sequences, count_loss_tokens, packed_cross_entropy
from padfree.packing.sampler import MultipackBatchSampler

__all__ = [
    "MultipackBatchSampler",
    "PackResult",
    "PaddingFreeCollator",
    "Piece",
    "count_loss_sequences",
    "count_loss_tokens",
    "pack_lengths",
    "packed_cross_entropy",
]
