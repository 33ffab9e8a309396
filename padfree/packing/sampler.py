"""`MultipackBatchSampler`: token-budget batches, balanced across data-parallel ranks."""

from __future__ import annotations

import operator

import torch
from torch.utils.data import Sampler

from padfree.packing.binpack import STRATEGIES, check_lengths, pack_lengths


def _distributed_defaults(num_replicas, rank) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    for name, value in (("num_replicas", num_replicas), ("rank", rank)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    num_replicas, rank = operator.index(num_replicas), operator.index(rank)
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
    return num_replicas, rank


def _halve(pack: list[int], lengths: list[int]) -> tuple[list[int], list[int]]:
    """Split a pack of >= 2 examples into two non-empty packs of near-equal tokens (longest first,
    each to the lighter side)."""
    halves: tuple[list[int], list[int]] = ([], [])
    tokens = [0, 0]
    for index in sorted(pack, key=lambda i: -lengths[i]):
        side = 0 if tokens[0] <= tokens[1] else 1
        halves[side].append(index)
        tokens[side] += lengths[index]
    return sorted(halves[0]), sorted(halves[1])


class MultipackBatchSampler(Sampler[list[int]]):
    """Batches of example indices under a token budget, with near-equal tokens on every rank.

    Per epoch: shuffle the example order (``shuffle=True``, seeded by ``seed + epoch``), bin-pack
    the lengths into packs of at most ``tokens_per_rank`` tokens (:func:`pack_lengths` with
    ``strategy``), sort the packs by token count and deal them out in groups of ``num_replicas``
    adjacent packs: one group is one step, and rank r gets the r-th pack of each group, so within a
    step the ranks' token counts are neighbours in the sorted order. The steps are then shuffled
    (``shuffle=False``: no shuffling at all, the steps go from the most tokens to the fewest, which
    also shows an out-of-memory batch size at the first step).
    Every rank computes the same plan from (lengths, seed, epoch), so no communication is needed.
    Iterating yields, for this rank, one list of example indices per step (use it as a DataLoader
    ``batch_sampler`` with :class:`PaddingFreeCollator` as ``collate_fn``).

    Every example appears exactly once per epoch across all ranks. When the number of packs is
    not a multiple of ``num_replicas``:

    * ``drop_last=False`` (default): packs holding several examples are split in two (the ones with
      the most tokens first) until every rank has a pack in every step, so no rank idles or gets
      an empty batch. Only when there are fewer examples than that needs (fewer than
      ``num_replicas`` in the last step) do some ranks get an **empty list** in the last step;
      ``stats()["empty_batches"]`` counts them.
    * ``drop_last=True``: the leftover packs (the smallest ones) are dropped for this epoch;
      ``stats()["dropped_examples"]`` reports how many examples that skipped.

    With ``"bfd"``/``"ffd"`` the grouping depends mostly on the lengths, so the same examples tend to
    share a pack in every epoch (shuffling changes ties and the step order); ``"sequential"`` packs
    in the shuffled order, so groupings change every epoch at a lower fill.

    An example longer than ``tokens_per_rank`` raises ValueError (truncate or filter the data).
    ``num_replicas``/``rank`` default to the initialised ``torch.distributed`` world, else 1/0.

    >>> lengths = [5, 3, 4, 2, 6, 7, 1]
    >>> samplers = [MultipackBatchSampler(lengths, tokens_per_rank=8, num_replicas=2, rank=r) for r in (0, 1)]
    >>> [list(sampler) for sampler in samplers]  # [rank][step] -> example indices
    [[[0, 1], [5, 6]], [[2], [3, 4]]]
    >>> samplers[0].stats()["tokens_per_rank_step"], len(samplers[0])
    ([[8, 4], [8, 8]], 2)
    """

    def __init__(self, lengths, tokens_per_rank: int, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, strategy: str = "bfd"):
        self.lengths = check_lengths("lengths", lengths)
        if isinstance(tokens_per_rank, bool) or not isinstance(tokens_per_rank, int):
            raise TypeError(f"tokens_per_rank must be an int, got {type(tokens_per_rank).__name__}")
        if tokens_per_rank <= 0:
            raise ValueError(f"tokens_per_rank must be > 0, got {tokens_per_rank}")
        oversize = [i for i, n in enumerate(self.lengths) if n > tokens_per_rank]
        if oversize:
            shown = ", ".join(f"lengths[{i}]={self.lengths[i]}" for i in oversize[:5])
            raise ValueError(f"{len(oversize)} example(s) longer than tokens_per_rank={tokens_per_rank} "
                             f"({shown}{', ...' if len(oversize) > 5 else ''}); truncate or filter them")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.num_replicas, self.rank = _distributed_defaults(num_replicas, rank)
        self.tokens_per_rank = tokens_per_rank
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.strategy = strategy
        self.epoch = 0
        self._plan_cache: tuple[int, list[list[list[int]]], int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffling of `epoch` (call before each epoch, as with DistributedSampler)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
        self.epoch = epoch

    def _packs(self, generator: torch.Generator) -> list[list[int]]:
        order = (torch.randperm(len(self.lengths), generator=generator).tolist() if self.shuffle
                 else list(range(len(self.lengths))))
        result = pack_lengths([self.lengths[i] for i in order], self.tokens_per_rank, strategy=self.strategy)
        return [sorted(order[k] for k in pack) for pack in result.packs]

    def _fill_short_step(self, packs: list[list[int]]) -> list[list[int]]:
        """Split multi-example packs until the pack count is a multiple of num_replicas (or none is left)."""
        missing = -len(packs) % self.num_replicas
        while missing:
            splittable = [p for p in range(len(packs)) if len(packs[p]) > 1]
            if not splittable:
                break
            largest = max(splittable, key=lambda p: (sum(self.lengths[i] for i in packs[p]), -p))
            packs[largest:largest + 1] = _halve(packs[largest], self.lengths)
            missing -= 1
        return packs

    def plan(self) -> list[list[list[int]]]:
        """All ranks' batches for the current epoch: ``plan()[step][rank]`` is a list of indices."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            packs = self._packs(generator)
            dropped = 0
            if self.drop_last:
                leftover = len(packs) % self.num_replicas
                packs.sort(key=lambda pack: -sum(self.lengths[i] for i in pack))
                if leftover:
                    dropped = sum(len(pack) for pack in packs[-leftover:])
                    packs = packs[:-leftover]
            else:
                packs = self._fill_short_step(packs)
            packs.sort(key=lambda pack: -sum(self.lengths[i] for i in pack))
            packs += [[] for _ in range(-len(packs) % self.num_replicas)]
            steps = [packs[s:s + self.num_replicas] for s in range(0, len(packs), self.num_replicas)]
            if self.shuffle:
                steps = [steps[s] for s in torch.randperm(len(steps), generator=generator).tolist()]
                # The step with empty batches (if any) stays last, as documented.
                steps.sort(key=lambda step: any(not batch for batch in step))
            self._plan_cache = (self.epoch, steps, dropped)
        return self._plan_cache[1]

    def __iter__(self):
        for step in self.plan():
            yield list(step[self.rank])

    def __len__(self) -> int:
        return len(self.plan())

    def stats(self) -> dict:
        """Balance and fill of the current epoch's plan (the same on every rank).

        ``tokens_per_rank_step`` [step][rank] tokens; ``max_tokens``/``min_tokens`` per step
        (lists); ``imbalance`` (see :meth:`imbalance`); ``balance_efficiency`` = tokens /
        (num_replicas * sum over steps of the step's max), the share of the ranks' step time spent
        on real tokens when time follows tokens; ``fill`` = tokens / (steps * num_replicas *
        tokens_per_rank); ``num_steps``, ``num_examples`` (scheduled), ``dropped_examples``,
        ``empty_batches``.
        """
        steps = self.plan()
        tokens = [[sum(self.lengths[i] for i in batch) for batch in step] for step in steps]
        step_max = [max(row) for row in tokens]
        step_min = [min(row) for row in tokens]
        total = sum(map(sum, tokens))
        slots = len(steps) * self.num_replicas
        return {
            "num_steps": len(steps),
            "num_examples": sum(len(batch) for step in steps for batch in step),
            "dropped_examples": self._plan_cache[2],
            "empty_batches": sum(not batch for step in steps for batch in step),
            "tokens": total,
            "tokens_per_rank_step": tokens,
            "max_tokens": step_max,
            "min_tokens": step_min,
            "imbalance": self.imbalance(),
            "balance_efficiency": total / (self.num_replicas * sum(step_max)) if steps else 1.0,
            "fill": total / (slots * self.tokens_per_rank) if slots else 0.0,
        }

    def imbalance(self) -> float:
        """Worst step's max/min tokens across ranks (1.0 = perfectly balanced; inf if a rank is empty)."""
        worst = 1.0
        for step in self.plan():
            tokens = [sum(self.lengths[i] for i in batch) for batch in step]
            worst = max(worst, max(tokens) / min(tokens) if min(tokens) else float("inf"))
        return worst
