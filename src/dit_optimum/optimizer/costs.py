"""Cheap cost predictions that order the search: what each candidate should cost, before anything is trained.

Cost does not depend on the weights, so every candidate's network is built untrained in the shape the real one
will have (``ShapeContext``: the baseline's config, pruned or step-distilled as the base declares). Sampling time is
predicted as network evaluations x the time of one forward of that shape on that path at the sampling batch: every
path is timed on the baseline's shape (``fastest_path``, interleaved, cached per machine), a smaller shape in fp32
with the baseline shape's path ratios; a step cache is credited with its declared reuse. Size and memory are
measured on the untrained shape with the path applied. The predictions only order candidates; every reported number
is measured on the real pipeline against the baseline.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..benchmark.contexts import UntrainedContext
from ..benchmark.settings import BenchmarkSettings
from ..evaluation.inputs import example_inputs
from ..evaluation.memory import peak_memory_bytes
from ..evaluation.size import saved_size_bytes
from ..evaluation.speed import interleaved_call_times
from ..models.transformer import outside_sampling
from ..techniques.caching import CACHE_METHODS
from ..techniques.registry import get_technique
from ..techniques.runtimes import FORWARD_PATHS, apply_path, fastest_path
from ..techniques.solvers import get_solver
from ..utils import public_config
from .space import Candidate


class ShapeContext(UntrainedContext):
    """A technique context that builds every base untrained, from the real baseline's config: the network a trained
    base will have (pruned widths and depths, a student's scheduler and steps), without training it."""

    def __init__(self, baseline: Any, settings: BenchmarkSettings, variant: str):
        self.settings, self.variant = settings, variant
        self.device = torch.device("cpu")
        self.trained: dict[str, dict[str, Any]] = {}
        self.vae = None
        self._baseline = baseline

    def baseline(self) -> Any:
        return copy.deepcopy(self._baseline)

    def baseline_config(self) -> Mapping[str, Any]:
        return self._baseline.transformer.config


@dataclass(frozen=True)
class Target:
    """What the search makes best: ``score`` turns a measured row (against the baseline's) into "times better than
    the baseline" (higher is better for every target), ``span`` gives its range over the timed rounds."""

    name: str
    description: str

    def score(self, row: Mapping[str, Any], baseline: Mapping[str, Any]) -> float | None:
        """Times better than the baseline on this target (None: not measured, e.g. a runtime's memory)."""
        if self.name == "sampling":
            return row.get("sampling_speedup")
        if self.name == "latency":
            ratio = row.get("latency_ratio")
            return 1 / ratio if ratio else None
        key = "size_bytes" if self.name == "size" else "peak_memory_bytes"
        value, reference = row.get(key), baseline.get(key)
        return reference / value if value and reference else None

    def span(self, row: Mapping[str, Any]) -> tuple[float, float] | None:
        """The score's range over the timed rounds, in the score's units (None: an exact target, size or memory,
        or no ranges measured)."""
        if self.name == "sampling" and row.get("sampling_speedup_range"):
            low, high = row["sampling_speedup_range"]
            return low, high
        if self.name == "latency" and row.get("latency_ratio_range"):
            low, high = row["latency_ratio_range"]
            return 1 / high, 1 / low
        return None


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("sampling", "images per second of full sampling (all steps, guidance and decode) at the speed batch"),
        Target("latency", "seconds to sample one image"),
        Target("size", "bytes of the saved transformer (a runtime's graph included)"),
        Target("memory", "peak memory above the loaded model during one sampling call (runtimes: not measured)"),
    )
}


