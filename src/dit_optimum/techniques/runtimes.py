"""Exported runtimes as techniques, and the fastest forward path chosen by measuring on this machine.

``with_runtime(pipe, "openvino", "bf16")`` gives a pipeline whose transformer runs an exported graph
(``models/runtimes.py``). ``fastest_path(pipe)`` times the declared candidate paths (``FORWARD_PATHS``: torch
precisions and the runtimes) for this model's shape and batch on this machine, interleaved, and caches the answer
per machine and shape (``DIT_OPTIMUM_CACHE``), so that a recipe picks what is fastest where it runs instead of what a
table of CPU flags predicts; ``apply_path`` applies one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DiTOptimumError
from ..models.runtimes import RUNTIMES, package_version, runtime_declaration
from ..pipelines.dit import DiTOptimumPipeline
from ..utils import is_integer, public_config
from .common import rewrap, unwrap

logger = logging.getLogger(__name__)

# The forward paths a measured choice picks from: name -> the technique part and its options. Declared once; the
# torch ones are ``quantize`` options, the others ``with_runtime`` options. compile is left out: it takes 20-60 s
# per shape on two cores, longer than the choice may take.
FORWARD_PATHS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp32": ("quantization", {}),
    "bf16": ("quantization", {"backend": "torch", "weights": "bf16"}),
    "int8": ("quantization", {"backend": "torchao", "weights": "int8"}),
    "openvino": ("runtime", {"backend": "openvino", "precision": "bf16"}),
    "openvino-f32": ("runtime", {"backend": "openvino", "precision": "f32"}),
    "openvino-int8": ("runtime", {"backend": "openvino", "precision": "int8"}),
    "onnxruntime": ("runtime", {"backend": "onnxruntime", "precision": "fp32"}),
    "onnxruntime-int8": ("runtime", {"backend": "onnxruntime", "precision": "int8"}),
}
CHOICE_FORMAT = 1
# Config keys that do not change what one forward costs on a path (the path under test replaces the runtime).
_NOT_TIMED = ("runtime", "block_cache_schedule")


def with_runtime(
    pipe_or_model: DiTOptimumPipeline | Any, backend: str = "openvino", precision: str = "bf16"
) -> DiTOptimumPipeline | Any:
    """A copy of the pipeline (or transformer) whose transformer runs ``backend`` at ``precision``
    (``DiTOptimumTransformer2DModel.enable_runtime``); the input is left unchanged. It keeps its scheduler and
    recorded sampling defaults."""
    runtime_declaration(backend).check_precision(precision)
    model = copy.deepcopy(unwrap(pipe_or_model)).eval()
    model.enable_runtime(backend, precision)
    return rewrap(pipe_or_model, model)


def runtime_installed(backend: str) -> bool:
    """Whether ``backend``'s package imports here."""
    import importlib.util

    return importlib.util.find_spec(runtime_declaration(backend).package) is not None


def apply_path(pipe_or_model: DiTOptimumPipeline | Any, name: str) -> DiTOptimumPipeline | Any:
    """The pipeline (or transformer) with forward path ``name`` of ``FORWARD_PATHS`` applied."""
    from .quantization import quantize

    if not isinstance(name, str) or name not in FORWARD_PATHS:
        raise DiTOptimumError(f"Unknown forward path {name!r}; allowed values: {', '.join(FORWARD_PATHS)}.")
    _check_torch_forward(unwrap(pipe_or_model), "apply_path")
    part, options = FORWARD_PATHS[name]
    if part == "runtime":
        return with_runtime(pipe_or_model, **options)
    if not options:  # fp32: the model as it is, in a pipeline of its own
        return rewrap(pipe_or_model, copy.deepcopy(unwrap(pipe_or_model)))
    return quantize(pipe_or_model, **options)


def _check_torch_forward(model: Any, caller: str) -> None:
    if getattr(model, "runtime", None) is not None:
        raise DiTOptimumError(
            f"`{caller}` starts from a model that runs torch; this one runs with {model.runtime.describe()}: call "
            "`disable_runtime()` on (a copy of) its transformer first."
        )


@dataclass(frozen=True)
class PathChoice:
    """The measured fastest forward path: its name, each candidate's median seconds per forward, what was
    measured (model shape, batch, machine) and whether it came from the cache."""

    name: str
    seconds: dict[str, float]
    measured: dict[str, Any]
    cached: bool = False

    def speedups(self) -> dict[str, float]:
        """Each candidate's speed relative to fp32 (or the first candidate when fp32 was not measured)."""
        reference = self.seconds.get("fp32", next(iter(self.seconds.values())))
        return {name: reference / seconds for name, seconds in self.seconds.items()}

    def to_dict(self) -> dict[str, Any]:
        """What a benchmark row records of the choice (``forward_path_choice``)."""
        return {
            "name": self.name,
            "speedups": self.speedups(),
            "batch_size": self.measured["batch_size"],
            "cached": self.cached,
        }

    def summary(self) -> str:
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in self.speedups().items())
        origin = "cached measurement" if self.cached else "measured"
        return f"fastest forward path: {self.name} ({origin} on {self.measured['machine']}: {ratios})"


