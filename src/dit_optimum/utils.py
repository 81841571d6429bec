"""Small shared helpers: atomic file and folder writes, argument checks, the save options dit-optimum accepts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DiTOptimumError


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target`` whole, on error it is removed.

    Readers never see a half-written folder: the old one stays until the new one is complete.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(staging, target)
        return
    backup = target.with_name(f".{target.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(target, backup)
    os.replace(staging, target)
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; on success it replaces ``target``, on error it is removed.

    Readers never see a half-written file (the rename is atomic within one folder).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_positive_integers(**values: Any) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer (booleans are refused)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DiTOptimumError(f"`{name}`={value!r} must be a positive integer.")


def pop_unsupported_save_options(kwargs: dict) -> None:
    """Remove ``safe_serialization`` / ``push_to_hub`` from save kwargs, refusing pickle files and in-save pushes."""
    if kwargs.pop("safe_serialization", True) is not True:
        raise DiTOptimumError("`safe_serialization` must be True: dit-optimum saves safetensors only.")
    if kwargs.pop("push_to_hub", False):
        raise DiTOptimumError("`push_to_hub` is not supported here: save, then upload the folder.")
