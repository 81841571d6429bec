"""The one write path: every file dit-optimum writes goes through this module.

Rules it keeps for every caller:

- A folder it writes into records what it wrote in a manifest (``.dit_optimum.manifest.json``). A file of the same
  name that the package did not write (a user's ``report.md``) is never replaced without ``overwrite``, and even
  with ``overwrite`` nothing else in the folder is removed: the only files ever deleted are stale weight files of the
  same variant that an earlier save of the package wrote (listed in the manifest).
- Nothing is created, truncated, locked or written through a symbolic link: files go to a temporary name with
  ``O_EXCL`` and are renamed into place (a rename replaces a link, never what it points to); a folder on the way that
  is a link is refused; locks open with ``O_NOFOLLOW``.
- An empty path, a target inside the source it was loaded from, or a path that is a file where a folder is needed is
  refused before any work; ``check_writable`` proves a folder writable before long work.
- Operating-system failures (full disk, read-only file system, name too long, no permission) become one
  ``OutputPathError`` line naming the path, and what was there is left intact.
- JSON is strict (no ``NaN`` / ``Infinity`` tokens): a non-finite number is refused naming the field.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import DiTOptimumError, OutputPathError

logger = logging.getLogger(__name__)
LOCK_FILE = ".dit_optimum.lock"
MANIFEST_FILE = ".dit_optimum.manifest.json"
_STAGING_PREFIX = ".dit_optimum-staging-"
_INTERNAL = (LOCK_FILE, MANIFEST_FILE)
# The package's bookkeeping files, left out of every upload (huggingface_hub ``ignore_patterns``).
UPLOAD_IGNORE_PATTERNS = [".dit_optimum*", "**/.dit_optimum*"]
# Weight files a save replaces: an old shard or index of the same variant left beside new ones could be loaded later.
_WEIGHT_FILE = re.compile(
    r"^diffusion_pytorch_model(?P<variant>(?:\.[^.\-]+)?)(?:-\d{5}-of-\d{5})?(?P<variant2>(?:\.[^.\-]+)?)"
    r"\.safetensors(?:\.index\.json)?$"
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _error_text(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextmanager
def os_errors(path: str | os.PathLike, parameter: str, action: str = "cannot be written") -> Iterator[None]:
    """Turn an operating-system failure (full disk, read-only, name too long, ...) or a safetensors write error into
    one ``OutputPathError`` naming ``parameter`` and the path."""
    from safetensors import SafetensorError

    try:
        yield
    except DiTOptimumError:
        raise
    except (OSError, SafetensorError) as error:
        raise OutputPathError(
            f"`{parameter}`={str(path)!r} {action}: {_error_text(error)} (files already there were left as they were)."
        ) from error


def check_output_path(path: str | os.PathLike | None, parameter: str = "output_dir") -> Path:
    """``path`` as a ``Path``; an empty (or blank) path is refused: it would silently mean the current folder."""
    if path is None or not str(path).strip():
        raise DiTOptimumError(f"`{parameter}` is empty: give a folder to write into (use '.' for the current one).")
    text = str(path)
    if "\x00" in text:
        raise DiTOptimumError(f"`{parameter}`={text!r} contains a NUL character: give a valid path.")
    return Path(text).expanduser()


def path_overlap(target: str | os.PathLike, source: str | os.PathLike | None) -> str | None:
    """How ``target`` lies against the existing folder ``source``, links resolved: "same", "inside" it, "around" it
    (``source`` is inside ``target``), or None (apart, or ``source`` is not a folder)."""
    if not source or not Path(str(source)).expanduser().is_dir():
        return None
    resolved, origin = Path(target).expanduser().resolve(), Path(str(source)).expanduser().resolve()
    if resolved == origin:
        return "same"
    if origin in resolved.parents:
        return "inside"
    return "around" if resolved in origin.parents else None


def check_not_inside_sources(
    target: str | os.PathLike, sources: Iterable[str | os.PathLike | None], parameter: str = "save_directory"
) -> None:
    """Refuse a target strictly inside a folder the object was loaded from (it would write a new save into, and
    replace files of, the original), naming both."""
    for source in sources:
        if path_overlap(target, source) == "inside":
            raise DiTOptimumError(
                f"`{parameter}`={str(target)!r} is inside {str(source)!r}, the folder this was loaded from: saving "
                "there would mix a new save into the original. Choose a folder outside it."
            )


def _reject_links_below(root: Path, relative: Path, parameter: str) -> None:
    """Refuse when a folder between ``root`` and ``root / relative`` is a symbolic link (a planted link would send
    the write elsewhere)."""
    current = root
    for part in relative.parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise OutputPathError(
                f"`{parameter}`: {str(current)!r} is a symbolic link; dit-optimum does not write through links. "
                "Remove it or choose another folder."
            )


def _is_regular_or_missing(path: Path) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return True
    return stat.S_ISREG(mode)


# --- the manifest ---------------------------------------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike) -> set[str] | None:
    """The relative paths the package wrote into ``folder`` (None when it has no manifest). A damaged or hostile
    manifest counts as none: it can only ever make the package more careful."""
    path = Path(folder) / MANIFEST_FILE
    if not os.path.isfile(path) or os.path.islink(path):  # os.path: a name too long is no manifest, not a crash
        return None
    content = _json_or_none(path, 8 * 1024 * 1024)
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(files, list):
        return None
    return {name for name in files if isinstance(name, str) and _is_safe_relative(name)}


def _json_or_none(path: Path, max_bytes: int) -> Any:
    """The JSON content of a file the package reads only to decide how careful to be (a manifest, a save's marker),
    through the one reader (``schemas.read_json_file``); unreadable, special or invalid counts as none."""
    from .schemas import read_json_file

    try:
        return read_json_file(path, max_bytes=max_bytes, infinities=True)
    except DiTOptimumError:
        return None


def _read_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def _is_safe_relative(name: str) -> bool:
    relative = Path(name)
    return bool(name) and not relative.is_absolute() and ".." not in relative.parts


def _write_manifest(folder: Path, files: set[str]) -> None:
    from . import __version__

    payload = {"writer": f"dit-optimum {__version__}", "files": sorted(files)}
    _replace_file(folder / MANIFEST_FILE, (json.dumps(payload, indent=2) + "\n").encode())


def _replace_file(target: Path, data: bytes) -> None:
    """Write ``data`` to a new temporary file beside ``target`` (``O_EXCL``: never an existing file or a link), flush
    it to disk and rename it over ``target``; on any failure the temporary file is removed and ``target`` unchanged."""
    descriptor, name = tempfile.mkstemp(prefix=f".{target.name[:60]}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(name)
        raise


# --- folders the package owns files in --------------------------------------------------------------------------------


_OVERWRITE_ADVICE = "pass overwrite=True (--overwrite) to replace that file (other files are left alone)"


def claim_files(
    folder: str | os.PathLike,
    names: Iterable[str],
    overwrite: bool = False,
    parameter: str = "output_dir",
    advice: str = _OVERWRITE_ADVICE,
) -> Path:
    """Before long work: refuse if ``folder`` already holds any of ``names`` that the package did not write (a user's
    file of the same name), unless ``overwrite``; refuse links and non-regular files at those names always.

    Returns the folder as a ``Path`` (not created).
    """
    folder = check_output_path(folder, parameter)
    with os_errors(folder, parameter):
        return _claim_files(folder, names, overwrite, parameter, advice)


def _claim_files(folder: Path, names: Iterable[str], overwrite: bool, parameter: str, advice: str) -> Path:
    if folder.exists() and not folder.is_dir():
        raise DiTOptimumError(f"`{parameter}`={str(folder)!r} is a file, not a folder: choose a folder.")
    if not folder.is_dir():
        return folder
    owned = read_manifest(folder) or set()
    for name in names:
        path = folder / name
        if not os.path.lexists(path):
            continue
        if path.is_symlink() or not _is_regular_or_missing(path) or os.lstat(path).st_nlink > 1:
            raise OutputPathError(
                f"`{parameter}`={str(folder)!r} holds {name!r} as a link (symbolic or hard) or special file; "
                "dit-optimum will not write through it. Remove it or choose another folder."
            )
        if name not in owned and not overwrite:
            raise DiTOptimumError(
                f"`{parameter}`={str(folder)!r} already holds {name!r}, which dit-optimum did not write: choose a new "
                f"folder, or {advice}."
            )
    return folder


def check_writable(folder: str | os.PathLike, parameter: str = "output_dir") -> Path:
    """Create ``folder`` if needed and prove it writable with a short-lived file, before any long work."""
    folder = check_output_path(folder, parameter)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise DiTOptimumError(f"`{parameter}`={str(folder)!r} is a file, not a folder: choose a folder.")
    with os_errors(folder, parameter):
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix=".dit_optimum-probe-", dir=folder)
        try:  # a few KiB really written: a full disk still creates empty files
            os.write(descriptor, b"\0" * 16384)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.unlink(name)
    return folder


@contextmanager
def staged_file(
    folder: str | os.PathLike,
    name: str,
    parameter: str = "output_dir",
    overwrite: bool = False,
    advice: str = _OVERWRITE_ADVICE,
) -> Iterator[Path]:
    """Yield a new temporary path beside ``folder / name`` for a writer that needs a path (``save_file``,
    ``savefig``); on success it is renamed into place and recorded in the folder's manifest, on error removed.

    A same-named file the package did not write is refused unless ``overwrite``; a link at that name or on the way to
    it is refused always. OS failures become one ``OutputPathError`` line; the old file stays intact.
    """
    folder = check_output_path(folder, parameter)
    if not _is_safe_relative(name):
        raise DiTOptimumError(f"Refusing to write {name!r}: not a plain relative file name.")
    target = folder / name
    with os_errors(target, parameter):
        folder.mkdir(parents=True, exist_ok=True)
        claim_files(folder, [name], overwrite, parameter, advice)
        _reject_links_below(folder, Path(name), parameter)
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name[:60]}.", suffix=".tmp", dir=target.parent)
        os.close(descriptor)
    try:
        with os_errors(target, parameter):
            yield Path(temporary)
            os.chmod(temporary, 0o666 & ~_umask())
            with _exclusive(folder):
                os.replace(temporary, target)
                _write_manifest(folder, (read_manifest(folder) or set()) | {name})
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_model_file_name(name: str) -> bool:
    """``name`` is one a model save writes (its weights or config): no other writer may take it."""
    return name == "config.json" or _WEIGHT_FILE.match(name) is not None or name.startswith("diffusion_pytorch_model")


def write_bytes(
    folder: str | os.PathLike, name: str, data: bytes, parameter: str = "output_dir", overwrite: bool = False
) -> Path:
    """Write ``folder / name`` whole (temp file, fsync, rename) and record it in the folder's manifest, under the
    rules of ``staged_file``."""
    with staged_file(folder, name, parameter, overwrite) as temporary, open(temporary, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    return Path(folder) / name


def write_text(folder: str | os.PathLike, name: str, text: str, **options: Any) -> Path:
    """``write_bytes`` for UTF-8 text."""
    return write_bytes(folder, name, text.encode(), **options)


def strict_json(payload: Any, label: str = "JSON") -> str:
    """Indented JSON with no ``NaN``/``Infinity`` tokens; a non-finite number is refused naming its field."""
    bad = _first_non_finite(payload)
    if bad is not None:
        raise DiTOptimumError(f"{label}: `{bad}` is not a finite number; refusing to write it.")
    return json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n"


def _first_non_finite(value: Any, path: str = "") -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "value"
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_non_finite(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _first_non_finite(item, f"{path}[{index}]")
            if found:
                return found
    return None


def write_json(folder: str | os.PathLike, name: str, payload: Any, **options: Any) -> Path:
    """``write_bytes`` for strict JSON."""
    return write_text(folder, name, strict_json(payload, repr(str(Path(folder) / name))), **options)


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """Flat rows as CSV; columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    # Serialises manifest updates of two processes writing into one folder (a short lock on the folder itself).
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


# --- whole saves (a pipeline, a model, a release, a Space) ------------------------------------------------------------


def check_save_target(
    target: str | os.PathLike,
    marker: str,
    overwrite: bool = False,
    parameter: str = "save_directory",
    sources: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse an empty path, a target inside a source, a target that is a file, or a non-empty folder that is not an
    earlier save (no ``marker`` and no manifest), unless ``overwrite``. Returns the target as a ``Path``."""
    target = check_output_path(target, parameter)
    with os_errors(target, parameter):  # a name too long, a folder on the way that cannot be read
        return _check_save_target(target, marker, overwrite, parameter, sources)


def _check_save_target(
    target: Path, marker: str, overwrite: bool, parameter: str, sources: Iterable[str | os.PathLike | None]
) -> Path:
    check_not_inside_sources(target, sources, parameter)
    if target.is_symlink():  # a link at the very folder written would send every file elsewhere
        raise OutputPathError(
            f"`{parameter}`={str(target)!r} is a symbolic link; dit-optimum does not write through links. Give the "
            f"folder it points to ({os.path.realpath(target)!r}) or another folder."
        )
    if target.exists() and not target.is_dir():
        if not overwrite:
            raise DiTOptimumError(
                f"`{parameter}`={str(target)!r} is a file, not a folder: choose a folder, or pass overwrite=True "
                "(--overwrite) to replace the file."
            )
        if not target.is_file() or target.is_symlink():
            raise OutputPathError(f"`{parameter}`={str(target)!r} is not a regular file or folder: choose a folder.")
    owned = read_manifest(target) if target.is_dir() else None
    # an earlier save of this kind: the package wrote its marker there (a release folder is no Space, and the reverse)
    earlier = target.is_dir() and ((owned is not None and marker in owned) or _is_package_save(target / marker))
    foreign = target.is_dir() and not earlier
    others = [entry.name for entry in target.iterdir()] if foreign else []
    others = [name for name in others if name not in _INTERNAL and not name.startswith(_STAGING_PREFIX)]
    if foreign and not overwrite and others:
        raise DiTOptimumError(
            f"`{parameter}`={str(target)!r} already holds files and is not an earlier save (no {marker}): "
            "choose an empty or new folder, or pass overwrite=True (--overwrite) to write into it "
            "(its other files are left alone)."
        )
    return target


@contextmanager
def save_directory(
    target: str | os.PathLike,
    marker: str,
    overwrite: bool = False,
    parameter: str = "save_directory",
    sources: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield an empty staging folder to save into; on success its files move into ``target`` one by one.

    Like diffusers' ``save_pretrained``: files of the save replace their namesakes (each rename is atomic) and other
    files in ``target`` are left alone; the only files removed are stale weight files of the same variant that an
    earlier save of the package wrote (so ``*.fp16.safetensors`` or a user's ``*.ema.safetensors`` stay). A namesake
    the package did not write (in a folder with a manifest) is replaced only with ``overwrite``; the replaced files
    are logged. ``target`` must be new, empty, or an earlier save (``check_save_target``). On error nothing in
    ``target`` changes, and OS failures are one ``OutputPathError`` line.
    """
    target = check_save_target(target, marker, overwrite, parameter, sources)
    created = not target.exists()
    with os_errors(target, parameter):
        if target.exists() and not target.is_dir():
            target.unlink()  # overwrite=True on a regular file: the user asked for it
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=target))
    try:
        with os_errors(target, parameter):
            yield staging
        _commit(staging, target, marker, overwrite, parameter)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        with suppress(OSError):
            if created and not any(target.iterdir()):
                target.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _open_folder(parent: int, name: str, parameter: str, where: Path) -> int:
    """The subfolder ``name`` of the open folder ``parent`` (created when missing), opened without following a link:
    a folder swapped for a link after the checks still cannot send a write elsewhere."""
    with suppress(FileExistsError):
        os.mkdir(name, 0o777, dir_fd=parent)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OutputPathError(
                f"`{parameter}`: {str(where)!r} is a symbolic link or not a folder; dit-optimum does not write through "
                "links. Remove it or choose another folder."
            ) from None
        raise


