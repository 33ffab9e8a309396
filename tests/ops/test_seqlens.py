import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padfree import _ext
from padfree.ops.seqlens import cu_seqlens_from_position_ids
from padfree.reference.seqlens import cu_seqlens_from_position_ids as reference


def position_ids_from(lengths, rows=1):
    row = torch.cat([torch.arange(n) for n in lengths])
    return row.repeat(rows, 1)


def expected(lengths, rows=1):
    starts, total = [], 0
    for _ in range(rows):
        for n in lengths:
            starts.append(total)
            total += n
    cu = starts + [total] * (total + 1 - len(starts))
    return torch.tensor(cu, dtype=torch.int32), max(lengths)


@pytest.mark.parametrize("impl", ["reference", "native"])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), rows=st.integers(1, 3))
@settings(max_examples=40, deadline=None)
def test_offsets_match_the_lengths(impl, lengths, rows):
    if impl == "native" and not _ext.has_kernel("cu_seqlens_from_position_ids", torch.device("cpu")):
        pytest.fail("padfree._C did not build: " + str(_ext.status()["error"]))
    fn = reference if impl == "reference" else torch.ops.padfree.cu_seqlens_from_position_ids
    cu_seqlens, max_seqlen = fn(position_ids_from(lengths, rows))
    want_cu, want_max = expected(lengths, rows)
    assert torch.equal(cu_seqlens, want_cu)
    assert max_seqlen.dtype == torch.int32 and max_seqlen.dim() == 0 and int(max_seqlen) == want_max


def test_non_consecutive_positions_start_a_sequence():
    ids = torch.tensor([[5, 6, 7, 0, 1, 9, 10]])
    cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(ids)
    assert cu_seqlens.tolist()[:4] == [0, 3, 5, 7] and int(max_seqlen) == 3


def test_public_op_uses_native_kernel_and_agrees():
    ids = position_ids_from([3, 1, 7, 2])
    assert _ext.load(), _ext.status()
    got = cu_seqlens_from_position_ids(ids)
    want = reference(ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_input():
    with pytest.raises(TypeError, match="int64"):
        cu_seqlens_from_position_ids(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty"):
        cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.int64))


def test_compiles_without_graph_break():
    ids = position_ids_from([4, 2, 5])
    compiled = torch.compile(cu_seqlens_from_position_ids, fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled(ids), reference(ids)))
