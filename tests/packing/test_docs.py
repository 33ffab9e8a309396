import doctest
import importlib

import pytest

import padfree.packing


@pytest.mark.parametrize("module", ["binpack", "collator", "loss", "sampler"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(f"padfree.packing.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_exports():
    assert sorted(padfree.packing.__all__) == sorted(
        ["MultipackBatchSampler", "PackResult", "PaddingFreeCollator", "Piece", "count_loss_sequences",
         "count_loss_tokens", "pack_lengths", "packed_cross_entropy"])
    assert all(hasattr(padfree.packing, name) for name in padfree.packing.__all__)
