import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padfree.packing import PackResult, Piece, pack_lengths

STRATEGIES = ["bfd", "ffd", "sequential"]


def tokens_of(entry, lengths):
    return entry.length if isinstance(entry, Piece) else lengths[entry]


def assert_valid(result: PackResult, lengths, capacity):
    """Every index exactly once, no pack over capacity, bookkeeping consistent."""
    seen = sorted(entry for pack in result.packs for entry in pack)
    assert seen == list(range(len(lengths)))
    assert result.num_packs == len(result.packs) == len(result.pack_tokens)
    for pack, tokens in zip(result.packs, result.pack_tokens):
        assert pack, "no empty pack"
        assert tokens == sum(tokens_of(e, lengths) for e in pack) <= capacity
    assert result.fill_ratio == pytest.approx(sum(lengths) / (result.num_packs * capacity))


def decreasing(lengths):
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def naive_best_fit_decreasing(lengths, capacity):
    """Pack token counts, O(n * packs): tightest pack that fits, else a new one."""
    rooms = []
    for i in decreasing(lengths):
        fitting = [p for p, room in enumerate(rooms) if room >= lengths[i]]
        if fitting:
            rooms[min(fitting, key=lambda p: rooms[p])] -= lengths[i]
        else:
            rooms.append(capacity - lengths[i])
    return sorted(capacity - room for room in rooms)


def naive_first_fit_decreasing(lengths, capacity):
    packs, rooms = [], []
    for i in decreasing(lengths):
        p = next((p for p, room in enumerate(rooms) if room >= lengths[i]), len(rooms))
        if p == len(rooms):
            packs.append([])
            rooms.append(capacity)
        packs[p].append(i)
        rooms[p] -= lengths[i]
    return [sorted(pack) for pack in packs]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_small_example(strategy):
    lengths = [5, 3, 4, 2, 6]
    result = pack_lengths(lengths, 8, strategy=strategy)
    assert_valid(result, lengths, 8)
    assert result.num_packs == 3


def test_best_fit_takes_the_tightest_pack_first_fit_the_earliest():
    # capacity 10: 8 -> pack 0 (room 2), 6 -> pack 1 (room 4), 3 -> pack 1 (room 1); the 1 fits
    # both: best fit takes the tighter pack 1, first fit the earlier pack 0.
    assert pack_lengths([8, 6, 3, 1], 10, "bfd").packs == [[0], [1, 2, 3]]
    assert pack_lengths([8, 6, 3, 1], 10, "ffd").packs == [[0, 3], [1, 2]]


def test_sequential_keeps_order():
    assert pack_lengths([3, 4, 2, 5, 1], 6, "sequential").packs == [[0], [1, 2], [3, 4]]


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_implementations_on_random_data(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 100, 1024])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    bfd = pack_lengths(lengths, capacity, "bfd")
    ffd = pack_lengths(lengths, capacity, "ffd")
    assert sorted(bfd.pack_tokens) == naive_best_fit_decreasing(lengths, capacity)
    assert ffd.packs == naive_first_fit_decreasing(lengths, capacity)
    seq = pack_lengths(lengths, capacity, "sequential")
    for result in (bfd, ffd, seq):
        assert_valid(result, lengths, capacity)
    lower_bound = -(-sum(lengths) // capacity)
    assert lower_bound <= bfd.num_packs <= 11 * lower_bound // 9 + 1
    assert bfd.fill_ratio >= seq.fill_ratio - 1e-12


def test_bfd_fill_on_a_skewed_length_distribution():
    rng = random.Random(0)
    lengths = [min(4096, int(rng.lognormvariate(5.5, 1.0)) + 1) for _ in range(2000)]
    bfd = pack_lengths(lengths, 4096, "bfd")
    ffd = pack_lengths(lengths, 4096, "ffd")
    seq = pack_lengths(lengths, 4096, "sequential")
    assert bfd.fill_ratio > 0.98
    assert bfd.fill_ratio >= ffd.fill_ratio - 1e-12
    assert bfd.fill_ratio > seq.fill_ratio


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=60), capacity=st.integers(1, 64),
       strategy=st.sampled_from(STRATEGIES), oversize=st.sampled_from(["split", "truncate"]))
