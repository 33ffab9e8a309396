"""Bin packing of sequence lengths into fixed-capacity packs (rows of at most `capacity` tokens).

`pack_lengths` places every sequence (or, with `oversize="split"`, every piece of one) in exactly
one pack and never drops anything. Strategies:

  * ``"bfd"`` best-fit decreasing: longest first, each into the open pack it fills the most
    (smallest remaining room that still fits), else a new pack. O(n log n + n log capacity).
  * ``"ffd"`` first-fit decreasing: longest first, each into the earliest opened pack that fits.
    O(n log n).
  * ``"sequential"`` greedy in the given order: a new pack whenever the next one does not fit.
    O(n); keeps the data order, packs less tightly.

Both decreasing strategies use at most 11/9 OPT + 6/9 packs (OPT = the fewest possible); they
differ in which packs are left with room.

Representation of a pack: a list whose entries are either an ``int`` ``i`` (the whole sequence
``lengths[i]``) or a :class:`Piece` ``(index, start, stop)``: tokens ``[start, stop)`` of sequence
``index``. Pieces only appear for sequences longer than `capacity`, with ``oversize="split"``
(consecutive pieces of `capacity` tokens, the last one shorter, each placed like an ordinary
sequence) or ``oversize="truncate"`` (one piece ``(index, 0, capacity)``; the rest of the sequence
is not in any pack, and that is visible in the result, never silent).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

STRATEGIES = ("bfd", "ffd", "sequential")
OVERSIZE = ("error", "split", "truncate")


class Piece(NamedTuple):
    """Tokens ``[start, stop)`` of sequence ``index`` (a sequence longer than the capacity)."""

    index: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass
class PackResult:
    """What :func:`pack_lengths` returns.

    ``packs[p]`` lists the entries of pack ``p`` (``int`` index or :class:`Piece`, see the module
    docstring) in ascending order of index; ``pack_tokens[p]`` is its token count (<= capacity).
    ``fill_ratio`` = sum of packed tokens / (num_packs * capacity), 0.0 when there is no pack.
    """

    packs: list[list[int | Piece]]
    pack_tokens: list[int]
    capacity: int
    num_packs: int = field(init=False)
    fill_ratio: float = field(init=False)

    def __post_init__(self):
        self.num_packs = len(self.packs)
        total = sum(self.pack_tokens)
        self.fill_ratio = total / (self.num_packs * self.capacity) if self.num_packs else 0.0


def check_lengths(name: str, lengths) -> list[int]:
    """`lengths` as a list of positive python ints, or a clear TypeError/ValueError."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {lengths.dtype}")
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {type(lengths).__name__}")
    values = []
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise TypeError(f"{name}[{i}] must be an int, got {type(n).__name__}")
        n = operator.index(n)
        if n <= 0:
            raise ValueError(f"{name}[{i}] = {n}: every sequence needs at least one token "
                             "(filter out empty examples before packing)")
        values.append(n)
    return values


def _check_capacity(capacity) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0, got {capacity}")
    return capacity


def _items(lengths: list[int], capacity: int, oversize: str) -> list[tuple[int, int | Piece]]:
    """(token count, pack entry) for every sequence or piece, in sequence order."""
    items = []
    for index, n in enumerate(lengths):
        if n <= capacity:
            items.append((n, index))
        elif oversize == "error":
            raise ValueError(f"lengths[{index}] = {n} exceeds capacity {capacity}; pass oversize='split' "
                             "or 'truncate', or filter/truncate the data beforehand")
        elif oversize == "truncate":
            items.append((capacity, Piece(index, 0, capacity)))
        else:
            items.extend((min(start + capacity, n) - start, Piece(index, start, min(start + capacity, n)))
                         for start in range(0, n, capacity))
    return items


def _decreasing(items):
    """Longest first; equal lengths keep their input order so results are deterministic."""
    return sorted(range(len(items)), key=lambda k: -items[k][0])


class _RoomCounts:
    """How many open packs have each amount of remaining room 0..capacity (a Fenwick tree).

    `smallest_at_least(s)` finds the least room r >= s held by some pack in O(log capacity): count
    the packs with room < s, then descend the tree to the next one.
    """

    def __init__(self, capacity: int):
        self.size = capacity + 1
        self.tree = [0] * (self.size + 1)
        self.total = 0
        self.top_bit = 1 << (self.size.bit_length() - 1)

    def add(self, room: int, delta: int) -> None:
        self.total += delta
        position = room + 1
        while position <= self.size:
            self.tree[position] += delta
            position += position & -position

    def _count_below(self, room: int) -> int:
        count, position = 0, room
        while position > 0:
            count += self.tree[position]
            position -= position & -position
        return count

    def smallest_at_least(self, room: int) -> int | None:
        rank = self._count_below(room) + 1
        if rank > self.total:
            return None
        position, step = 0, self.top_bit
        while step:
            if position + step <= self.size and self.tree[position + step] < rank:
                position += step
                rank -= self.tree[position]
            step >>= 1
        return position


