"""One way to read the package's files and one schema per file kind, checked on read.

``read_regular_file`` opens without blocking and refuses anything but a regular file (a FIFO, a device, a folder)
at once, and caps the size; ``read_json_file`` adds strict JSON (no ``NaN`` / ``Infinity`` tokens, no number that
overflows to infinity); ``read_json_file(path, SCHEMA)`` validates the content against a small declarative schema and
raises ``SchemaError`` naming the file and the field (``'results.json': rows[3].class_accuracy must be a finite
number, got 'x'``).

The schemas, each declared once: the benchmark's results file (``RESULTS``), a release's results file
(``RELEASE_RESULTS``), a training checkpoint's state (``TRAINER_STATE``), latents metadata (``LATENTS_METADATA``),
the domain classifier's metadata (``CLASSIFIER_METADATA``), a model or scheduler ``config.json`` (``CONFIG``), a
pipeline's ``model_index.json`` (``MODEL_INDEX``) and an ``id2label`` file (``ID2LABEL_FILE``). Allowed sets that
higher layers own (technique names, metric keys and ranges, verdicts, the sampling bounds) are looked up when a file
is checked, so this module stays importable from every layer. A results file holds each cell (variant x technique)
once, each metric within its declared range (shares in [0, 1], distances and costs >= 0), every interval ordered
(low <= high) and only sampling settings a pipeline call accepts.

Values rendered into cards, snippets, READMEs and Space configs are checked here too: ``check_repo_id`` (Hub ids,
with ``huggingface_hub``'s validator), ``MODEL_DTYPES`` and ``markdown_text`` (free text escaped for Markdown).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import DiTOptimumError, MissingPathError, ModelFileError, keeping_type

MAX_JSON_BYTES = 64 * 2**20
# The float dtypes a released pipeline is loaded in (what the card's snippet and the demo pass as torch_dtype).
MODEL_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
# Magnitude bound of stored measurements: far above any real one, far below what overflows once scaled for a table.
MAX_MEASUREMENT = 1e15
MAX_COUNT = 10**12
_HUB_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


# --- errors ------------------------------------------------------------------------------------------------------


class FileContentError(DiTOptimumError):
    """A file that cannot be read as its kind: ``problem`` says what is wrong without the file's name (``not valid
    JSON (...)``, ``a FIFO, not a regular file``, ``rows[3].dtype must be ...``)."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


class InvalidJSONError(FileContentError):
    """A file that is not strict JSON (syntax, encoding, NaN or infinite numbers, nesting too deep)."""


class SchemaError(FileContentError):
    """Valid JSON whose content does not match its schema; ``field`` is the path of the bad value (``rows[3].dtype``,
    ``""`` for the top level)."""

    def __init__(self, source: str, field: str, problem: str):
        super().__init__(f"{source}: {problem}", problem)
        self.source, self.field = source, field


def file_error(error: DiTOptimumError, message: str) -> DiTOptimumError:
    """``message`` about a model file ``error`` refused, with the type diffusers raises for it: a file or folder that
    is missing, unreadable or not parseable as its kind (not a regular file, not JSON, not the JSON object it must
    be) is a ``ModelFileError``, also an ``OSError`` (a ``MissingPathError`` stays one); a file that parses but holds
    an invalid value (a field's ``SchemaError``) stays a plain ``DiTOptimumError``, a ``ValueError``."""
    if isinstance(error, OSError):
        return keeping_type(error, message)
    if isinstance(error, SchemaError) and error.field:
        return DiTOptimumError(message)
    return ModelFileError(message)


def _label(path: str | os.PathLike, label: str | None) -> str:
    return label if label is not None else repr(str(path))


# --- reading -----------------------------------------------------------------------------------------------------


def require_regular_file(path: str | os.PathLike, label: str | None = None) -> Path:
    """``path`` if it is a regular file (symlinks followed), else ``FileContentError`` naming it; nothing is
    opened, so a FIFO another library would block on is refused first."""
    where = _label(path, label)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingPathError(f"{where} does not exist.") from None
    except OSError as error:
        problem = f"unreadable ({error.strerror or error})"
        raise FileContentError(f"{where} is {problem}.", problem) from None
    _check_mode(mode, where)
    return Path(path)


def _check_mode(mode: int, where: str) -> None:
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else _FILE_KINDS.get(stat.S_IFMT(mode), "not a plain file")
        problem = f"{kind}, not a regular file"
        raise FileContentError(f"{where} is {problem}: only regular files are read.", problem)


