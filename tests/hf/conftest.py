"""Fixtures of the model proofs: every proof runs on the reference backend and on the Triton kernels."""

from __future__ import annotations

import pytest

import padfree


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """The reference backend, or the Triton kernels interpreted on CPU (`triton_cpu`)."""
    if request.param == "reference":
        with padfree.use_backend("reference"):
            yield "reference"
        return
    request.getfixturevalue("triton_cpu")
    yield "triton"
