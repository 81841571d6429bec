"""Where results go: atomic JSON/CSV writes (temp file, then rename) and the hardware every result records."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_file


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


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    with atomic_file(path) as temporary, temporary.open("w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """JSON (indented) written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_csv_atomic(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Flat rows as CSV, written atomically; columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
