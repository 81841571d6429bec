"""Peak memory of a call: CUDA's allocator peak on GPU, peak resident-set growth of the process on CPU."""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _linux_peak_rss() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _release_free_heap() -> None:
    # Hand memory that the C allocator keeps after frees back to the OS, so a call's allocations show as RSS growth.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_linux_peak_rss() -> bool:
    # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0).
    _release_free_heap()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _linux_peak_rss() is not None


def _sampled_peak_rss(function: Callable[[], Any], interval_s: float) -> tuple[int, int]:
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        function()
    finally:
        done.set()
        sampler.join()
    return baseline, max(peak, process.memory_info().rss)


def peak_memory_bytes(
    function: Callable[[], Any], device: torch.device | str = "cpu", interval_s: float = 0.0005
) -> int:
    """Bytes of peak memory used while ``function()`` runs, above what was in use before it started.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the kernel's exact peak-RSS mark where it can be reset
    (Linux, after returning the allocator's free memory to the OS), else RSS sampled every ``interval_s`` by a
    thread (a lower bound). Memory held before the call (model weights) is not counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if _reset_linux_peak_rss():
        baseline = psutil.Process().memory_info().rss
        function()
        return max(0, _linux_peak_rss() - baseline)
    baseline, peak = _sampled_peak_rss(function, interval_s)
    return peak - baseline
