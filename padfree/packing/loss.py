"""Cross-entropy for packed (padding-free) rows that matches unpacked training.

Label convention (the one Hugging Face causal LMs use): ``labels`` are aligned with ``input_ids``
and the shift happens here: the logits at position t are scored against ``labels[t + 1]``, and the
last position of a row has no target. With :class:`~padfree.packing.PaddingFreeCollator` labels,
the first token of every sequence is -100, so the last token of one sequence is never trained to
predict the first token of the next. Given ``cu_seqlens``, those boundary targets (and every
position past ``cu_seqlens[-1]``, i.e. a padding tail) are ignored whatever the labels say.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from padfree import _checks

REDUCTIONS = ("token", "sequence")


def _flatten(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows*T, V) logits and their shifted targets (rows*T,), ignore_index where no target."""
    _checks.expect_tensor("logits", logits)
    _checks.expect_tensor("labels", labels)
    if logits.dim() == 2:
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must have shape (N,) = ({logits.shape[0]},) for logits (N, V), "
                             f"got {tuple(labels.shape)}")
        logits, labels = logits[None], labels[None]
    elif logits.dim() == 3:
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape (rows, T) = {tuple(logits.shape[:2])} for logits "
                             f"(rows, T, V), got {tuple(labels.shape)}")
    else:
        raise ValueError(f"logits must have shape (1, T, V) or (N, V), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer class ids, got {labels.dtype}")
    _checks.expect_same_device(logits=logits, labels=labels)
    targets = F.pad(labels[:, 1:].long(), (0, 1), value=ignore_index)
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def _sequence_of_token(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the sequence holding each position; B (one past the last) for a padding tail."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True)


def _check_packed(cu_seqlens: torch.Tensor, logits: torch.Tensor) -> int:
    if logits.dim() == 3 and logits.shape[0] != 1:
        raise ValueError(f"cu_seqlens describes one packed row, but logits has {logits.shape[0]} rows")
    total = logits.shape[-2]
    _checks.check_cu_seqlens("cu_seqlens", cu_seqlens, total, total, "the row length",
                             values=_checks.value_checks_enabled(None))
    if cu_seqlens.device != logits.device:
        raise ValueError(f"cu_seqlens must be on the logits' device {logits.device}, got {cu_seqlens.device}")
    return cu_seqlens.numel() - 1


def packed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                         reduction: str = "token", cu_seqlens: torch.Tensor | None = None,
                         ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM cross-entropy of a packed row, reduced as unpacked training would.

    Args:
        logits: (1, T, V) (or (rows, T, V) for ``reduction="token"`` without ``cu_seqlens``) or
            (N, V); any float dtype, the loss is computed in float32 (float64 stays float64).
        labels: (1, T) / (rows, T) / (N,) class ids aligned with ``input_ids`` (shifted here, see
            the module docstring); ``ignore_index`` marks tokens that are not trained.
        num_items_in_batch: the divisor for gradient accumulation: for ``"token"``, the number of
            loss tokens in the whole accumulated (and all-reduced) batch, e.g. the sum of
            :func:`count_loss_tokens` over the micro-batches; for ``"sequence"``, the number of
            sequences with at least one loss token (:func:`count_loss_sequences`). ``None``: this
            call's own count. int or 0-d tensor.
        reduction: ``"token"``: sum of token losses / num_items_in_batch, which equals the
            token-weighted mean of unpacked training and stays exact under gradient accumulation.
            ``"sequence"``: mean over sequences of each sequence's mean token loss (every sequence
            weighs the same, however long); needs ``cu_seqlens``; sequences with no loss token
            are left out.
        cu_seqlens: (B+1,) int32 offsets of the sequences in the row (the collator's
            ``cu_seq_lens_q``); optional for ``"token"``.
        ignore_index: label value that is not trained.

    A batch with no loss token gives a loss of 0 (connected to ``logits``, with zero gradient),
    not NaN.

    >>> logits = torch.randn(1, 5, 11)
    >>> labels = torch.tensor([[-100, 3, 4, -100, 7]])
    >>> cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    >>> loss = packed_cross_entropy(logits, labels, cu_seqlens=cu)
    >>> first = F.cross_entropy(logits[0, :2], labels[0, 1:3], reduction="sum")
    >>> second = F.cross_entropy(logits[0, 3:4], labels[0, 4:5], reduction="sum")
    >>> torch.allclose(loss, (first + second) / 3)
    True
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "sequence" and cu_seqlens is None:
        raise ValueError("reduction='sequence' needs cu_seqlens (the sequence offsets of the packed row)")
    flat_logits, targets = _flatten(logits, labels, ignore_index)
    if cu_seqlens is not None:
        num_sequences = _check_packed(cu_seqlens, logits)
        sequence = _sequence_of_token(cu_seqlens, targets.shape[0])
        next_sequence = F.pad(sequence[1:], (0, 1), value=num_sequences)
        targets = targets.masked_fill((sequence != next_sequence) | (sequence == num_sequences), ignore_index)
    compute_dtype = torch.promote_types(flat_logits.dtype, torch.float32)
    token_loss = F.cross_entropy(flat_logits.to(compute_dtype), targets, ignore_index=ignore_index, reduction="none")
    trained = targets != ignore_index
    if reduction == "token":
        total = token_loss.sum()
        divisor = trained.sum() if num_items_in_batch is None else num_items_in_batch
    else:
        tokens_per_sequence = token_loss.new_zeros(num_sequences + 1).index_add_(0, sequence, trained.to(compute_dtype))
        loss_per_sequence = token_loss.new_zeros(num_sequences + 1).index_add_(0, sequence, token_loss)
        has_tokens = tokens_per_sequence[:num_sequences] > 0
        total = (loss_per_sequence[:num_sequences] / tokens_per_sequence[:num_sequences].clamp(min=1)).sum()
        divisor = has_tokens.sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(divisor):
        divisor = divisor.to(device=total.device, dtype=total.dtype)
        return total / divisor.clamp(min=1)
    return total / max(divisor, 1)