def _best_fit_decreasing(items, capacity: int) -> list[list[int]]:
    rooms = _RoomCounts(capacity)
    packs_with_room: dict[int, list[int]] = {}
    packs: list[list[int]] = []
    room_of: list[int] = []
    for k in _decreasing(items):
        size = items[k][0]
        room = rooms.smallest_at_least(size)
        if room is None:
            pack = len(packs)
            packs.append([])
            room_of.append(capacity)
        else:
            pack = packs_with_room[room].pop()
            rooms.add(room, -1)
        packs[pack].append(k)
        room_of[pack] -= size
        rooms.add(room_of[pack], 1)
        packs_with_room.setdefault(room_of[pack], []).append(pack)
    return packs


def _first_fit_decreasing(items, capacity: int) -> list[list[int]]:
    """Leftmost pack with enough room via a max-tree over pack slots; unopened slots hold `capacity`."""
    slots = 1 << max(len(items) - 1, 0).bit_length()
    max_room = [capacity] * (2 * slots)
    packs: list[list[int]] = []
    for k in _decreasing(items):
        size = items[k][0]
        node = 1
        while node < slots:
            node = 2 * node if max_room[2 * node] >= size else 2 * node + 1
        pack = node - slots
        if pack == len(packs):
            packs.append([])
        packs[pack].append(k)
        max_room[node] -= size
        node //= 2
        while node:
            max_room[node] = max(max_room[2 * node], max_room[2 * node + 1])
            node //= 2
    return packs


def _sequential(items, capacity: int) -> list[list[int]]:
    packs: list[list[int]] = []
    room = 0
    for k, (size, _) in enumerate(items):
        if size > room:
            packs.append([])
            room = capacity
        packs[-1].append(k)
        room -= size
    return packs


_PACKERS = {"bfd": _best_fit_decreasing, "ffd": _first_fit_decreasing, "sequential": _sequential}


def _entry_order(entry: int | Piece) -> tuple[int, int]:
    return (entry.index, entry.start) if isinstance(entry, Piece) else (entry, 0)


def pack_lengths(lengths, capacity: int, strategy: str = "bfd", oversize: str = "error") -> PackResult:
    """Group sequences into packs of at most `capacity` tokens.

    Args:
        lengths: token count of every sequence (list of ints or a 1-D integer tensor), each >= 1.
        capacity: tokens per pack (e.g. the tokens of one padding-free row).
        strategy: ``"bfd"`` (best-fit decreasing), ``"ffd"`` (first-fit decreasing) or
            ``"sequential"`` (greedy in the given order).
        oversize: what to do with a sequence longer than `capacity`: ``"error"`` (ValueError),
            ``"split"`` (cut into pieces of `capacity` tokens, each packed on its own) or
            ``"truncate"`` (keep its first `capacity` tokens as one piece).

    Returns:
        :class:`PackResult`; every index appears in exactly one pack (with ``"split"``, each
        piece of a long sequence appears exactly once). See the module docstring for the entries.

    >>> result = pack_lengths([5, 3, 4, 2, 6], capacity=8)
    >>> result.packs, result.pack_tokens, round(result.fill_ratio, 3)
    ([[3, 4], [0, 1], [2]], [8, 8, 4], 0.833)
    >>> pack_lengths([5, 20, 3], capacity=8, oversize="split").packs
    [[Piece(index=1, start=0, stop=8)], [Piece(index=1, start=8, stop=16)], [0, 2], [Piece(index=1, start=16, stop=20)]]
    """
    values = check_lengths("lengths", lengths)
    capacity = _check_capacity(capacity)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if oversize not in OVERSIZE:
        raise ValueError(f"oversize must be one of {OVERSIZE}, got {oversize!r}")
    items = _items(values, capacity, oversize)
    grouped = _PACKERS[strategy](items, capacity)
    packs = [sorted((items[k][1] for k in members), key=_entry_order) for members in grouped]
    pack_tokens = [sum(items[k][0] for k in members) for members in grouped]
    return PackResult(packs=packs, pack_tokens=pack_tokens, capacity=capacity)


__all__ = ["PackResult", "Piece", "pack_lengths"]