def _commit(staging: Path, target: Path, marker: str, overwrite: bool, parameter: str) -> None:
    files = sorted(p for p in staging.rglob("*") if p.is_file() and not p.is_symlink())
    files = [p for p in files if p.name not in _INTERNAL]
    # weights before their folder's config, every config before the marker: a reader (or a save killed half-way)
    # never pairs a new config with old weights
    files.sort(key=lambda p: (p.name == marker, p.name.endswith("config.json")))
    written = {p.relative_to(staging).as_posix() for p in files}
    with os_errors(target, parameter), _exclusive(target):
        owned = read_manifest(target)
        for name in [*written, MANIFEST_FILE]:  # every destination checked before the first rename
            _reject_links_below(target, Path(name), parameter)
            destination = target / name
            if os.path.lexists(destination) and not _is_regular_or_missing(destination):
                raise OutputPathError(
                    f"`{parameter}`={str(target)!r} holds {name!r} as a link, folder or special file; dit-optimum "
                    "will not write through it or replace it. Remove it or choose another folder."
                )
            for parent in Path(name).parents[:-1]:
                if os.path.lexists(target / parent) and not os.path.isdir(target / parent):
                    raise OutputPathError(
                        f"`{parameter}`={str(target)!r} holds {parent.as_posix()!r} as a file where the save needs a "
                        "folder. Remove it or choose another folder."
                    )
        replaced = sorted(n for n in written if (target / n).is_file())
        foreign = [n for n in replaced if owned is not None and n not in owned]
        if foreign and not overwrite:
            raise DiTOptimumError(
                f"`{parameter}`={str(target)!r} holds {', '.join(foreign[:4])}, which dit-optimum did not write: "
                "choose a new folder, or pass overwrite=True (--overwrite) to replace them (other files are left "
                "alone)."
            )
        legacy = owned is None and _is_package_save(target / marker)  # an earlier save from before manifests
        stale = _stale_weights(target, written, owned, legacy)
        # the manifest first: a save killed half-way leaves files that a rerun knows as the package's own
        _write_manifest(target, (owned or set()) | written)
        _move_into(files, staging, target, parameter)
        root = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name in stale:
                with suppress(FileNotFoundError):
                    _unlink_below(root, Path(name), parameter, target)
        finally:
            os.close(root)
        _write_manifest(target, ((owned or set()) - set(stale)) | written)
    if replaced:
        logger.info("Replaced in %s: %s", target, ", ".join(replaced))


