"""`PaddingFreeCollator`: a batch of examples as one padding-free row plus its sequence boundaries."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch

IGNORE_INDEX = -100


def _token_ids(name: str, value) -> torch.Tensor:
    """A 1-D int64 CPU tensor from a list of ints, a 1-D integer tensor or a numpy array."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list or 1-D tensor of ints, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        if hasattr(value, "tolist"):
            value = value.tolist()
        try:
            value = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be a list or 1-D tensor of ints ({error})") from None
        if value.numel() == 0:
            value = value.long()  # torch.tensor([]) is float32; an empty list is just no tokens
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one sequence), got shape {tuple(value.shape)}")
    return value.to(device="cpu", dtype=torch.int64)


class PaddingFreeCollator:
    """Concatenate a batch of examples into one row with no padding (a drop-in ``data_collator``).

    Each example is a mapping with ``input_ids`` (list of ints, 1-D tensor or array) and optionally
    ``labels`` of the same length (e.g. completion-only labels with -100 on the prompt; without
    ``labels`` the input ids are the labels), and with ``adapter_key`` set, that key (an int).
    Other keys (e.g. ``attention_mask``) are ignored.
    The result, for B examples of lengths ``n_1..n_B`` and ``T = sum(n_i)``:

    * ``input_ids`` (1, T) int64: the sequences one after the other;
    * ``labels`` (1, T) int64: each example's labels with -100 at its first token, so that after
      the model's usual one-token shift no token is trained to predict the start of the next
      sequence (HF models shift ``labels`` inside their loss: the label at t is predicted at t-1);
    * ``position_ids`` (1, T) int64: 0..n_i-1 for each sequence;
    * ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (B+1,) int32: sequence offsets 0, n_1, n_1+n_2, ..., T;
    * ``max_length_q`` / ``max_length_k`` python int: the longest ``n_i``;
    * with ``adapter_key``: ``adapter_ids`` (B,) int64, each example's adapter index, in order (what
      a model patched by ``padfree.hf.multi_adapter`` takes, one adapter per packed sequence).

    There is no ``attention_mask``: the boundaries travel in ``cu_seq_lens_*`` (read by padfree's
    and transformers' flash attention paths) and in the restarting ``position_ids``. The keys and
    values are those of ``transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True,
    return_position_ids=True)``.

    Args:
        return_flash_attn_kwargs: include the ``cu_seq_lens_*`` / ``max_length_*`` entries.
        pad_to_multiple_of: when set, append one padding tail so that the row length is a multiple
            of it (steadier shapes for ``torch.compile`` and CUDA graphs). The tail has
            ``input_ids = pad_token_id``, ``labels = -100`` and ``position_ids`` continuing from the
            last sequence's; it is *not* counted in ``cu_seq_lens_*`` (their last entry stays the
            number of real tokens), so padfree's attention gives those tokens output 0 and they
            never reach a real token (causal models also never let a real token see them when the
            boundaries come from ``position_ids`` instead). The loss ignores them through the labels.
        pad_token_id: the token id of the padding tail.
        max_tokens: when set, a row longer than this (padding tail included) raises ValueError
            instead of running out of memory later.
        adapter_key: the example key holding the index of the LoRA adapter that example trains
            (e.g. ``"adapter_id"``); None: no ``adapter_ids`` in the batch. With HF ``Trainer`` and a
            ``datasets.Dataset``, pass ``remove_unused_columns=False`` so that the column reaches the
            collator.

    >>> collate = PaddingFreeCollator()
    >>> batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
    >>> batch["input_ids"], batch["labels"], batch["position_ids"]
    (tensor([[5, 6, 7, 8, 9]]), tensor([[-100,    6,    7, -100,    9]]), tensor([[0, 1, 2, 0, 1]]))
    >>> batch["cu_seq_lens_q"], batch["max_length_q"]
    (tensor([0, 3, 5], dtype=torch.int32), 3)
    >>> PaddingFreeCollator(adapter_key="adapter_id")([{"input_ids": [5, 6], "adapter_id": 2},
    ...                                                {"input_ids": [7], "adapter_id": 0}])["adapter_ids"]
    tensor([2, 0])
    """

    def __init__(self, return_flash_attn_kwargs: bool = True, pad_to_multiple_of: int | None = None,
                 pad_token_id: int = 0, max_tokens: int | None = None, adapter_key: str | None = None):
        if pad_to_multiple_of is not None:
            pad_to_multiple_of = self._positive_int("pad_to_multiple_of", pad_to_multiple_of)
        if max_tokens is not None:
            max_tokens = self._positive_int("max_tokens", max_tokens)
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        self.return_flash_attn_kwargs = bool(return_flash_attn_kwargs)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.max_tokens = max_tokens
        if adapter_key is not None and not isinstance(adapter_key, str):
            raise TypeError(f"adapter_key must be a str (an example key) or None, got {type(adapter_key).__name__}")
        self.adapter_key = adapter_key

    @staticmethod
    def _positive_int(name: str, value) -> int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        value = operator.index(value)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        return value

    def __repr__(self) -> str:
        return (f"PaddingFreeCollator(return_flash_attn_kwargs={self.return_flash_attn_kwargs}, "
                f"pad_to_multiple_of={self.pad_to_multiple_of}, pad_token_id={self.pad_token_id}, "
                f"max_tokens={self.max_tokens}, adapter_key={self.adapter_key!r})")

    def _sequences(self, features) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if isinstance(features, Mapping) or not isinstance(features, Sequence):
            raise TypeError(f"features must be a list of examples (mappings with 'input_ids'), "
                            f"got {type(features).__name__}")
        if len(features) == 0:
            raise ValueError("features is empty: a padding-free batch needs at least one example")
        all_ids, all_labels = [], []
        for i, example in enumerate(features):
            if not isinstance(example, Mapping):
                raise TypeError(f"features[{i}] must be a mapping with 'input_ids', got {type(example).__name__}")
            if "input_ids" not in example:
                raise ValueError(f"features[{i}] has no 'input_ids' (keys: {sorted(example)})")
            ids = _token_ids(f"features[{i}]['input_ids']", example["input_ids"])
            if ids.numel() == 0:
                raise ValueError(f"features[{i}]['input_ids'] is empty: every sequence needs at least one token")
            if example.get("labels") is None:
                labels = ids.clone()
            else:
                labels = _token_ids(f"features[{i}]['labels']", example["labels"]).clone()
                if labels.numel() != ids.numel():
                    raise ValueError(f"features[{i}]['labels'] has {labels.numel()} entries but "
                                     f"'input_ids' has {ids.numel()}: they must have one label per token")
            labels[0] = IGNORE_INDEX
            all_ids.append(ids)
            all_labels.append(labels)
        return all_ids, all_labels

    def __call__(self, features) -> dict:
        all_ids, all_labels = self._sequences(features)
        lengths = torch.tensor([ids.numel() for ids in all_ids], dtype=torch.int64)
        total = int(lengths.sum())
        tail = 0 if self.pad_to_multiple_of is None else -total % self.pad_to_multiple_of
        if self.max_tokens is not None and total + tail > self.max_tokens:
            raise ValueError(f"the batch has {total + tail} tokens ({len(all_ids)} examples"
                             f"{f', {tail} padding' if tail else ''}), more than max_tokens={self.max_tokens}; "
                             "use a token-budget sampler (padfree.packing.MultipackBatchSampler) or a smaller batch")
        starts = torch.cumsum(lengths, 0) - lengths
        position_ids = torch.arange(total + tail, dtype=torch.int64)
        position_ids[:total] -= torch.repeat_interleave(starts, lengths)
        position_ids[total:] -= starts[-1]
        input_ids = torch.cat([*all_ids, torch.full((tail,), self.pad_token_id, dtype=torch.int64)])
        labels = torch.cat([*all_labels, torch.full((tail,), IGNORE_INDEX, dtype=torch.int64)])
        batch = {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None]}
        if self.return_flash_attn_kwargs:
            cu_seq_lens = torch.zeros(len(all_ids) + 1, dtype=torch.int32)
            cu_seq_lens[1:] = torch.cumsum(lengths, 0)
            max_length = int(lengths.max())
            batch.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens.clone(),
                         max_length_q=max_length, max_length_k=max_length)
        if self.adapter_key is not None:
            batch["adapter_ids"] = self._adapter_ids(features)
        return batch

    def _adapter_ids(self, features) -> torch.Tensor:
        ids = []
        for i, example in enumerate(features):
            if self.adapter_key not in example:
                # the usual cause: HF Trainer (and TRL's trainers) drop every example key the model's
                # forward does not name before the collator runs, whatever the dataset type
                raise ValueError(f"features[{i}] has no {self.adapter_key!r} (adapter_key; keys: {sorted(example)}); "
                                 "under HF Trainer pass TrainingArguments(remove_unused_columns=False), which "
                                 "otherwise drops example keys the model's forward does not take")
            value = example[self.adapter_key]
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = value.item()
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise TypeError(f"features[{i}][{self.adapter_key!r}] must be an int adapter index, "
                                f"got {type(value).__name__}")
            ids.append(operator.index(value))
        return torch.tensor(ids, dtype=torch.int64)