def available_paths(part: str | None = None) -> list[str]:
    """The declared paths that can run here (a runtime whose package is missing is left out), optionally only
    those of one technique part (``"quantization"`` or ``"runtime"``)."""
    names = []
    for name, (kind, options) in FORWARD_PATHS.items():
        if part is not None and kind != part:
            continue
        if kind == "runtime" and not runtime_installed(options["backend"]):
            continue
        names.append(name)
    return names


def fastest_path(
    pipe_or_model: DiTOptimumPipeline | Any,
    batch_size: int = 8,
    candidates: Sequence[str] | None = None,
    rounds: int = 3,
    use_cache: bool = True,
) -> PathChoice:
    """Time ``candidates`` (default: every available ``FORWARD_PATHS`` entry) on this model's architecture at
    ``batch_size`` on this machine, interleaved over ``rounds`` rounds of one forward each, and return the fastest by
    median. Speed depends on the architecture and the machine, not the weights: the answer is cached per machine
    (CPU model, threads, library versions) and config, and reused (``use_cache=False`` measures again). A few
    seconds for a small DiT; longer for a large one."""
    from ..evaluation.speed import interleaved_call_times

    model = unwrap(pipe_or_model)
    if not is_integer(batch_size) or batch_size < 1:
        raise DiTOptimumError(f"`batch_size`={batch_size!r} must be a positive integer.")
    if not is_integer(rounds) or rounds < 1:
        raise DiTOptimumError(f"`rounds`={rounds!r} must be a positive integer.")
    _check_torch_forward(model, "fastest_path")
    if not isinstance(use_cache, bool):
        raise DiTOptimumError(f"`use_cache`={use_cache!r} must be True or False.")
    if candidates is not None and (isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence)):
        raise DiTOptimumError(f"`candidates`={candidates!r} must be a list of forward path names.")
    names = list(candidates) if candidates is not None else available_paths()
    unknown = [name for name in names if not isinstance(name, str) or name not in FORWARD_PATHS]
    if unknown or not names or len(set(names)) != len(names):
        raise DiTOptimumError(
            f"`candidates`={names!r} must be a non-empty list of distinct forward paths; allowed values: "
            f"{', '.join(FORWARD_PATHS)}."
        )
    if model.device.type != "cpu":
        raise DiTOptimumError(f"`fastest_path` measures CPU paths; the model is on {model.device}.")
    config = {key: value for key, value in public_config(model.config).items() if key not in _NOT_TIMED}
    measured = _what_is_measured(config, batch_size, names, rounds)
    key = hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:32]
    if use_cache:
        cached = _read_choice(key, measured)
        if cached is not None:
            return cached
    float_model = type(model).from_config(config).eval()  # random weights: speed does not depend on them
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch_size, config["in_channels"], config["sample_size"], config["sample_size"],
                         generator=generator)  # fmt: skip
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, config["num_embeds_ada_norm"], (batch_size,), generator=generator)
    built = {}
    for name in names:
        candidate = apply_path(float_model, name)
        dtype = next(candidate.parameters()).dtype
        inputs = (sample.to(dtype) if dtype.is_floating_point else sample, timestep, labels)
        built[name] = (candidate, inputs)

    def forward(name: str) -> None:
        candidate, inputs = built[name]
        candidate(inputs[0], timestep=inputs[1], class_labels=inputs[2])

    times = interleaved_call_times({name: lambda name=name: forward(name) for name in names}, "cpu", 1, rounds)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    choice = PathChoice(min(seconds, key=seconds.get), seconds, measured)
    _write_choice(key, choice)
    logger.info(choice.summary())
    return choice


def _what_is_measured(config: Mapping[str, Any], batch_size: int, names: Sequence[str], rounds: int) -> dict[str, Any]:
    from ..evaluation.hardware import hardware_description

    packages = ("torch", "torchao", *(declaration.package for declaration in RUNTIMES.values()))
    hardware = hardware_description()
    return {
        "format": CHOICE_FORMAT,
        "machine": f"{hardware['cpu']}, {hardware['threads']} threads",
        "versions": {package: package_version(package) for package in packages},
        "config": json.loads(json.dumps(dict(sorted(config.items())), default=str)),
        "batch_size": batch_size,
        "candidates": list(names),
        "rounds": rounds,
    }


def _choice_path(key: str):
    from ..evaluation.reference import cache_dir

    return cache_dir() / "forward_paths" / f"{key}.json"


def _read_choice(key: str, measured: Mapping[str, Any]) -> PathChoice | None:
    from ..schemas import FORWARD_PATH_CHOICE, FileContentError, read_json_file

    path = _choice_path(key)
    if not path.is_file() or path.is_symlink():
        return None
    try:  # a damaged entry is measured again, never trusted
        data = read_json_file(path, FORWARD_PATH_CHOICE, max_bytes=1 << 20)
    except FileContentError:
        return None
    seconds, name = data["seconds"], data["name"]
    if data["measured"] != measured or set(seconds) != set(measured["candidates"]):
        return None
    if (
        not all(value > 0 for value in seconds.values())
        or name not in seconds
        or seconds[name] != min(seconds.values())
    ):
        return None
    return PathChoice(name, {key: float(value) for key, value in seconds.items()}, dict(measured), cached=True)


def _write_choice(key: str, choice: PathChoice) -> None:
    from ..files import strict_json, write_cache_entry

    text = strict_json({"name": choice.name, "seconds": choice.seconds, "measured": choice.measured})
    write_cache_entry(_choice_path(key), lambda temporary: temporary.write_text(text))
