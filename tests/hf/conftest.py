"""Fixtures of the model proofs: every proof runs on the reference backend and on the Triton kernels."""

from __future__ import annotations

import pytest

from tests.conftest import backend_fixture


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """The reference backend, or the Triton kernels interpreted on CPU (`triton_cpu`) at their own tiles."""
    yield from backend_fixture(request, None)
