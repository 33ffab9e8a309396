"""Shared pieces of the pytest-benchmark suites: device facts, versions, timing, extra_info.

Every suite records, per benchmark, `extra_info` with shape, dtype, backend, device name,
versions, TFLOP/s (from the FLOP count the suite passes in), GB/s (from the bytes it passes in),
peak memory (CUDA) and, for the forward+backward cases, `saved_bytes`: the activations the
forward saves for backward (`padfree.benchmark.memory.SavedTensors`, any device). Timings
synchronise the device inside the timed function, so pytest-benchmark's wall-clock stats are what
a caller waits for: the host's work to launch the kernels plus the device's; rounds rotate nothing,
so suites size their inputs well past the L2 cache on a GPU. On CUDA `run` also splits a call into
`host_s` (the host's time to return from an unsynchronised call on an idle device: Python,
checks, launches) and `device_s` (CUDA events around the call queued behind a sleep kernel, so the
host has launched every kernel before the device reaches the first: the kernels' time alone),
medians over the same number of rounds.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable

import torch

from padfree.benchmark import machine, memory


device_name = machine.device_name
versions = machine.versions


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device while running `fn` once (None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# The sleep kernel before a `device_s` measurement holds the stream for twice the host time the
# round just measured (at least 5 ms), counted in cycles of a clock no GPU here exceeds (2 GHz).
SLEEP_CLOCK_HZ = 2e9
MIN_SLEEP_S = 5e-3


def host_and_device_seconds(fn: Callable[[], object], device: torch.device, rounds: int) -> tuple[float, float]:
    """(median host seconds to launch `fn` on an idle CUDA device, median device seconds of its
    kernels): see the module docstring."""
    host, kernels = [], []
    for _ in range(rounds):
        synchronize(device)
        started = time.perf_counter()
        fn()
        host.append(time.perf_counter() - started)
        synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(SLEEP_CLOCK_HZ * max(MIN_SLEEP_S, 2 * host[-1])))
        begin.record()
        fn()
        end.record()
        synchronize(device)
        kernels.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(host), statistics.median(kernels)


def saved_bytes(forward: Callable[[], object], existing) -> int:
    """Bytes saved for backward by one call of `forward`, the storages of `existing` excluded."""
    with memory.SavedTensors(existing) as saved:
        forward()
    return saved.bytes


def run(benchmark, fn: Callable[[], object], *, device: torch.device, flops: float | None = None,
        bytes_moved: float | None = None, tokens: int | None = None, rounds: int | None = None,
        warmup_rounds: int = 3, forward: Callable[[], object] | None = None, existing=(), **extra) -> None:
    """Time `fn` (synchronised) with pytest-benchmark and record the standard extra_info.

    `flops` / `bytes_moved` / `tokens` are per call of `fn`; TFLOP/s, GB/s and tokens/s use the
    median time, and are left out under --benchmark-disable (or xdist), where nothing is timed.
    `forward` (the forward half of a forward+backward `fn`) is run once more, untimed, to count
    its saved activations beyond the `existing` tensors (inputs and weights).
    Extra keyword arguments (shape, dtype, backend, ...) go into extra_info as they are.
    """

    def timed():
        result = fn()
        synchronize(device)
        return result

    if rounds is None:
        rounds = 20 if device.type == "cuda" else 3
    peak = peak_memory(timed, device)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    info = benchmark.extra_info
    info.update({key: (str(value) if isinstance(value, (torch.dtype, torch.device)) else value)
                 for key, value in extra.items()})
    info["device"] = device_name(device)
    info["versions"] = versions()
    info["date"] = datetime.date.today().isoformat()
    info["peak_memory_bytes"] = peak
    info["saved_bytes"] = None if forward is None else saved_bytes(forward, existing)
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, nothing was timed
        return
    median = benchmark.stats.stats.median
    info["median_s"] = median
    if device.type == "cuda":
        info["host_s"], info["device_s"] = host_and_device_seconds(fn, device, rounds)
    if flops is not None:
        info["tflops"] = flops / median / 1e12
    if bytes_moved is not None:
        info["gbps"] = bytes_moved / median / 1e9
    if tokens is not None:
        info["tokens_per_s"] = tokens / median
