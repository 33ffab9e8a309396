import pytest
import torch

from padfree import _checks


def cu(values):
    return torch.tensor(values, dtype=torch.int32)


def test_valid_cu_seqlens_pass():
    _checks.check_cu_seqlens("cu", cu([0, 3, 3, 9]), 10, 6, "max", values=True)


@pytest.mark.parametrize("values, total, longest, match", [
    ([1, 3, 9], 10, 6, "start at 0"),
    ([0, 5, 3, 9], 10, 6, "non-decreasing"),
    ([0, 3, 11], 11 - 1, 8, "exceeds"),
    ([0, 3, 9], 10, 5, "smaller than the longest"),
    ([0], 10, 5, "batch"),
])
def test_bad_cu_seqlens_are_named(values, total, longest, match):
    with pytest.raises(ValueError, match=match):
        _checks.check_cu_seqlens("cu", cu(values), total, longest, "max", values=True)


def test_cu_seqlens_dtype():
    with pytest.raises(TypeError, match="int32"):
        _checks.check_cu_seqlens("cu", torch.tensor([0, 3]), 3, 3, "max", values=True)


def test_value_checks_can_be_disabled(monkeypatch):
    assert _checks.value_checks_enabled(None)
    assert not _checks.value_checks_enabled(False)
    monkeypatch.setenv("PADFREE_CHECKS", "0")
    assert not _checks.value_checks_enabled(None)
    assert _checks.value_checks_enabled(True)
    _checks.check_cu_seqlens("cu", cu([0, 5, 3]), 10, 1, "max", values=_checks.value_checks_enabled(None))


def test_device_and_dtype_mismatch_messages():
    a = torch.zeros(2)
    with pytest.raises(TypeError, match="a float32, b float16"):
        _checks.expect_same_dtype(a=a, b=a.half())
    with pytest.raises(TypeError, match="dtype in"):
        _checks.expect_dtype("x", a, (torch.int32,))
