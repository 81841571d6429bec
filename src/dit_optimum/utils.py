"""Small shared helpers: safe folder saves, atomic file writes, folder locks, argument checks, save options."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .errors import DiTOptimumError, MissingPathError

T = TypeVar("T")
LOCK_FILE = ".dit_optimum.lock"
# Weight files a save replaces: stale ones left beside new ones could be picked up by a later load.
_WEIGHT_PREFIXES = ("diffusion_pytorch_model",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, directory: bool = False) -> None:
    # mkstemp / mkdtemp create 0600 / 0700: give finished files the permissions any other file here would get.
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def check_save_target(
    target: str | os.PathLike, marker: str, overwrite: bool = False, parameter: str = "save_directory"
):
    """Refuse a target that is a file, or a non-empty folder without ``marker`` (not an earlier save), unless
    ``overwrite``. Returns the target as a ``Path``."""
    target = Path(target)
    if target.exists() and not target.is_dir() and not overwrite:
        raise DiTOptimumError(
            f"`{parameter}`={str(target)!r} is a file, not a folder: choose a folder, or pass overwrite=True "
            "(--overwrite) to replace the file."
        )
    foreign = target.is_dir() and not (target / marker).is_file()
    if foreign and not overwrite and any(entry.name != LOCK_FILE for entry in target.iterdir()):
        raise DiTOptimumError(
            f"`{parameter}`={str(target)!r} already holds files and is not an earlier save (no {marker}): "
            "choose an empty or new folder, or pass overwrite=True (--overwrite) to write into it "
            "(its other files are left alone)."
        )
    return target


@contextmanager
def save_directory(
    target: str | os.PathLike, marker: str, overwrite: bool = False, parameter: str = "save_directory"
) -> Iterator[Path]:
    """Yield an empty staging folder to save into; on success its files move into ``target`` one by one.

    Like diffusers' ``save_pretrained``: files of the save replace their namesakes (each rename is atomic), other
    files in ``target`` are left alone, stale weight files beside a replaced component are removed. ``target`` must
    be new, empty, or an earlier save (it holds ``marker``), unless ``overwrite`` (``check_save_target``). On error
    nothing in ``target`` changes.
    """
    target = check_save_target(target, marker, overwrite, parameter)
    created = not target.exists()
    try:
        if target.exists() and not target.is_dir():
            target.unlink()  # overwrite=True on a file: the user asked for it
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".dit_optimum-staging-", dir=target))
    except OSError as error:  # a parent that is a file, no permission, a read-only disk
        raise DiTOptimumError(f"`{parameter}`={str(target)!r} cannot be written: {error.strerror or error}.") from None
    try:
        yield staging
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        # The marker goes last: a reader never sees a new index beside old weights.
        files.sort(key=lambda p: p.name == marker)
        descriptor = os.open(target, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # two saves into one folder commit one after the other
            written = {p.relative_to(staging) for p in files}
            _remove_stale_weights(target, written)
            for staged in files:
                relative = staged.relative_to(staging)
                destination = target / relative
                for parent in reversed(relative.parents[:-1]):
                    folder = target / parent
                    if not folder.is_dir():
                        folder.mkdir()
                _apply_umask(staged)
                os.replace(staged, destination)
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(target.iterdir()):
            target.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_weights(target: Path, written: set[Path]) -> None:
    for folder in {relative.parent for relative in written}:
        if not (target / folder).is_dir():
            continue
        for existing in (target / folder).iterdir():
            name = existing.name
            stale = name.startswith(_WEIGHT_PREFIXES) and name.endswith(_WEIGHT_SUFFIXES)
            if stale and existing.is_file() and (folder / name) not in written:
                existing.unlink()


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; on success it replaces ``target``, on error it is removed.

    Readers never see a half-written file (the rename is atomic within one folder); the file gets the usual
    permissions (umask), not the temp file's 0600.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        _apply_umask(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def folder_lock(folder: str | os.PathLike, purpose: str = "run", enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (file ``.dit_optimum.lock`` with the owner's PID) or refuse at once.

    The operating system releases the lock when its process dies, so a lock left by a killed run is stale and the
    next run takes it over. ``enabled=False`` (the non-main processes of a multi-process run) does nothing.
    """
    if not enabled:
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DiTOptimumError(f"`output_dir`={str(folder)!r} is a file, not a folder: choose a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(descriptor, 4096).decode(errors="replace")
        os.close(descriptor)
        try:
            details = json.loads(owner)
            holder = f"PID {details['pid']} on {details['host']}, {details['purpose']} since {details['started']}"
        except (ValueError, KeyError, TypeError):
            holder = "another process"
        raise DiTOptimumError(
            f"`output_dir`={str(folder)!r} is in use by {holder}: two runs on one folder would corrupt it. Wait "
            "for that run to finish (or stop it), or choose another folder."
        ) from None
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": purpose,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(owner).encode(), 0)
        yield
    finally:
        os.ftruncate(descriptor, 0)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def csv_list(value: str) -> list[str]:
    """A comma-separated command-line value as a list of stripped, non-empty entries."""
    return [item.strip() for item in value.split(",") if item.strip()]


def check_positive_integers(**values: Any) -> None:
    """Raise ``DiTOptimumError`` naming the first argument that is not a positive integer (booleans are refused)."""
    for name, value in values.items():
        if not is_integer(value) or value < 1:
            raise DiTOptimumError(f"`{name}`={value!r} must be a positive integer.")


def is_integer(value: Any) -> bool:
    """An integer (Python or NumPy), not a boolean."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    include_minimum: bool = True,
    include_maximum: bool = True,
) -> float:
    """A finite real number within the bounds, else ``DiTOptimumError`` naming ``name`` and the allowed range."""
    import numbers

    low = "" if minimum is None else ("[" if include_minimum else "(") + f"{minimum:g}"
    high = "" if maximum is None else f"{maximum:g}" + ("]" if include_maximum else ")")
    allowed = f"a finite number in {low or '(-inf'}, {high or 'inf)'}"
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if valid and minimum is not None:
        valid = value >= minimum if include_minimum else value > minimum
    if valid and maximum is not None:
        valid = value <= maximum if include_maximum else value < maximum
    if not valid:
        raise DiTOptimumError(f"`{name}`={value!r} must be {allowed}.")
    return float(value)


def pop_unsupported_save_options(kwargs: dict) -> None:
    """Remove ``safe_serialization`` / ``push_to_hub`` from save kwargs, refusing pickle files and in-save pushes."""
    if kwargs.pop("safe_serialization", True) is not True:
        raise DiTOptimumError("`safe_serialization` must be True: dit-optimum saves safetensors only.")
    if kwargs.pop("push_to_hub", False):
        raise DiTOptimumError("`push_to_hub` is not supported here: save, then upload the folder.")


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_source(value: str | os.PathLike, parameter: str) -> str:
    """A local path that exists, or a Hub repo id; a path that does not exist raises ``MissingPathError``.

    Without this, diffusers answers a mistyped local path with a Hub lookup ("Checkout your internet connection").
    """
    text = str(value)
    if not text.strip():
        raise DiTOptimumError(f"`{parameter}` is empty: give a local folder or a Hub repo id (org/name).")
    if Path(text).expanduser().exists():
        return text
    if _REPO_ID.match(text) and ".." not in text and not text.startswith("."):
        return text
    raise MissingPathError(f"`{parameter}`={text!r} does not exist (and is not a Hub repo id of the form org/name).")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), for one-line error reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_from_source(load: Callable[..., T], source: str | os.PathLike, parameter: str, **kwargs: Any) -> T:
    """``load(source, **kwargs)`` (a diffusers ``from_pretrained``) with a checked source, and file or Hub errors
    turned into one ``DiTOptimumError`` naming ``parameter``."""
    source = check_source(source, parameter)
    try:
        return load(source, **kwargs)
    except DiTOptimumError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DiTOptimumError(f"Could not load `{parameter}`={source!r}: {first_line(error)}") from error


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
