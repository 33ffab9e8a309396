"""Test setup: Triton kernels run in the interpreter on CPU tensors unless a GPU is present.

Kernel outputs are NaN-poisoned (PADFREE_POISON_OUTPUTS=1) so an unwritten element fails.
The interpreter's bf16 arithmetic is fixed by tests/bf16_interpreter.py, so bf16 kernels run too.

`TRITON_INTERPRET` must be set before triton is imported (padfree.kernels.runtime explains why),
so it is decided here, before anything imports padfree. On a CUDA machine kernels compile for the
GPU and the `gpu` tests run (`pytest -m gpu`); the interpreter tests then need
`TRITON_INTERPRET=1 pytest` in a separate run.
"""

import contextlib
import os
import sys
import zlib

os.environ.setdefault("PADFREE_POISON_OUTPUTS", "1")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pytest
import torch

from padfree.kernels import runtime

INTERPRETING = runtime.HAS_TRITON and runtime.interpreting()
if runtime.HAS_TRITON and os.environ["TRITON_INTERPRET"] == "1" and not INTERPRETING:
    sys.exit("tests/conftest.py: triton was imported before TRITON_INTERPRET=1 took effect")
if INTERPRETING:
    from tests import bf16_interpreter

    bf16_interpreter.install()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU with compiled Triton kernels")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold directory names (a checkout
        # in a folder named gpu skipped every test)
        if item.get_closest_marker("gpu") is not None and (not torch.cuda.is_available() or INTERPRETING):
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_cpu():
    """Run padfree ops on CPU tensors through the real Triton kernels (interpreter)."""
    if not INTERPRETING:
        pytest.skip("kernels are compiled for the GPU in this run; interpreter tests need TRITON_INTERPRET=1")
    import padfree

    with padfree.use_backend("triton"):
        yield


def backend_fixture(request, attention_tiles: tuple[int, int] | None):
    """Body of the `backend` fixtures of tests/ops and tests/hf: the reference backend, or the Triton
    kernels interpreted on CPU (`triton_cpu`), with the attention tiles forced to `attention_tiles`."""
    import padfree

    if request.param == "reference":
        with padfree.use_backend("reference"):
            yield "reference"
        return
    request.getfixturevalue("triton_cpu")
    from padfree.kernels import attention

    with attention.override_tiles(*attention_tiles) if attention_tiles else contextlib.nullcontext():
        yield "triton"


@contextlib.contextmanager
def cuda_syncs_raise():
    """GPU tests: inside, any host sync on CUDA raises (torch.cuda.set_sync_debug_mode("error")), with
    the value checks off as in training (PADFREE_CHECKS=0). Wrap only the op calls: the tests' own
    comparisons read results on the host. tests/test_no_sync.py checks the same on CPU."""
    previous_mode, previous_checks = torch.cuda.get_sync_debug_mode(), os.environ.get("PADFREE_CHECKS")
    os.environ["PADFREE_CHECKS"] = "0"
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous_mode)
        if previous_checks is None:
            del os.environ["PADFREE_CHECKS"]
        else:
            os.environ["PADFREE_CHECKS"] = previous_checks


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, never zeros. crc32 of the
    test id is the same in every process; str hash() is salted per process."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
