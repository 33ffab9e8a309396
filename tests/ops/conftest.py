"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest

import padfree


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """The reference backend, or the Triton kernels interpreted on CPU with 16 x 16 tiles."""
    if request.param == "reference":
        with padfree.use_backend("reference"):
            yield "reference"
        return
    request.getfixturevalue("triton_cpu")
    from padfree.kernels import attention as kernels

    with kernels.override_tiles(16, 16):
        yield "triton"