def count_loss_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of trained targets after the shift (``labels[..., 1:] != ignore_index``), as a 0-d tensor.

    Sum it over the micro-batches of an accumulation step (and all-reduce it across ranks) to get
    ``num_items_in_batch`` for ``packed_cross_entropy(reduction="token")``; it is what HF ``Trainer``
    counts. For a packed row from the collator it equals the loss tokens of the sequences one by one.
    """
    _checks.expect_tensor("labels", labels)
    if labels.dim() == 0:
        raise ValueError("labels must have shape (rows, T) or (T,), got a 0-d tensor")
    return (labels[..., 1:] != ignore_index).sum()


def count_loss_sequences(labels: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of sequences with at least one trained target, as a 0-d tensor.

    The ``num_items_in_batch`` of ``packed_cross_entropy(reduction="sequence")`` (summed over
    micro-batches / ranks like :func:`count_loss_tokens`).
    """
    _checks.expect_tensor("labels", labels)
    if labels.dim() not in (1, 2) or (labels.dim() == 2 and labels.shape[0] != 1):
        raise ValueError(f"labels must be one packed row (1, T) or (T,), got {tuple(labels.shape)}")
    flat = labels.reshape(-1)
    _checks.check_cu_seqlens("cu_seqlens", cu_seqlens, flat.shape[0], flat.shape[0], "the row length",
                             values=_checks.value_checks_enabled(None))
    num_sequences = cu_seqlens.numel() - 1
    sequence = _sequence_of_token(cu_seqlens.to(flat.device), flat.shape[0])
    next_sequence = F.pad(sequence[1:], (0, 1), value=num_sequences)
    targets = F.pad(flat[1:], (0, 1), value=ignore_index)
    trained = (targets != ignore_index) & (sequence == next_sequence) & (sequence < num_sequences)
    per_sequence = torch.zeros(num_sequences + 1, dtype=torch.int64, device=flat.device)
    per_sequence.index_add_(0, sequence, trained.long())
    return (per_sequence[:num_sequences] > 0).sum()