@dataclass
class CostModel:
    """Predicted cost of candidates, from forward timings / sizes of their untrained shapes (memoised)."""

    shapes: ShapeContext
    batch_size: int
    steps: int
    guidance_scale: float
    paths: Sequence[str]
    _networks: dict[str, Any] = field(default_factory=dict)
    _measured: dict[tuple, Any] = field(default_factory=dict)

    def network(self, base: str) -> Any:
        """``base``'s pipeline, untrained, in its trained shape (with its own sampling defaults)."""
        if base not in self._networks:
            pipeline = get_technique(base).build(self.shapes)
            pipeline.set_progress_bar_config(disable=True)
            self._networks[base] = pipeline
        return self._networks[base]

    def _shape_key(self, base: str) -> str:
        config = public_config(self.network(base).transformer.config)
        return json.dumps({k: v for k, v in sorted(config.items()) if k != "block_cache_schedule"}, default=str)

    def sampling(self, candidate: Candidate) -> tuple[int, bool]:
        """Network evaluations per sampling call, and whether the batch is doubled for guidance."""
        defaults = self.network(candidate.base).sampling_defaults
        steps = int(defaults.get("num_inference_steps", self.steps))
        guidance = float(defaults.get("guidance_scale", self.guidance_scale))
        evaluations = steps
        if candidate.solver is not None:
            evaluations = get_solver(candidate.solver[0]).evaluations(candidate.solver[1])
        return evaluations, guidance > 1

    def forward_seconds(self, base: str, path: str, batch_size: int) -> float:
        """Predicted seconds of one forward of ``base``'s shape on ``path`` at ``batch_size``: every path is timed on
        the baseline's shape (interleaved; cached per machine by ``fastest_path``); a smaller shape is timed in fp32
        and given the baseline shape's path ratios (exporting every path of every shape would cost more than the
        search saves)."""
        key = ("paths", batch_size)
        if key not in self._measured:
            names = list(dict.fromkeys(["fp32", *self.paths]))  # fp32: what smaller shapes are timed in
            choice = fastest_path(self.network("baseline"), batch_size=batch_size, candidates=names)
            self._measured[key] = dict(choice.seconds)
        ratios = self._measured[key]
        if self._shape_key(base) == self._shape_key("baseline"):
            return ratios[path]
        shape = ("fp32", self._shape_key(base), batch_size)
        if shape not in self._measured:
            model = self.network(base).transformer
            inputs = example_inputs(model, batch_size)
            with outside_sampling(model):
                times = interleaved_call_times({"fp32": lambda: model(*inputs)}, "cpu", 1, 3)["fp32"]
            self._measured[shape] = statistics.median(times)
        return self._measured[shape] * ratios[path] / ratios["fp32"]

    def sampling_seconds(self, candidate: Candidate, batch_size: int | None = None) -> float:
        """Predicted seconds of one sampling call of ``batch_size`` images (default the model's batch)."""
        evaluations, guided = self.sampling(candidate)
        batch = (batch_size or self.batch_size) * (2 if guided else 1)
        seconds = evaluations * self.forward_seconds(candidate.base, candidate.path, batch)
        if candidate.cache is not None:  # credited with its declared share of reused block steps (optimistic)
            recipe = dict(candidate.cache)
            reuse = recipe.get("reuse_fraction", CACHE_METHODS[recipe["method"]].get("reuse_fraction", 0.0))
            seconds *= 1 - float(reuse)
        return seconds

    def size_bytes(self, candidate: Candidate) -> int:
        """Saved size of the candidate's transformer (its shape on its path; exact: size does not depend on the
        weights' values)."""
        key = ("size", self._shape_key(candidate.base), candidate.path)
        if key not in self._measured:
            self._measured[key] = saved_size_bytes(apply_path(self.network(candidate.base), candidate.path).transformer)
        return self._measured[key]

    def size_at_least(self, candidate: Candidate) -> int:
        """A lower bound of ``size_bytes`` that exports nothing: a runtime's folder holds at least the float32 torch
        weights beside its graph."""
        if FORWARD_PATHS[candidate.path][0] == "runtime":
            return self.size_bytes(Candidate(candidate.base))
        return self.size_bytes(candidate)

    def memory_bytes(self, candidate: Candidate) -> int | None:
        """Peak memory of one forward of the candidate's shape on its path at the sampling batch (None for a
        runtime: its buffers live outside torch)."""
        if FORWARD_PATHS[candidate.path][0] == "runtime":
            return None
        guided = self.sampling(candidate)[1]
        batch = self.batch_size * (2 if guided else 1)
        key = ("memory", self._shape_key(candidate.base), candidate.path, batch)
        if key not in self._measured:
            model = apply_path(self.network(candidate.base), candidate.path).transformer
            inputs = example_inputs(model, batch)
            with torch.no_grad(), outside_sampling(model):
                self._measured[key] = peak_memory_bytes(lambda: model(*inputs), "cpu")
        return self._measured[key]

    def predict(self, candidate: Candidate, target: str, baseline: Candidate) -> float | None:
        """Predicted times-better-than-the-baseline of ``candidate`` on ``target`` (None: cannot be measured)."""
        if target == "sampling":
            return self.sampling_seconds(baseline) / self.sampling_seconds(candidate)
        if target == "latency":
            return self.sampling_seconds(baseline, 1) / self.sampling_seconds(candidate, 1)
        if target == "size":
            return self.size_bytes(baseline) / self.size_bytes(candidate)
        memory, reference = self.memory_bytes(candidate), self.memory_bytes(baseline)
        return reference / memory if memory and reference else None
