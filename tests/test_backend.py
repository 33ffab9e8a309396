import warnings

import pytest
import torch

import padfree
from padfree import _backend


def test_use_backend_sets_and_restores():
    before = _backend.requested_backend()
    with padfree.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        with padfree.use_backend("triton"):
            assert _backend.requested_backend() == "triton"
        assert _backend.requested_backend() == "reference"
    assert _backend.requested_backend() == before


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="one of"):
        padfree.use_backend("cudnn")


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("PADFREE_BACKEND", "reference")
    assert _backend.requested_backend() == "reference"
    monkeypatch.setenv("PADFREE_BACKEND", "fast")
    with pytest.raises(ValueError, match="PADFREE_BACKEND"):
        _backend.requested_backend()


def test_auto_uses_reference_on_cpu_without_native_kernel():
    assert _backend.resolve("op", torch.device("cpu")) == "reference"


def test_auto_prefers_native_kernel():
    assert _backend.resolve("op", torch.device("cpu"), has_native_kernel=True) == "cuda"


def test_unsupported_input_falls_back_with_one_warning(triton_cpu):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got = _backend.resolve("op_x", torch.device("cpu"), triton_unsupported=lambda: "head_dim 512 > 256")
        assert got == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, _backend.PadfreeFallbackWarning)]
    assert len(messages) == 1 and "head_dim 512 > 256" in messages[0]


def test_reason_is_not_computed_when_not_needed():
    def explode():
        raise AssertionError("the Triton reason must not be evaluated for auto on CPU")

    assert _backend.resolve("op", torch.device("cpu"), triton_unsupported=explode) == "reference"


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import sys, padfree; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