def _move_into(files: Sequence[Path], staging: Path, target: Path, parameter: str) -> None:
    """Rename each staged file into ``target`` through folder descriptors opened without following links. A failure
    here (a file made immutable, the disk gone) names the file and says the save is incomplete."""
    umask = _umask()
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for staged in files:
            relative = staged.relative_to(staging)
            try:
                with _parent_folder(root, relative, parameter, target) as folder:
                    os.chmod(staged, 0o666 & ~umask)
                    os.replace(staged, relative.name, dst_dir_fd=folder)
            except OSError as error:
                raise OutputPathError(
                    f"`{parameter}`={str(target)!r}: writing {relative.as_posix()!r} failed: {_error_text(error)}. The "
                    "files before it were already replaced, so this save is incomplete: fix the cause and save again."
                ) from error
    finally:
        os.close(root)


@contextmanager
def _parent_folder(root: int, relative: Path, parameter: str, target: Path) -> Iterator[int]:
    """A descriptor of ``relative``'s parent folder below the folder descriptor ``root``, each level opened without
    following links (``_open_folder``); the levels opened are closed afterwards."""
    opened: list[int] = []
    try:
        folder = root
        for index, part in enumerate(relative.parts[:-1]):
            folder = _open_folder(folder, part, parameter, target.joinpath(*relative.parts[: index + 1]))
            opened.append(folder)
        yield folder
    finally:
        for descriptor in opened:
            os.close(descriptor)


