"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest

from tests.conftest import backend_fixture


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """The reference backend, or the Triton kernels interpreted on CPU with 16 x 16 attention tiles."""
    yield from backend_fixture(request, (16, 16))
