"""Small shared helpers: argument checks, save options, loading sources; the write helpers come from ``files``."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import DiTOptimumError, MissingPathError
from .files import (  # noqa: F401  (the write path lives in files.py; these names stay importable from here)
    LOCK_FILE,
    atomic_file,
    check_save_target,
    folder_lock,
    save_directory,
    strict_json,
)

T = TypeVar("T")


def csv_list(value: str) -> list[str]:
    """A comma-separated command-line value as a list of stripped, non-empty entries."""
    return [item.strip() for item in value.split(",") if item.strip()]


def check_positive_integers(**values: Any) -> None:
    """Raise ``DiTOptimumError`` naming the first argument that is not a positive integer (booleans are refused)."""
    for name, value in values.items():
        if not is_integer(value) or value < 1:
            raise DiTOptimumError(f"`{name}`={value!r} must be a positive integer.")


def public_config(config: Any) -> dict[str, Any]:
    """A diffusers config's own keys, without its bookkeeping ones (``_class_name``, ``_name_or_path``,
    ``_use_default_values``: ``from_config`` resets every key that last one names, so a changed config built from
    it would silently lose its changes)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


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


_VARIANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")


def check_variant(variant: Any) -> str | None:
    """A weights ``variant`` (``"fp16"``, ``"bf16"``, ``"ema"``: the file is ``diffusion_pytorch_model.<variant>.
    safetensors``) or None; anything else (a path, a dot, an empty name) is refused naming it."""
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.match(variant)):
        raise DiTOptimumError(
            f"`variant`={variant!r} must be None or a name of 1-32 letters, digits or underscores (e.g. 'fp16')."
        )
    return variant


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
    """Write a file the user named whole (temp file, fsync, rename): readers never see half a file. Files in a folder
    the package owns go through ``files.write_text`` instead (it keeps the folder's manifest)."""
    with atomic_file(path) as temporary, temporary.open("w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Strict JSON (indented; a NaN or infinity is refused naming its field) written atomically."""
    write_text_atomic(path, strict_json(payload, repr(str(path))))
