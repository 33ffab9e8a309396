import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padfree.packing import MultipackBatchSampler, PaddingFreeCollator


def all_ranks(lengths, tokens_per_rank, num_replicas, **kwargs):
    samplers = [MultipackBatchSampler(lengths, tokens_per_rank, num_replicas=num_replicas, rank=r, **kwargs)
                for r in range(num_replicas)]
    return samplers, [list(s) for s in samplers]


def random_lengths(n, high, seed=0):
    rng = random.Random(seed)
    return [min(high, int(rng.lognormvariate(4, 1)) + 1) for _ in range(n)]


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 8])
@pytest.mark.parametrize("strategy", ["bfd", "ffd", "sequential"])
def test_every_example_once_and_within_budget(num_replicas, strategy):
    lengths = random_lengths(500, 512)
    samplers, batches = all_ranks(lengths, 512, num_replicas, strategy=strategy)
    assert len({len(rank_batches) for rank_batches in batches}) == 1, "same number of steps on every rank"
    assert all(len(s) == len(batches[0]) for s in samplers)
    seen = sorted(i for rank_batches in batches for batch in rank_batches for i in batch)
    assert seen == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in batch) <= 512 for rank_batches in batches for batch in rank_batches)
    assert all(batch for rank_batches in batches for batch in rank_batches), "no rank gets an empty batch"
    stats = samplers[0].stats()
    assert stats["num_examples"] == len(lengths) and stats["dropped_examples"] == 0
    assert stats["tokens"] == sum(lengths)


def test_ranks_are_balanced_per_step():
    lengths = random_lengths(2000, 1024, seed=3)
    samplers, batches = all_ranks(lengths, 1024, 4)
    stats = samplers[0].stats()
    assert stats == samplers[3].stats(), "every rank computes the same plan"
    tokens = stats["tokens_per_rank_step"]
    for step, rank_batches in zip(tokens, zip(*batches)):
        assert step == [sum(lengths[i] for i in batch) for batch in rank_batches]
    assert stats["fill"] > 0.95
    assert stats["balance_efficiency"] > 0.95
    assert stats["max_tokens"] == [max(t) for t in tokens] and stats["min_tokens"] == [min(t) for t in tokens]
    assert samplers[0].imbalance() == max(max(t) / min(t) for t in tokens)


def test_deterministic_per_seed_and_epoch():
    lengths = random_lengths(300, 256)
    first = MultipackBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=7)
    second = MultipackBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=7)
    assert list(first) == list(second)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    first.set_epoch(0)
    assert list(first) == epoch0
    assert list(MultipackBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=8)) != epoch0


def test_no_shuffle_orders_steps_largest_first():
    lengths = [3, 4, 2, 5, 1, 6]  # sequential packs: [0] 3 tokens, [1, 2] 6, [3, 4] 6, [5] 6
    _, batches = all_ranks(lengths, 6, 1, shuffle=False, strategy="sequential")
    assert batches == [[[1, 2], [3, 4], [5], [0]]]


def test_short_last_step_splits_packs():
    # 4 full packs for 3 ranks: two packs are split so 6 packs fill 2 steps
    lengths = [5, 3, 4, 2, 6, 7, 1]
    samplers, batches = all_ranks(lengths, 8, 3)
    assert [len(b) for b in batches] == [2, 2, 2]
    assert all(batch for rank_batches in batches for batch in rank_batches)
    assert sorted(i for rank_batches in batches for batch in rank_batches for i in batch) == list(range(7))
    assert samplers[0].stats()["empty_batches"] == 0


def test_empty_batches_only_when_there_are_too_few_examples():
    samplers, batches = all_ranks([5, 3], 8, 4)
    assert batches == [[[0]], [[1]], [[]], [[]]]
    stats = samplers[0].stats()
    assert stats["empty_batches"] == 2 and samplers[0].imbalance() == float("inf")


def test_drop_last_drops_the_leftover_packs_and_reports_them():
    lengths = [5, 3, 4, 2, 6, 7, 1]  # packs of 8, 8, 8 and 4 tokens
    samplers, batches = all_ranks(lengths, 8, 3, drop_last=True)
    scheduled = sorted(i for rank_batches in batches for batch in rank_batches for i in batch)
    assert len(scheduled) == len(set(scheduled)) == 6
    assert samplers[0].stats()["dropped_examples"] == 1
    assert sorted(set(range(7)) - set(scheduled)) == [2]  # the length-4 pack is the leftover


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60), num_replicas=st.integers(1, 5),
       seed=st.integers(0, 3), drop_last=st.booleans())
def test_property_partition_across_ranks(lengths, num_replicas, seed, drop_last):
    samplers, batches = all_ranks(lengths, 40, num_replicas, seed=seed, drop_last=drop_last)
    scheduled = [i for rank_batches in batches for batch in rank_batches for i in batch]
    assert len(scheduled) == len(set(scheduled))
    stats = samplers[0].stats()
    assert len(scheduled) + stats["dropped_examples"] == len(lengths)
    if not drop_last:
        assert stats["dropped_examples"] == 0
    if stats["empty_batches"]:
        # only when no pack could be split any more, and only in the (smallest) last step
        assert not drop_last
        assert all(len(batch) <= 1 for rank_batches in batches for batch in rank_batches)
        last_step = [rank_batches[-1] for rank_batches in batches]
        assert stats["empty_batches"] == sum(not batch for batch in last_step)


def test_with_dataloader_and_collator():
    examples = [{"input_ids": list(range(1, n + 1))} for n in random_lengths(40, 64)]
    sampler = MultipackBatchSampler([len(e["input_ids"]) for e in examples], 64, num_replicas=1, rank=0)
    loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=PaddingFreeCollator(max_tokens=64))
    total = sum(int(batch["cu_seq_lens_q"][-1]) for batch in loader)
    assert total == sum(len(e["input_ids"]) for e in examples)
    assert len(loader) == len(sampler)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lengths": [3, 0]}, ValueError, r"lengths\[1\] = 0"),
    ({"lengths": [3, 9, 12]}, ValueError, r"2 example\(s\) longer than tokens_per_rank=8 \(lengths\[1\]=9"),
    ({"tokens_per_rank": 0}, ValueError, "tokens_per_rank must be > 0"),
    ({"tokens_per_rank": 8.0}, TypeError, "tokens_per_rank must be an int"),
    ({"num_replicas": 0}, ValueError, "num_replicas must be >= 1"),
    ({"num_replicas": 2, "rank": 2}, ValueError, r"rank must be in \[0, num_replicas=2\)"),
    ({"rank": -1}, ValueError, "rank must be in"),
    ({"strategy": "best"}, ValueError, "strategy must be one of"),
    ({"seed": None}, TypeError, "seed must be an int"),
])
def test_bad_input(kwargs, error, match):
    args = {"lengths": [3, 4], "tokens_per_rank": 8} | kwargs
    with pytest.raises(error, match=match):
        MultipackBatchSampler(**args)


def test_defaults_without_distributed():
    sampler = MultipackBatchSampler([3, 4], 8)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    with pytest.raises(TypeError, match="epoch must be an int"):
        sampler.set_epoch("1")


def test_defaults_from_initialised_process_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sampler = MultipackBatchSampler([3, 4], 8)
        assert (sampler.num_replicas, sampler.rank) == (dist.get_world_size(), dist.get_rank()) == (1, 0)
        assert MultipackBatchSampler([3, 4], 8, num_replicas=2, rank=1).rank == 1, "explicit values win"
    finally:
        dist.destroy_process_group()
