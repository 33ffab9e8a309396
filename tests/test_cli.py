import subprocess
import sys

from padfree import cli


def test_env_reports_versions_and_backends(capsys):
    assert cli.main(["env", "--no-build"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "triton", "GPU", "usable backends", "padfree._C"):
        assert row in out


def test_env_no_build_leaves_the_extension_loadable(capsys, monkeypatch):
    """`env --no-build` in a process that has not loaded padfree._C yet reports that, and a later
    load in the same process still builds it (it used to set PADFREE_BUILD_EXT=0 for good)."""
    import os

    from padfree import _ext

    monkeypatch.setattr(_ext, "_state", {**_ext._state, "loaded": None, "how": None, "error": None})
    monkeypatch.setattr(_ext, "_fakes", {})  # the spy load registers nothing of the real process
    builds = []
    monkeypatch.setattr(_ext, "_build_just_in_time", lambda: builds.append(1) or "spy build")
    assert cli.main(["env", "--no-build"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("padfree._C"))
    assert "not loaded yet" in row and builds == [] and _ext._state["loaded"] is None
    assert "PADFREE_BUILD_EXT" not in os.environ or os.environ["PADFREE_BUILD_EXT"] != "0"
    assert _ext.load() and builds == [1] and _ext._state["how"] == "spy build"


def test_unknown_subcommand_fails():
    done = subprocess.run([sys.executable, "-m", "padfree.cli", "frobnicate"], capture_output=True, text=True)
    assert done.returncode != 0 and "invalid choice" in done.stderr


def test_env_lists_cuda_only_where_it_can_run(capsys):
    import torch

    assert cli.main(["env", "--no-build"]) == 0
    usable = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("usable backends"))
    assert ("cuda" in usable) == torch.cuda.is_available() and "reference" in usable


def test_env_says_whether_padfree_checks_this_triton(capsys, monkeypatch):
    import triton

    from padfree.kernels import runtime

    for version, note in (("3.6.0", "(checked)"), ("3.9.1", "(checked)"),
                          ("3.4.0", "(unchecked: padfree checks its kernels under Triton 3.6 and 3.9, not 3.4.0")):
        monkeypatch.setattr(triton, "__version__", version)
        assert cli.main(["env", "--no-build"]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("triton"))
        assert row.split(None, 1)[1].startswith(f"{version} {note}"), row
    assert runtime.unchecked_triton("3.10.0") is not None


def test_first_gpu_launch_warns_once_under_an_unchecked_triton(monkeypatch):
    import warnings

    import triton

    from padfree.kernels import runtime

    import contextlib

    import torch

    class CudaLooking(torch.Tensor):  # what a launcher's first argument is on a GPU
        @property
        def device(self):
            return torch.device("cuda", 0)

    launches = []
    launcher = runtime.on_input_device(lambda tensor: launches.append(tensor))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    runtime._warn_unchecked_triton.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launcher(torch.empty(2).as_subclass(CudaLooking))
        launcher(torch.empty(2).as_subclass(CudaLooking))
        launcher(torch.empty(2))
    assert len(launches) == 3
    assert [str(w.message) for w in caught] == [f"padfree: {runtime.unchecked_triton('3.4.0')}"]
    runtime._warn_unchecked_triton.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime._warn_unchecked_triton()
    assert caught == []
    runtime._warn_unchecked_triton.cache_clear()
