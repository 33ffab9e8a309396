"""Training batches for each batching mode, from the same examples and the same token budget.

Steps are formed greedily in example order: examples are added to a step while its useful tokens
stay within `tokens_per_step`. `padded`, `naive_packing` and `padding_free` use exactly these
steps (same examples per step, so their losses are comparable step by step); `padded_sorted`
takes the same examples and regroups them by length before forming steps the same greedy way
(length-grouped batching, its best case: one global sort).

    padded         (B, longest) right-padded, attention_mask, labels -100 on padding
    padded_sorted  as padded, on length-sorted steps
    naive_packing  (1, T) concatenation, no boundaries: every token attends to earlier examples
                   and positions run on across them (fast but wrong; shown with its loss gap)
    padding_free   (1, T) from padfree's PaddingFreeCollator: position_ids restart per example,
                   cu_seq_lens_q/k and max_length_q/k for varlen attention

Every mode masks each example's first token in the labels after the shift (its first token is
never predicted), so all modes average the loss over exactly the same Σ(len - 1) targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("padded", "padded_sorted", "naive_packing", "padding_free")
IGNORE_INDEX = -100
PAD_TOKEN_ID = 0


@dataclass
class Batch:
    """One training step's model inputs and its token accounting."""

    inputs: dict[str, torch.Tensor | int]
    useful_tokens: int      # real tokens of the examples (padding never counts)
    processed_tokens: int   # token slots the model computes on (padding included)
    example_indices: list[int]

    @property
    def fill_ratio(self) -> float:
        return self.useful_tokens / self.processed_tokens

    def to(self, device: torch.device) -> Batch:
        moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in self.inputs.items()}
        return Batch(moved, self.useful_tokens, self.processed_tokens, self.example_indices)


def make_examples(lengths: list[int], vocab_size: int, seed: int) -> list[torch.Tensor]:
    """Random token ids in [1, vocab_size) (0 is the pad id), one int64 tensor per length."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (length,), generator=generator) for length in lengths]


def greedy_steps(lengths: list[int], tokens_per_step: int) -> list[list[int]]:
    """Consecutive groups of example indices with at most `tokens_per_step` useful tokens each."""
    if tokens_per_step < max(lengths):
        raise ValueError(f"tokens_per_step ({tokens_per_step}) must be >= the longest example "
                         f"({max(lengths)}); raise --tokens-per-step or lower --max-length")
    steps: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if used + length > tokens_per_step:
            steps.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        steps.append(current)
    return steps


def length_grouped_steps(steps: list[list[int]], lengths: list[int], tokens_per_step: int) -> list[list[int]]:
    """The same examples as `steps`, sorted by length (longest first), regrouped greedily."""
    indices = sorted((i for step in steps for i in step), key=lambda i: (-lengths[i], i))
    regrouped = greedy_steps([lengths[i] for i in indices], tokens_per_step)
    return [[indices[position] for position in step] for step in regrouped]


def padded_batch(examples: list[torch.Tensor], indices: list[int]) -> Batch:
    rows = [examples[i] for i in indices]
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for row, tokens in enumerate(rows):
        input_ids[row, :len(tokens)] = tokens
        attention_mask[row, :len(tokens)] = 1
        labels[row, :len(tokens)] = tokens
    useful = sum(len(row) for row in rows)
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
                 useful, input_ids.numel(), list(indices))


def naive_packed_batch(examples: list[torch.Tensor], indices: list[int]) -> Batch:
    rows = [examples[i] for i in indices]
    input_ids = torch.cat(rows)[None]
    labels = input_ids.clone()
    starts = torch.tensor([0] + [len(row) for row in rows[:-1]]).cumsum(0)
    labels[0, starts] = IGNORE_INDEX
    total = input_ids.shape[1]
    return Batch({"input_ids": input_ids, "labels": labels}, total, total, list(indices))


def padding_free_batch(examples: list[torch.Tensor], indices: list[int]) -> Batch:
    from padfree.packing import PaddingFreeCollator

    features = [{"input_ids": examples[i].tolist()} for i in indices]
    inputs = dict(PaddingFreeCollator()(features))
    total = int(inputs["input_ids"].shape[1])
    return Batch(inputs, total, total, list(indices))


_BUILDERS = {"padded": padded_batch, "padded_sorted": padded_batch,
             "naive_packing": naive_packed_batch, "padding_free": padding_free_batch}


def build_batches(mode: str, examples: list[torch.Tensor], steps: list[list[int]],
                  tokens_per_step: int) -> list[Batch]:
    """The batches `mode` trains on for the examples of `steps` (see the module docstring)."""
    if mode not in _BUILDERS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "padded_sorted":
        steps = length_grouped_steps(steps, [len(example) for example in examples], tokens_per_step)
    return [_BUILDERS[mode](examples, step) for step in steps]