def _unlink_below(root: int, relative: Path, parameter: str, target: Path) -> None:
    with _parent_folder(root, relative, parameter, target) as folder:
        os.unlink(relative.name, dir_fd=folder)


def _is_package_save(marker: Path) -> bool:
    """``marker`` is what a save of this package (from before manifests) wrote: a ``model_index.json`` naming a
    ``dit_optimum`` component, or a ``config.json`` of a ``DiTOptimum`` model. Another tool's file of that name, or a
    user's ``app.py``, does not make a folder an earlier save whose files may be replaced."""
    if marker.name not in ("model_index.json", "config.json") or marker.is_symlink():
        return False
    content = _json_or_none(marker, 1024 * 1024)
    if not isinstance(content, dict):
        return False
    components = [value for value in content.values() if isinstance(value, list) and value]
    ours = any(str(value[0]).split(".")[0] == "dit_optimum" for value in components)
    return ours or str(content.get("_class_name", "")).startswith("DiTOptimum")


def _weight_variant(name: str) -> str | None:
    match = _WEIGHT_FILE.match(name)
    return None if match is None else match["variant"] + match["variant2"]


def _stale_weights(target: Path, written: set[str], owned: set[str] | None, legacy: bool) -> list[str]:
    """Weight files of the same variant in a folder the save writes weights into, not rewritten now, and written by
    an earlier save of the package (listed in its manifest; in a ``legacy`` save from before manifests, its
    same-variant weights). A folder that was no earlier save loses nothing."""
    stale = []
    for name in written:
        variant = _weight_variant(Path(name).name)
        folder = target / Path(name).parent
        if variant is None or not folder.is_dir():
            continue
        for existing in folder.iterdir():
            relative = existing.relative_to(target).as_posix()
            if relative in written or _weight_variant(existing.name) != variant or existing.is_symlink():
                continue
            if existing.is_file() and (legacy or (owned is not None and relative in owned)):
                stale.append(relative)
    return sorted(set(stale))