def read_regular_file(path: str | os.PathLike, label: str | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path``; a FIFO, device or folder is refused at once (the file is opened
    non-blocking and checked with ``fstat`` before reading), and so is a file above ``max_bytes``.

    Every failure is a ``DiTOptimumError`` naming the file (``label``, else the path)."""
    where = _label(path, label)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MissingPathError(f"{where} does not exist.") from None
    except OSError as error:
        problem = f"unreadable ({error.strerror or error})"
        raise FileContentError(f"{where} is {problem}.", problem) from None
    try:
        info = os.fstat(descriptor)
        _check_mode(info.st_mode, where)
        if max_bytes is not None and info.st_size > max_bytes:
            problem = f"{info.st_size} bytes, above the {max_bytes} bytes such a file may have"
            raise FileContentError(f"{where} is {problem}.", problem)
        chunks, size = [], 0
        while True:
            chunk = os.read(descriptor, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:  # it grew while read
                problem = f"above the {max_bytes} bytes such a file may have"
                raise FileContentError(f"{where} is {problem}.", problem)
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as error:
        problem = f"unreadable ({error.strerror or error})"
        raise FileContentError(f"{where} is {problem}.", problem) from None
    finally:
        os.close(descriptor)


def read_text_file(path: str | os.PathLike, label: str | None = None, max_bytes: int | None = None) -> str:
    """``read_regular_file`` decoded as UTF-8; invalid UTF-8 is refused naming the file."""
    data = read_regular_file(path, label, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = f"not UTF-8 text ({error.reason} at byte {error.start})"
        raise InvalidJSONError(f"{_label(path, label)} is {problem}.", problem) from None


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number (only finite numbers are)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large (it overflows to infinity)")
    return value


def _infinity_only(token: str) -> Any:
    if token in ("Infinity", "-Infinity"):
        return float(token)
    return _refuse_constant(token)


def parse_json(text: str, label: str, infinities: bool = False) -> Any:
    """Strict JSON: ``NaN``, ``Infinity`` and numbers that overflow are refused, as is nesting too deep to parse.
    ``infinities`` accepts ``Infinity`` / ``-Infinity`` (diffusers writes them in configs, e.g. DPM-Solver's
    ``lambda_min_clipped``); the keys that hold them are checked by their readers."""
    constant = _infinity_only if infinities else _refuse_constant
    try:
        return json.loads(text, parse_constant=constant, parse_float=_finite_float)
    except RecursionError:
        detail = "nested too deeply"
    except ValueError as error:  # JSONDecodeError, the refusals above, integers with too many digits
        detail = " ".join(str(error).split())[:300]
    problem = f"not valid JSON ({detail})"
    raise InvalidJSONError(f"{label} is {problem}.", problem) from None


def read_json_file(
    path: str | os.PathLike,
    schema: Schema | None = None,
    label: str | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    infinities: bool = False,
) -> Any:
    """The strict-JSON content of the regular file ``path``, validated against ``schema`` when given."""
    where = _label(path, label)
    content = parse_json(read_text_file(path, where, max_bytes), where, infinities)
    if schema is not None:
        validate(content, schema, where)
    return content


def validate(value: Any, schema: Schema, source: str) -> Any:
    """``value`` if it matches ``schema``, else ``SchemaError`` naming ``source`` and the field."""
    try:
        schema.check(value, "")
    except _Invalid as invalid:
        raise SchemaError(source, invalid.field, invalid.problem) from None
    except RecursionError:
        raise SchemaError(source, "", "is nested too deeply") from None
    return value


# --- the schema language: a few node types, each checking one JSON value ----------------------------------------


class _Invalid(Exception):
    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _child(field: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{field}.{key}" if field else key
    return f"{field}[{json.dumps(key) if isinstance(key, str) else repr(key)}]"


class Schema:
    """One JSON value's allowed shape; ``expected`` says it in words for the error message."""

    expected = "a JSON value"

    def check(self, value: Any, field: str) -> None:
        raise NotImplementedError

    def fail(self, value: Any, field: str, expected: str | None = None) -> None:
        where = field or "the top level"
        raise _Invalid(field, f"{where} must be {expected or self.expected}, got {_shown(value)}")


class Json(Schema):
    """Any JSON value (finite numbers only, or also infinities with ``infinities``; never NaN): for content this
    package passes through without reading."""

    expected = "a JSON value with finite numbers"

    def __init__(self, infinities: bool = False):
        self.infinities = infinities

    def check(self, value: Any, field: str) -> None:
        if value is None or isinstance(value, (str, bool, numbers.Integral)):
            return
        if isinstance(value, numbers.Real):
            if math.isnan(value) or (math.isinf(value) and not self.infinities):
                self.fail(value, field, "a finite number")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    self.fail(key, field, "an object with string keys")
                self.check(item, _child(field, key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                self.check(item, _child(field, index))
        else:
            self.fail(value, field)


ANY_JSON = Json()


class Str(Schema):
    """A string: one of ``choices`` (a tuple, or a function giving them when checked), matching ``pattern``, or
    passing ``validator`` (which returns what is wrong, or None)."""

    def __init__(
        self,
        expected: str = "a string",
        *,
        pattern: str | None = None,
        choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
        validator: Callable[[str], str | None] | None = None,
        max_length: int = 100_000,
    ):
        self.expected, self.max_length, self.validator = expected, max_length, validator
        self.pattern = re.compile(pattern) if pattern else None
        self.choices = choices if choices is None or callable(choices) else tuple(choices)

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, str) or len(value) > self.max_length:
            self.fail(value, field)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            self.fail(value, field)
        if self.choices is not None:
            allowed = tuple(self.choices() if callable(self.choices) else self.choices)
            if value not in allowed:
                shown = ", ".join(allowed[:40]) + (", ..." if len(allowed) > 40 else "")
                self.fail(value, field, f"{self.expected} (allowed values: {shown})")
        if self.validator is not None:
            problem = self.validator(value)
            if problem:
                self.fail(value, field, f"{self.expected} ({problem})")


class Int(Schema):
    """An integer (not a boolean) within ``[minimum, maximum]``."""

    def __init__(self, minimum: int | None = None, maximum: int | None = MAX_COUNT):
        self.minimum, self.maximum = minimum, maximum
        bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
        self.expected = "an integer " + " and ".join(bound for bound in bounds if bound)

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            self.fail(value, field)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            self.fail(value, field)


class Number(Schema):
    """A finite real number (an integer counts; a boolean does not) within ``[minimum, maximum]``."""

    def __init__(self, minimum: float | None = -MAX_MEASUREMENT, maximum: float | None = MAX_MEASUREMENT):
        self.minimum, self.maximum = minimum, maximum
        low = "-inf" if minimum is None else f"{minimum:g}"
        high = "inf" if maximum is None else f"{maximum:g}"
        self.expected = f"a finite number in [{low}, {high}]"

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(value, field)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            self.fail(value, field)


class Bool(Schema):
    expected = "true or false"

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, bool):
            self.fail(value, field)


class Nullable(Schema):
    """``null`` or ``schema``."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.expected = f"null or {schema.expected}"

    def check(self, value: Any, field: str) -> None:
        if value is not None:
            self.schema.check(value, field)


class AnyOf(Schema):
    """The first of ``schemas`` that accepts the value."""

    def __init__(self, *schemas: Schema):
        self.schemas = schemas
        self.expected = " or ".join(schema.expected for schema in schemas)

    def check(self, value: Any, field: str) -> None:
        for schema in self.schemas:
            try:
                schema.check(value, field)
                return
            except _Invalid:
                continue
        self.fail(value, field)


class List(Schema):
    """A list of ``item`` values, of exactly ``length`` or at most ``max_items`` entries."""

    def __init__(self, item: Schema, *, length: int | None = None, max_items: int = 1_000_000):
        self.item, self.length, self.max_items = item, length, max_items
        count = f"{length} " if length is not None else ""
        self.expected = f"a list of {count}values, each {item.expected}"

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, (list, tuple)):
            self.fail(value, field)
        if (self.length is not None and len(value) != self.length) or len(value) > self.max_items:
            self.fail(value, field, f"{self.expected} ({len(value)} entries)")
        for index, item in enumerate(value):
            self.item.check(item, _child(field, index))


class MapOf(Schema):
    """An object with any keys matching ``key`` whose values all match ``value``."""

    def __init__(self, value: Schema, key: Str | None = None, max_items: int = 1_000_000):
        self.value, self.key, self.max_items = value, key, max_items
        self.expected = f"an object of {value.expected} values"

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, Mapping) or len(value) > self.max_items:
            self.fail(value, field)
        for key, item in value.items():
            if not isinstance(key, str):
                self.fail(key, field, "an object with string keys")
            if self.key is not None:
                self.key.check(key, _child(field, key) + " (a key)")
            self.value.check(item, _child(field, key))


class Object(Schema):
    """An object with ``required`` and ``optional`` keys; other keys are checked by ``extra`` (a schema, or a
    function of the key giving one), or refused when ``extra`` is None."""

    def __init__(
        self,
        required: Mapping[str, Schema] | None = None,
        optional: Mapping[str, Schema] | None = None,
        extra: Schema | Callable[[str], Schema] | None = ANY_JSON,
        expected: str = "an object",
    ):
        self.required, self.optional, self.extra = dict(required or {}), dict(optional or {}), extra
        self.expected = expected

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, Mapping):
            self.fail(value, field)
        for key, schema in self.required.items():
            if key not in value:
                where = f"{field} needs" if field else "needs"
                raise _Invalid(field, f'{where} "{key}" ({schema.expected})'.lstrip())
        for key, item in value.items():
            if not isinstance(key, str):
                self.fail(key, field, "an object with string keys")
            schema = self.required.get(key) or self.optional.get(key)
            if schema is None:
                schema = self.extra if isinstance(self.extra, Schema) or self.extra is None else self.extra(key)
            if schema is None:
                known = ", ".join(sorted({*self.required, *self.optional}))
                raise _Invalid(_child(field, key), f"{_child(field, key)} is not a known key (known: {known})")
            schema.check(item, _child(field, key))


class Interval(Schema):
    """A pair ``[low, high]`` of ``bound`` values with ``low <= high`` (a confidence interval, a measured range)."""

    def __init__(self, bound: Schema):
        self.bound = bound
        self.expected = f"a list of 2 values [low, high] with low <= high, each {bound.expected}"

    def check(self, value: Any, field: str) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            self.fail(value, field)
        for index, item in enumerate(value):
            self.bound.check(item, _child(field, index))
        if value[0] > value[1]:
            where = field or "the top level"
            raise _Invalid(field, f"{where} must be {self.expected}, got [{value[0]!r}, {value[1]!r}] (low > high)")


class Deferred(Schema):
    """The schema ``build()`` returns, built when first used: for bounds a higher layer owns (the pipeline's largest
    guidance scale, the scheduler's steps), so that this module stays importable from every layer."""

    def __init__(self, build: Callable[[], Schema]):
        self._build, self._schema = build, None

    @property
    def schema(self) -> Schema:
        if self._schema is None:
            self._schema = self._build()
        return self._schema

    @property
    def expected(self) -> str:  # type: ignore[override]
        return self.schema.expected

    def check(self, value: Any, field: str) -> None:
        self.schema.check(value, field)


class UniqueRows(List):
    """A list of ``item`` objects in which the values of ``keys`` (checked by ``item`` first) appear at most once
    each: ``what`` names such a combination in the error (``cell``)."""

    def __init__(self, item: Schema, keys: tuple[str, ...], what: str, max_items: int = 1_000_000):
        super().__init__(item, max_items=max_items)
        self.keys, self.what = keys, what

    def check(self, value: Any, field: str) -> None:
        super().check(value, field)
        seen: dict[tuple, int] = {}
        for index, item in enumerate(value):
            identity = tuple(item.get(key) for key in self.keys)
            if identity in seen:
                where = _child(field, index)
                raise _Invalid(
                    where,
                    f"{where} repeats the {self.what} {' / '.join(map(str, identity))} of "
                    f"{_child(field, seen[identity])}: each {self.what} ({', '.join(self.keys)}) may appear once",
                )
            seen[identity] = index


# --- values rendered into cards, snippets, READMEs and Space configs ---------------------------------------------


def hub_namespace_problem(name: Any) -> str | None:
    """What is wrong with ``name`` as a Hub user or organisation name, or None."""
    if not isinstance(name, str) or not _HUB_NAMESPACE.match(name) or ".." in name or name.endswith((".", "-")):
        return "letters, digits, '-', '_', '.'"
    return None


def repo_id_problem(repo_id: Any) -> str | None:
    """What is wrong with ``repo_id`` as a ``namespace/name`` Hub repository id, or None (``huggingface_hub``'s
    ``validate_repo_id`` and a valid namespace)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        return "a string"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return " ".join(str(error).split())[:300]
    if repo_id.count("/") != 1:
        return "must be `namespace/name` (a user or organisation, then a name)"
    if hub_namespace_problem(repo_id.split("/")[0]):
        return "its namespace must be letters, digits, '-', '_', '.'"
    return None


def check_namespace(org: Any, parameter: str = "org") -> str:
    """``org`` if it is a valid Hub user or organisation name, else a clear error naming ``parameter``."""
    if hub_namespace_problem(org):
        raise DiTOptimumError(
            f"`{parameter}`={org!r} is not a Hub user or organisation name (letters, digits, '-', '_', '.')."
        )
    return org


def check_repo_id(repo_id: Any, parameter: str = "repo_id") -> str:
    """``repo_id`` if it is a valid ``namespace/name`` Hub id, else a clear error naming ``parameter``."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise DiTOptimumError(f"`{parameter}`={repo_id!r} is not a valid Hub repository id: {problem}.")
    return repo_id


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~$#!])")


def markdown_text(value: Any, max_length: int = 300) -> str:
    """``value`` as one line of inert Markdown text: whitespace (newlines included) collapsed, control characters
    dropped, HTML characters as entities, Markdown punctuation backslash-escaped, at most ``max_length`` characters."""
    text = " ".join("".join(char if char.isprintable() else " " for char in str(value)).split())
    if len(text) > max_length:
        text = text[: max_length - 3] + "..."
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def title_problem(title: Any) -> str | None:
    """What is wrong with ``title`` as a one-line title (a Space's, a demo page's), or None."""
    if not isinstance(title, str) or not title.strip():
        return "a non-empty string"
    if len(title) > 200 or any(not char.isprintable() for char in title):
        return "one line of at most 200 printable characters"
    return None


# --- the allowed sets that higher layers own, looked up when a file is checked ----------------------------------


def _prediction_types() -> tuple[str, ...]:
    from .training.diffusion import PREDICTION_TYPES

    return PREDICTION_TYPES


def _technique_names() -> tuple[str, ...]:
    from .techniques.registry import TECHNIQUES

    return tuple(TECHNIQUES)


def _metric_keys() -> tuple[str, ...]:
    from .evaluation.declarations import all_metrics

    return tuple(metric.key for metric in all_metrics())


def _verdicts() -> tuple[str, ...]:
    from .benchmark.significance import VERDICTS

    return tuple(VERDICTS)


def _variant_problem(name: str) -> str | None:
    from .configs import parse_preset_name, preset_names

    try:
        parse_preset_name(name)
    except DiTOptimumError:
        return f"allowed values: {', '.join(preset_names())}"
    return None


# --- the schemas -------------------------------------------------------------------------------------------------

COUNT = Int(0)
POSITIVE = Int(1)
MEASUREMENT = Number()
NON_NEGATIVE = Number(0)
# A bootstrap interval or a measured range: ordered. Its bounds are not held to the metric's range: quality intervals
# are re-centred on the estimate (evaluation.intervals), so an accuracy's may reach past 1.
PAIR = Interval(MEASUREMENT)
FRACTION = Number(0, 1)
SHARE = Number(0, 1)
SHARE.expected = "a finite number in [0, 1] (a share, shown x100 in %)"


def _sampling_steps() -> Schema:
    from .evaluation.sampling import MAX_SAMPLING_STEPS

    return Int(1, MAX_SAMPLING_STEPS)


def _guidance_scale() -> Schema:
    from .pipelines.dit import MAX_GUIDANCE_SCALE

    return Number(1, MAX_GUIDANCE_SCALE)


# What a pipeline call accepts: steps within the DDPM schedule the models are trained with, guidance >= 1 (1 disables
# it) up to the pipeline's bound (float16's largest number).
STEPS = Deferred(_sampling_steps)
GUIDANCE = Deferred(_guidance_scale)
NAME = Str("a string of at most 1000 characters", max_length=1000)
CLASS_INDEX = Str('a class index (a string of digits, e.g. "0")', pattern=r"\d{1,9}")
CLASS_NAME = Str("a class name (a string of at most 1000 characters)", max_length=1000)
ID2LABEL = MapOf(CLASS_NAME, key=CLASS_INDEX)
REPO_ID = Str("a Hub repository id `namespace/name`", validator=repo_id_problem, max_length=200)
VARIANT = Str("a DiT preset name", validator=_variant_problem, max_length=40)
TECHNIQUE = Str("a registered technique", choices=_technique_names, max_length=200)
DTYPE = Str("a torch float dtype name", choices=MODEL_DTYPES)
IDENTIFIER = Str("a Python identifier", pattern=r"[A-Za-z_][A-Za-z0-9_]{0,99}")

QUALITY_SETTINGS = Object(
    optional={
        "reference": NAME,
        "reference_split": Nullable(NAME),
        "reference_samples": COUNT,
        "num_samples": COUNT,
        "batch_size": POSITIVE,
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "seed": Int(0, 2**64),
        "metrics": Nullable(List(Str("a declared metric key", choices=_metric_keys))),
        "bootstrap": COUNT,
        "inception_weights": Nullable(NAME),
        "use_cache": Bool(),
    }
)
SPEED_SETTINGS = Object(
    optional={
        "batch_size": POSITIVE,
        "forward_batch_size": POSITIVE,
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "warmup": COUNT,
        "repeats": POSITIVE,
    }
)
TRAINING_RECIPE = Object(
    optional={
        "steps": COUNT,
        "batch_size": POSITIVE,
        "learning_rate": Number(0, 1e6),
        "warmup_steps": COUNT,
        "lr_schedule": NAME,
        "ema_decay": FRACTION,
        "checkpoint_every": POSITIVE,
        "mixed_precision": NAME,
        "seed": Int(0, 2**64),
        "prediction_type": Str("what the network predicts", choices=_prediction_types),
        "recovery_steps": COUNT,
    }
)
# ``BenchmarkSettings.comparable()``: what a results file was measured with.
BENCHMARK_SETTINGS = Object(
    optional={
        "data": NAME,
        "image_size": POSITIVE,
        "channels": POSITIVE,
        "pretrained": MapOf(NAME),
        "training": TRAINING_RECIPE,
        "quality": QUALITY_SETTINGS,
        "speed": SPEED_SETTINGS,
        "speed_only": Bool(),
    }
)
HARDWARE = Object(
    optional={
        "cpu": Nullable(NAME),
        "cpu_count": Nullable(COUNT),
        "threads": Nullable(COUNT),
        "torch": Nullable(NAME),
        "gpu": Nullable(NAME),
    }
)
COMPARISON = Object(required={"difference": MEASUREMENT, "interval": PAIR, "significant": Bool()})


def _metric_range(metric: Any) -> Schema:
    """The values a metric's stored number may take, read from its declaration: a metric shown in percent
    (``scale`` 100) is a share in [0, 1]; a Frechet distance and every cost (FLOPs, parameters, bytes, seconds,
    images per second, memory) is >= 0; another quality statistic (KID, an unbiased estimate that dips below 0 when
    the two sets match) is any finite number."""
    if metric.scale == 100:
        return SHARE
    if metric.kind == "cost" or metric.frechet:
        return NON_NEGATIVE
    return MEASUREMENT


def _metric_ranges() -> dict[str, Schema]:
    from .evaluation.declarations import all_metrics

    return {metric.key: _metric_range(metric) for metric in all_metrics()}


def _row_column(key: str) -> Schema:
    # The metric columns (declared in evaluation.declarations) and their companions; any other key: finite JSON.
    if key.endswith(("_interval", "_range")):
        return PAIR
    ranges = _metric_ranges()
    if key in ranges or key.removesuffix("_real") in ranges:
        return ranges.get(key) or ranges[key.removesuffix("_real")]
    if key.endswith(("_wall_s", "_speedup", "_ratio")):  # seconds, and ratios of two positive measurements
        return NON_NEGATIVE
    return ANY_JSON


# One row of the benchmark: a cell (variant x technique), finished ("ok") or "failed" with its error.
_FORWARD_PATH_NAME = Str("a forward path or runtime name", pattern=r"[a-z0-9][a-z0-9-]{0,39}")
RESULT_ROW = Object(
    required={
        "variant": VARIANT,
        "technique": TECHNIQUE,
        "status": Str("a cell status", choices=("ok", "failed")),
    },
    optional={
        "description": NAME,
        "error": Str(max_length=100_000),
        "dtype": DTYPE,
        "device": Str("a torch device name (cpu, cuda:0)", pattern=r"[a-z][a-z0-9_]{0,19}(:\d{1,4})?"),
        "hardware": HARDWARE,
        "sampler": IDENTIFIER,
        # what ran the transformer's forward: "torch", or an exported runtime and its precision ("openvino bf16")
        "runtime": Str("torch or a runtime and its precision", pattern=r"torch|[a-z]{1,20} [a-z0-9]{1,10}"),
        "sampling_steps": STEPS,
        # a measured forward-path choice (`+fastest` stacks): the path taken, each candidate's speed against fp32
        "forward_path_choice": Object(
            required={
                "name": _FORWARD_PATH_NAME,
                "speedups": MapOf(Number(0), _FORWARD_PATH_NAME, 50),
                "batch_size": POSITIVE,
                "cached": Bool(),
            }
        ),
        # the pipeline's own recorded sampling defaults (a few-step solver, a step-distilled student), when it has any
        "sampling_defaults": Object(optional={"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}, extra=None),
        "sample_grid": Str("a PNG in the samples folder", pattern=r"samples/[A-Za-z0-9_][A-Za-z0-9._-]*\.png"),
        "quality_settings": QUALITY_SETTINGS,
        "speed_settings": SPEED_SETTINGS,
        "num_samples": COUNT,
        "reference_samples": COUNT,
        "floor_samples": COUNT,
        "classifier_held_out_samples": COUNT,
        "classifier_accuracy": FRACTION,
        "confidence": FRACTION,
        "processes": POSITIVE,
        "train_steps": COUNT,
        "train_final_loss": MEASUREMENT,
        "feature_extractors": MapOf(NAME),
        "vs_baseline": MapOf(COMPARISON, key=Str("a declared metric key", choices=_metric_keys)),
        "quality_verdict": Str("a quality verdict", choices=_verdicts),
        # a baseline too far from its real-vs-real floors to compare with (benchmark.significance.weak_baseline): why
        "baseline_weak": NAME,
        # a row whose features cannot be paired with its baseline's (benchmark.significance.compare_with_baselines): why
        "comparison_problem": Str(max_length=10_000),
    },
    extra=_row_column,
)
RELEASE_IDENTITY = Object(
    required={"variant": VARIANT, "technique": TECHNIQUE, "repo_id": REPO_ID},
    optional={"base_model": Nullable(REPO_ID)},
)
# The rows of a results file: each cell (variant x technique) once (a second row would silently replace the first).
RESULT_ROWS = UniqueRows(RESULT_ROW, ("variant", "technique"), "cell", max_items=100_000)
# results.json of a benchmark output folder.
RESULTS = Object(
    required={"rows": RESULT_ROWS},
    optional={"settings": Nullable(BENCHMARK_SETTINGS), "release": RELEASE_IDENTITY},
)
# dit_optimum_results.json of a release folder: the release's rows and who it is.
RELEASE_RESULTS = Object(
    required={"rows": RESULT_ROWS, "release": RELEASE_IDENTITY},
    optional={"settings": Nullable(BENCHMARK_SETTINGS)},
)

SHA256 = Str("a SHA-256 hex digest", pattern=r"[0-9a-f]{64}")
_FINGERPRINT = Object(required={"sha256": SHA256})
_DATA_FINGERPRINT = Object(
    required={
        "samples": COUNT,
        "shape": List(COUNT, max_items=8),
        "classes": COUNT,
        "sha256": SHA256,
    }
)
# runtime.json beside an exported runtime's graph (models/runtimes.py): what it is, and the digests of the weights it
# was exported from and of its files.
RUNTIME_MANIFEST = Object(
    required={
        "format": Int(1, 1),
        "backend": _FORWARD_PATH_NAME,
        "precision": _FORWARD_PATH_NAME,
        "weights_sha256": SHA256,
        "files_sha256": MapOf(SHA256, Str("a file name", pattern=r"[A-Za-z0-9_.-]{1,100}"), 16),
    },
    optional={"exported_with": MapOf(Nullable(NAME), max_items=16)},
)
# A cached forward-path measurement (techniques/runtimes.py, DIT_OPTIMUM_CACHE/forward_paths): the path measured
# fastest, each candidate's median seconds, and what was measured (compared whole with the current measurement).
FORWARD_PATH_CHOICE = Object(
    required={"name": _FORWARD_PATH_NAME, "seconds": MapOf(Number(0), _FORWARD_PATH_NAME, 50), "measured": Json()}
)
# search.json of an optimize output folder (optimize/search.py): what the search was asked, on which machine, the
# time it has spent, and every candidate tried in order, with what was measured and why it was kept or dropped.
SEARCH_STAGES = ("cost", "build", "screen", "full")
SEARCH_STATUSES = ("kept", "dropped", "failed")
SEARCH_CANDIDATE = Object(
    required={
        "name": NAME,
        "candidate": Object(
            required={"base": TECHNIQUE, "path": _FORWARD_PATH_NAME},
            optional={"solver": Nullable(List(ANY_JSON, length=2)), "cache": Nullable(MapOf(ANY_JSON, max_items=32))},
            extra=None,
        ),
        "status": Str("a candidate status", choices=SEARCH_STATUSES),
        "stage": Str("a search stage", choices=SEARCH_STAGES),
        "reason": Str(max_length=100_000),
        "wall_s": NON_NEGATIVE,
    },
    optional={
        "predicted": Nullable(NON_NEGATIVE),
        "score": Nullable(NON_NEGATIVE),
        "screen": ANY_JSON,
        "quality": Object(optional={"vs_baseline": RESULT_ROW.optional["vs_baseline"]}, extra=_row_column),
        "cost": Object(extra=_row_column),
    },
)
SEARCH_LOG = Object(
    required={
        "format": Int(1, 1),
        "search": ANY_JSON,
        "settings": ANY_JSON,
        "machine": ANY_JSON,
        "elapsed_s": NON_NEGATIVE,
        "candidates": List(SEARCH_CANDIDATE, max_items=100_000),
    },
    optional={
        "stopped": NAME,
        "chosen": Nullable(NAME),
        "baseline": ANY_JSON,
        "space": MapOf(COUNT, max_items=16),
        "predictions": MapOf(NON_NEGATIVE, max_items=1_000_000),
        "baseline_sha256": SHA256,
    },
)
# trainer_state.json of a training checkpoint.
TRAINER_STATE = Object(
    required={
        "format": POSITIVE,
        "step": COUNT,
        "processes": Int(1, 65_536),
        "config": Object(),
        "history": Object(
            required={
                "config": Object(),
                "resumes": List(Object(required={"start_step": COUNT, "changed": MapOf(List(Json(), length=2))})),
            }
        ),
        "inputs": Object(
            optional={
                "data": Nullable(_DATA_FINGERPRINT),
                "pretrained": Nullable(_FINGERPRINT),
                "teacher": Nullable(_FINGERPRINT),
            }
        ),
        "ema": Object(required={"decay": Number(0, 1), "warmup": Bool(), "updates": COUNT}),
        "optimizer": Object(
            required={"param_groups": List(Object()), "scalars": MapOf(Object(), key=Str(pattern=r"\d{1,9}"))}
        ),
    },
    optional={"grad_scaler": Nullable(Object())},
)
# latents_metadata.json beside extracted latents.
LATENTS_METADATA = Object(
    required={"vae": Str("the VAE's folder or Hub id (a non-empty string)", pattern=r"(?s).+", max_length=4096)},
    optional={"id2label": ID2LABEL},
)
# The JSON beside a cached domain classifier.
CLASSIFIER_METADATA = Object(
    required={"num_classes": Int(1, 1_000_000), "held_out_accuracy": FRACTION, "held_out_samples": COUNT}
)
# A model's or scheduler's config.json: an object (diffusers checks the keys).
# (diffusers writes infinities for some defaults, e.g. DPM-Solver's lambda_min_clipped; their readers check them)
CONFIG = Object(
    optional={"_class_name": NAME, "_diffusers_version": NAME},
    extra=Json(infinities=True),
    expected="a JSON object (a config)",
)
_COMPONENT = List(Nullable(Str("a library or class name", pattern=r"[A-Za-z_][A-Za-z0-9_.]{0,199}")), length=2)
# A pipeline's model_index.json: an object naming its components.
MODEL_INDEX = Object(
    required={"transformer": _COMPONENT},
    optional={
        "_class_name": NAME,
        "_diffusers_version": NAME,
        "vae": _COMPONENT,
        "scheduler": _COMPONENT,
        "id2label": Nullable(ID2LABEL),
    },
    expected="a JSON object naming the pipeline's components",
)
# A file of class names given to `convert --id2label`: class index -> name (a string or a number).
ID2LABEL_FILE = MapOf(AnyOf(CLASS_NAME, Number(None, None)), key=CLASS_INDEX)

# Every file kind the package reads, by name (tests iterate it).
SCHEMAS: dict[str, Schema] = {
    "results": RESULTS,
    "release_results": RELEASE_RESULTS,
    "trainer_state": TRAINER_STATE,
    "latents_metadata": LATENTS_METADATA,
    "classifier_metadata": CLASSIFIER_METADATA,
    "config": CONFIG,
    "model_index": MODEL_INDEX,
    "id2label": ID2LABEL_FILE,
}


def read_config_file(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """A ``config.json`` (model, VAE) or ``scheduler_config.json``: a JSON object, else an error naming the file
    (typed by ``file_error``: a damaged file is also an ``OSError``, as in diffusers)."""
    where = repr(str(path))
    try:
        return read_json_file(path, CONFIG, where, infinities=True)
    except SchemaError as error:
        raise file_error(error, f"{where} must hold a JSON object (the {what}): {error.problem}.") from None
    except InvalidJSONError as error:
        message = f"{where} is not a valid JSON file ({error.problem}); the {what} is damaged."
        raise file_error(error, message) from None
    except FileContentError as error:
        raise file_error(error, f"{where} is {error.problem}; the {what} is damaged.") from None


# The config files diffusers reads from a component folder.
CONFIG_FILES = ("config.json", "scheduler_config.json")


def check_component_folder(folder: str | os.PathLike) -> None:
    """A local component folder (transformer, VAE, scheduler) as diffusers will read it: every entry a regular file
    or a folder (a FIFO or device would block the load or read garbage), and its config a JSON object. Hub ids and
    missing folders are left to the loader. A damaged file is a ``ModelFileError`` (``file_error``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            try:
                require_regular_file(entry)
            except FileContentError as error:
                raise file_error(error, str(error)) from None
    for name in CONFIG_FILES:
        if (folder / name).exists():
            read_config_file(folder / name, f"{folder.name or 'model'} config")
