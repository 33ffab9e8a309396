"""runtime.pick: which candidate launch configuration runs, and when candidates are timed."""

import pytest
import torch

from padfree.kernels import runtime

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


@pytest.fixture
def timings(monkeypatch):
    """Fake do_bench: each candidate's time comes from the table; calls are counted."""
    table, calls = {}, []

    def bench(fn):
        candidate = fn()
        calls.append(candidate)
        return table[candidate]

    monkeypatch.setattr(runtime, "_bench", bench)
    monkeypatch.setattr(runtime, "_capturing", lambda: False)
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "_CHOICES", {})
    return table, calls


def test_the_fastest_candidate_is_kept_per_key(timings):
    table, calls = timings
    table.update({"a": 2.0, "b": 0.5, "c": 1.0})
    assert runtime.pick(("k", 1), ["a", "b", "c"], lambda c: c, CUDA) == 1
    assert calls == ["a", "b", "c"]
    assert runtime.pick(("k", 1), ["a", "b", "c"], lambda c: c, CUDA) == 1
    assert calls == ["a", "b", "c"]  # cached: not timed again
    table.update({"a": 0.1})
    assert runtime.pick(("k", 2), ["a", "b", "c"], lambda c: c, CUDA) == 0  # another key is timed anew


def test_the_default_without_timing(timings, monkeypatch):
    table, calls = timings
    table.update({"a": 2.0, "b": 0.5})
    assert runtime.pick(("k",), ["a", "b"], lambda c: c, torch.device("cpu")) == 0
    assert runtime.pick(("k",), ["a"], lambda c: c, CUDA) == 0
    monkeypatch.setattr(runtime, "_capturing", lambda: True)
    assert runtime.pick(("k",), ["a", "b"], lambda c: c, CUDA) == 0  # a CUDA graph is being captured
    monkeypatch.setattr(runtime, "_capturing", lambda: False)
    monkeypatch.setattr(runtime, "AUTOTUNE", False)
    assert runtime.pick(("k",), ["a", "b"], lambda c: c, CUDA) == 0  # PADFREE_AUTOTUNE unset (the default)
    assert calls == [] and runtime._CHOICES == {}
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    assert runtime.pick(("k",), ["a", "b"], lambda c: c, CUDA) == 1


def test_force_choice_is_per_launcher_and_restored(timings):
    with runtime.force_choice("k", 2):
        assert runtime.pick(("k",), ["a", "b", "c"], lambda c: c, torch.device("cpu")) == 2
        assert runtime.pick(("other",), ["a", "b", "c"], lambda c: c, torch.device("cpu")) == 0
    assert runtime.pick(("k",), ["a", "b", "c"], lambda c: c, torch.device("cpu")) == 0


def test_shape_bucket_is_the_next_power_of_two():
    assert [runtime.shape_bucket(n) for n in (0, 1, 2, 3, 1024, 1025, 16000)] == [1, 1, 2, 4, 1024, 2048, 16384]


def test_launchers_run_on_their_input_device(monkeypatch):
    """Triton launches on the current CUDA device: a launcher switches to its input's GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(str(self.device))

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Device)

    @runtime.on_input_device
    def launcher(tensors, x, scale=1.0):
        entered.append("launch")
        return scale

    with FakeTensorMode():
        on_gpu = torch.empty(2, device="cuda:1")
    assert launcher([on_gpu], on_gpu, scale=2.0) == 2.0
    assert entered == ["cuda:1", "launch", "exit"]
    entered.clear()
    assert launcher([], torch.empty(2)) == 1.0
    assert entered == ["launch"]


class _TooBig:
    """Stands in for launches: the named candidates raise Triton's OutOfResources, the others run."""

    def __init__(self, too_big):
        from triton.runtime.errors import OutOfResources

        self.error, self.too_big, self.launched = OutOfResources, set(too_big), []

    def __call__(self, candidate):
        self.launched.append(candidate)
        if candidate in self.too_big:
            raise self.error(128 * 1024, 99 * 1024, "shared memory")
        return f"ran {candidate}"


@pytest.fixture
def fresh_unfit(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(runtime, "_UNFIT", {})


def test_a_candidate_out_of_resources_is_skipped_and_remembered(fresh_unfit):
    launch = _TooBig({"big"})
    tensor = torch.zeros(2)
    assert runtime.launch_tuned("k", ["big", "small", "tiny"], launch, tensor, (8,)) == "ran small"
    assert launch.launched == ["big", "small"]
    assert runtime.launch_tuned("k", ["big", "small", "tiny"], launch, tensor, (8,)) == "ran small"
    assert launch.launched == ["big", "small", "small"]  # the device's default is now "small"


def test_no_candidate_fits_is_a_clear_error(fresh_unfit):
    launch = _TooBig({"big", "small"})
    with pytest.raises(RuntimeError, match="no launch configuration of k fits cpu: all 2 candidates"):
        runtime.launch_tuned("k", ["big", "small"], launch, torch.zeros(2))
    assert launch.launched == ["big", "small"]


def test_a_forced_candidate_does_not_fall_back(fresh_unfit):
    launch = _TooBig({"big"})
    with runtime.force_choice("k", 0), pytest.raises(launch.error):
        runtime.launch_tuned("k", ["big", "small"], launch, torch.zeros(2))


def test_the_tuner_skips_candidates_out_of_resources(timings, fresh_unfit, monkeypatch):
    table, calls = timings
    table.update({"small": 2.0, "tiny": 3.0})
    too_big = _TooBig({"big"})

    def bench(fn):
        result = fn()
        calls.append("timed")
        return table[result.removeprefix("ran ")]

    monkeypatch.setattr(runtime, "_bench", bench)
    assert runtime.pick(("k", 1), ["big", "small", "tiny"], too_big, CUDA) == 1
    assert too_big.launched == ["big", "small", "tiny"] and calls == ["timed", "timed"]
    with pytest.raises(RuntimeError, match="no launch configuration of k fits cuda"):
        runtime.pick(("k", 2), ["big", "small"], _TooBig({"big", "small"}), CUDA)