def test_property_every_token_placed_once(lengths, capacity, strategy, oversize):
    result = pack_lengths(lengths, capacity, strategy=strategy, oversize=oversize)
    covered = {i: [] for i in range(len(lengths))}
    for pack, tokens in zip(result.packs, result.pack_tokens):
        assert 0 < tokens <= capacity
        assert tokens == sum(tokens_of(e, lengths) for e in pack)
        for entry in pack:
            if isinstance(entry, Piece):
                assert lengths[entry.index] > capacity and 0 <= entry.start < entry.stop <= lengths[entry.index]
                covered[entry.index].append((entry.start, entry.stop))
            else:
                assert lengths[entry] <= capacity
                covered[entry].append((0, lengths[entry]))
    for i, spans in covered.items():
        spans.sort()
        if oversize == "truncate" and lengths[i] > capacity:
            assert spans == [(0, capacity)]
        else:
            assert spans[0][0] == 0 and spans[-1][1] == lengths[i]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert all(stop - start == capacity for start, stop in spans[:-1])


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=80), capacity=st.integers(50, 120))
def test_property_decreasing_strategies_leave_no_two_packs_mergeable(lengths, capacity):
    """First/best fit open a pack only for a sequence no open pack can take, so any two packs hold
    more than `capacity` together (hence fewer than 2 * tokens / capacity + 1 packs). This does not
    make them never worse than sequential packing: [12, 12, 12, 29, 12, 18, 25] at 65 packs into 2
    in order and into 3 by decreasing length."""
    for strategy in ("bfd", "ffd"):
        tokens = pack_lengths(lengths, capacity, strategy).pack_tokens
        assert all(a + b > capacity for a, b in itertools.combinations(tokens, 2)), (strategy, tokens)
        assert len(tokens) < 2 * sum(lengths) / capacity + 1


def test_decreasing_order_can_lose_to_sequential_order():
    lengths = [12, 12, 12, 29, 12, 18, 25]
    assert pack_lengths(lengths, 65, "sequential").num_packs == 2
    assert pack_lengths(lengths, 65, "bfd").num_packs == pack_lengths(lengths, 65, "ffd").num_packs == 3


def test_oversize_split_representation():
    result = pack_lengths([5, 20, 3], 8, oversize="split")
    assert result.packs == [[Piece(1, 0, 8)], [Piece(1, 8, 16)], [0, 2], [Piece(1, 16, 20)]]
    assert result.pack_tokens == [8, 8, 8, 4]
    assert result.fill_ratio == pytest.approx(28 / 32)


def test_oversize_truncate_is_visible():
    result = pack_lengths([5, 20, 3], 8, oversize="truncate")
    assert result.packs == [[Piece(1, 0, 8)], [0, 2]]
    assert result.pack_tokens == [8, 8]


def test_oversize_error_names_the_sequence():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 20 exceeds capacity 8"):
        pack_lengths([5, 20, 3], 8)


def test_accepts_tensors_and_empty_input():
    result = pack_lengths(torch.tensor([3, 3, 2]), 4)
    assert_valid(result, [3, 3, 2], 4)
    empty = pack_lengths([], 4)
    assert empty.packs == [] and empty.num_packs == 0 and empty.fill_ratio == 0.0


@pytest.mark.parametrize("lengths, capacity, kwargs, error, match", [
    ([1, 0, 2], 4, {}, ValueError, r"lengths\[1\] = 0"),
    ([1, -3], 4, {}, ValueError, r"lengths\[1\] = -3"),
    ([1, 2.5], 4, {}, TypeError, r"lengths\[1\] must be an int"),
    ([1, True], 4, {}, TypeError, r"lengths\[1\] must be an int"),
    (torch.tensor([1.0, 2.0]), 4, {}, TypeError, "must hold integers"),
    (torch.ones(2, 2, dtype=torch.int64), 4, {}, ValueError, "must be 1-D"),
    ("abc", 4, {}, TypeError, "sequence of ints"),
    ([1], 0, {}, ValueError, "capacity must be > 0"),
    ([1], 2.0, {}, TypeError, "capacity must be an int"),
    ([1], 4, {"strategy": "worst"}, ValueError, "strategy must be one of"),
    ([1], 4, {"oversize": "drop"}, ValueError, "oversize must be one of"),
])
def test_bad_input(lengths, capacity, kwargs, error, match):
    with pytest.raises(error, match=match):
        pack_lengths(lengths, capacity, **kwargs)


def test_large_input_is_fast():
    rng = random.Random(1)
    lengths = [rng.randint(1, 8192) for _ in range(100_000)]
    result = pack_lengths(lengths, 8192, "bfd")
    assert result.fill_ratio > 0.99
    assert sum(len(pack) for pack in result.packs) == len(lengths)
