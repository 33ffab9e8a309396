"""What every benchmark result records about where it ran: the device, the versions, the load."""

from __future__ import annotations

import glob
import importlib
import os
import platform
import statistics
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "transformers", "peft", "flash_attn", "padfree"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = "not installed"
    return found


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes), None where the OS keeps none.

    On a machine with fewer cores than its load, every timing is slowed by other work: a result
    measured at load 8 on 2 cores is not the one a quiet machine gives.
    """
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_frequency_mhz() -> float | None:
    """The mean current clock of the CPUs in MHz (cpufreq, else /proc/cpuinfo), None where unreadable."""
    values = []
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"):
        try:
            values.append(int(Path(path).read_text()) / 1000)
        except (OSError, ValueError):
            continue
    if not values:
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
        except OSError:
            return None
        values = [float(line.split(":")[1]) for line in lines if line.startswith("cpu MHz")]
    return round(statistics.mean(values), 1) if values else None


def conditions() -> dict[str, object]:
    """The machine's state now: load averages and CPU clock (recorded before and after a run)."""
    return {"load_average": load_average(), "cpu_mhz": cpu_frequency_mhz(), "cpu_count": os.cpu_count()}