@contextmanager
def atomic_file(target: str | os.PathLike, parameter: str = "output") -> Iterator[Path]:
    """Yield a new temporary path beside ``target`` to write; on success it replaces ``target`` (a link there is
    replaced, never followed), on error it is removed. For writers that need a path (``savefig``, ``save_file``);
    the caller is responsible for the folder's ownership rules (``claim_files``)."""
    target = check_output_path(target, parameter)
    with os_errors(target, parameter):
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix=f".{target.name[:60]}.", suffix=".tmp", dir=target.parent)
        os.close(descriptor)
    temporary = Path(name)
    try:
        with os_errors(target, parameter):
            yield temporary
            os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_cache_entry(path: str | os.PathLike, write: Callable[[Path], None]) -> bool:
    """Write one entry of the package's cache (``DIT_OPTIMUM_CACHE``) whole through ``write(temporary_path)``; a
    cache that cannot be written (read-only, full) is a warning, not a failure of the work it would have saved."""
    try:
        with atomic_file(path, "DIT_OPTIMUM_CACHE") as temporary:
            write(temporary)
    except OutputPathError as error:
        warnings.warn(f"{error} Continuing without caching it.", stacklevel=2)
        return False
    return True


def record_written(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add files written through ``atomic_file`` to ``folder``'s manifest."""
    folder = Path(folder)
    with os_errors(folder, "output_dir"), _exclusive(folder):
        _write_manifest(folder, (read_manifest(folder) or set()) | set(names))


# --- locks -----------------------------------------------------------------------------------------------------------


@contextmanager
def folder_lock(folder: str | os.PathLike, purpose: str = "run", enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (file ``.dit_optimum.lock`` with the owner's PID) or refuse at once.

    The lock file is opened without following links and must be a regular file. The operating system releases the lock
    when its process dies, so a lock left by a killed run is stale and the next run takes it over. ``enabled=False``
    (the non-main processes of a multi-process run) does nothing.
    """
    if not enabled:
        yield
        return
    folder = check_output_path(folder, "output_dir")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise DiTOptimumError(f"`output_dir`={str(folder)!r} is a file, not a folder: choose a folder.")
    path = folder / LOCK_FILE
    with os_errors(folder, "output_dir"):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666 & ~_umask())
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise OutputPathError(
                    f"`output_dir`={str(folder)!r}: its lock file {LOCK_FILE} is a link or not a regular file; "
                    "dit-optimum will not follow or truncate it. Remove it and run again."
                ) from None
            raise
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:  # a hard link would truncate another file
        os.close(descriptor)
        raise OutputPathError(
            f"`output_dir`={str(folder)!r}: its lock file {LOCK_FILE} is not a regular file of its own (a special "
            "file or a hard link); remove it and run again."
        )
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(descriptor, 4096, 0).decode(errors="replace")
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
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose}
        owner["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with os_errors(folder, "output_dir"):
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(owner).encode(), 0)
        yield
    finally:
        with suppress(OSError):
            os.ftruncate(descriptor, 0)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def read_inside(folder: str | os.PathLike, relative: str, parameter: str, limit: int = 64 * 1024 * 1024) -> bytes:
    """The bytes of the regular file ``folder / relative``, where ``relative`` comes from a file the user may have
    edited: an absolute path, ``..``, a link anywhere on the way or a special file is refused naming ``parameter``
    (so a results file cannot make a release copy the Hub token into an upload)."""
    if not isinstance(relative, str) or not _is_safe_relative(relative):
        raise DiTOptimumError(f"`{parameter}`={relative!r} must be a relative path inside {str(folder)!r}.")
    folder = Path(folder)
    path = folder / relative
    current = folder
    for part in Path(relative).parts:
        current = current / part
        if current.is_symlink():
            raise DiTOptimumError(f"`{parameter}`={relative!r}: {str(current)!r} is a symbolic link; not followed.")
    from .schemas import read_regular_file  # the one reader: regular files only, non-blocking, size-capped

    return read_regular_file(path, f"`{parameter}`={str(path)!r}", limit)


def _refuse_token_content(source: Path, files: Sequence[str], parameter: str) -> None:
    """Refuse to stage a file holding the Hugging Face token this machine uses (read in chunks; the token itself is
    never printed)."""
    from huggingface_hub import get_token

    token = (get_token() or "").encode()
    if len(token) < 8:
        return
    for relative in files:
        tail = b""
        with open(source / relative, "rb", opener=_read_opener) as stream:
            while chunk := stream.read(1 << 20):
                if token in tail + chunk:
                    raise DiTOptimumError(
                        f"`{parameter}`={str(source)!r}: {relative!r} contains this machine's Hugging Face token; "
                        "refusing to stage it for upload. Remove the token from it; nothing was staged."
                    )
                tail = chunk[-len(token) :]


# --- copying a folder for upload --------------------------------------------------------------------------------------


def copy_regular_files(
    source: str | os.PathLike, target: str | os.PathLike, skip: Iterable[str] = (), parameter: str = "pipeline_dir"
) -> list[str]:
    """Copy the regular files inside ``source`` into ``target`` (kept relative) and return their relative paths.

    Hidden entries and the names in ``skip`` (files or folders of that name at any depth) are left out. A link (to a
    token file, to a folder elsewhere) or a special file is never followed or copied: it is refused naming it, before
    anything is copied, so an upload can neither leak what a link points to nor silently lack a component.
    """
    source, target = Path(source), Path(target)
    skip = set(skip)
    files: list[str] = []
    refused: list[str] = []
    with os_errors(source, parameter, "cannot be read"):
        for folder, folders, names in os.walk(source, followlinks=False):
            here = Path(folder)
            for name in sorted(folders):
                if name.startswith(".") or name in skip:
                    folders.remove(name)
                elif (here / name).is_symlink():
                    folders.remove(name)
                    refused.append((here / name).relative_to(source).as_posix())
            for name in sorted(names):
                relative = (here / name).relative_to(source).as_posix()
                if name.startswith(".") or name in skip or relative in skip:
                    continue
                status = os.lstat(here / name)
                # a hard link is another name of a file that may live outside the folder (a token file)
                plain = stat.S_ISREG(status.st_mode) and status.st_nlink == 1
                (files if plain else refused).append(relative)
    if refused:
        raise DiTOptimumError(
            f"`{parameter}`={str(source)!r} holds links (symbolic or hard) or special files "
            f"({', '.join(refused[:6])}): dit-optimum never follows or uploads them. Replace them with plain copies, "
            "or remove them; nothing was staged."
        )
    _refuse_token_content(source, files, parameter)
    with os_errors(target, "output_dir"):
        for relative in files:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(source / relative, "rb", opener=_read_opener) as reader, open(destination, "xb") as writer:
                shutil.copyfileobj(reader, writer)
    return files
