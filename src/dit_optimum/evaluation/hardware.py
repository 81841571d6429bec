"""The hardware every result records: CPU model, core and thread counts, torch version, GPU."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def hardware_description() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def hardware_text(info: Mapping[str, Any] | None) -> str:
    """``hardware_description()`` in one line: ``AMD EPYC, 2 cores (2 threads), torch 2.14.1``."""
    if not info:
        return "unknown hardware"
    text = f"{info.get('cpu')}, {info.get('cpu_count')} cores ({info.get('threads')} threads)"
    if info.get("gpu"):
        text = f"{info['gpu']} with {text}"
    return f"{text}, torch {info.get('torch')}"


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in /proc/cpuinfo (None where it cannot be read or has no such line)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str | None:
    return _cpuinfo("model name")


# CPU flags that decide which low-precision matmul paths are fast (Linux /proc/cpuinfo names)
MATMUL_FLAGS: tuple[str, ...] = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx2")


def cpu_features() -> dict[str, bool]:
    """Which of ``MATMUL_FLAGS`` this CPU has (all False where /proc/cpuinfo cannot be read)."""
    flags = set((_cpuinfo("flags") or "").split())
    return {flag: flag in flags for flag in MATMUL_FLAGS}
