"""The search space: every legal stack of the registry's declared parts, never a hand-written list.

A candidate is a stack (``techniques.registry.stacked``): a base network (the baseline, a pruned-and-recovered model,
a step-distilled student: the registered techniques that start from a trained model), the sampler (the base's own,
or a declared solver at a declared step count), a forward path (``FORWARD_PATHS``: torch precisions and the
installed runtimes) and a step cache a saved pipeline carries (``SAVED_CACHE_METHODS``). What composes with what is
the registry's rule (``check_stack``): an illegal stack is never built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DiTOptimumError
from ..techniques.caching import SAVED_CACHE_METHODS
from ..techniques.registry import SOLVER_TECHNIQUES, TECHNIQUES, check_stack, stacked
from ..techniques.runtimes import FORWARD_PATHS, available_paths

# A step cache reuses work between steps: below this many steps there is next to nothing to reuse.
MIN_CACHE_STEPS = 3


@dataclass(frozen=True)
class Candidate:
    """One stack: ``base`` (a registered technique), ``solver`` ((name, steps) or None: the base's own sampling),
    ``path`` (a ``FORWARD_PATHS`` name) and ``cache`` (a cache recipe, or None)."""

    base: str
    solver: tuple[str, int] | None = None
    path: str = "fp32"
    cache: tuple[tuple[str, Any], ...] | None = None

    @property
    def name(self) -> str:
        """The stack as one line: ``base+solver-dpmpp-2m-5+openvino-int8+cache-block-schedule``."""
        parts = [self.base]
        if self.solver is not None:
            parts.append(f"solver-{self.solver[0]}-{self.solver[1]}")
        if self.path != "fp32":
            parts.append(self.path)
        if self.cache is not None:
            parts.append(f"cache-{dict(self.cache)['method']}")
        return "+".join(parts)

    def stack(self) -> dict[str, Any]:
        """The ``stacked`` options that build it."""
        part, options = FORWARD_PATHS[self.path]
        parts: dict[str, Any] = {"base": self.base}
        if self.solver is not None:
            parts["solver"] = {"name": self.solver[0], "num_inference_steps": self.solver[1]}
        if options:
            parts[part] = dict(options)
        if self.cache is not None:
            parts["cache"] = dict(self.cache)
        return parts

    def build(self, context: Any) -> Any:
        """The candidate's pipeline, built in ``context`` (trained bases are trained once, then loaded)."""
        return stacked(context, **self.stack())

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "solver": list(self.solver) if self.solver else None,
            "path": self.path,
            "cache": dict(self.cache) if self.cache else None,
        }

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Candidate:
        solver = stored.get("solver")
        cache = stored.get("cache")
        return cls(
            stored["base"],
            (str(solver[0]), int(solver[1])) if solver else None,
            stored.get("path", "fp32"),
            tuple(sorted(cache.items())) if cache else None,
        )


def is_student(base: str) -> bool:
    """Whether ``base`` is a step-distilled student (it samples at its own steps, unguided)."""
    return "student_steps" in TECHNIQUES[base].options


def search_bases(trained: Iterable[str] = ()) -> list[str]:
    """The bases a search may stack on: the baseline and every registered technique that trains a pipeline of its
    own (a ``run_name``) starting from a trained model (recoveries, step students); one trained from scratch only
    when ``trained`` names it (``SearchSettings.validate`` allows them all when named in ``bases``)."""
    bases = ["baseline"]
    for name, technique in TECHNIQUES.items():
        if name == "baseline" or technique.apply is stacked or "run_name" not in technique.options:
            continue
        if technique.from_scratch and name not in trained:
            continue
        bases.append(name)
    return bases


def search_solvers() -> list[tuple[str, int]]:
    """The declared solver settings (solver, steps) of the registry's solver techniques."""
    return sorted(set(SOLVER_TECHNIQUES.values()))


def search_caches() -> list[tuple[tuple[str, Any], ...]]:
    """The registered step-cache recipes a saved pipeline carries (``SAVED_CACHE_METHODS``)."""
    recipes = []
    for technique in TECHNIQUES.values():
        cache = technique.options.get("cache")
        if technique.apply is stacked and cache and cache.get("method") in SAVED_CACHE_METHODS:
            recipe = tuple(sorted(cache.items()))
            if recipe not in recipes:
                recipes.append(recipe)
    return recipes


def search_space(
    bases: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    default_steps: int = 10,
) -> list[Candidate]:
    """Every legal candidate over ``bases`` (default ``search_bases()``) and ``paths`` (default the declared paths
    that run here), with the declared solvers and saved caches; ``default_steps`` are the steps a base samples with
    when it records none (the benchmark's)."""
    bases = list(bases) if bases is not None else search_bases()
    paths = list(paths) if paths is not None else available_paths()
    unknown = [name for name in bases if name not in TECHNIQUES] + [name for name in paths if name not in FORWARD_PATHS]
    if unknown:
        raise DiTOptimumError(f"Unknown bases or forward paths {unknown} for the search.")
    candidates = []
    for base in bases:
        samplers: list[tuple[tuple[str, int] | None, int]] = [(None, default_steps)]
        if is_student(base):
            samplers = [(None, TECHNIQUES[base].options["student_steps"])]
        else:
            samplers += [(solver, solver[1]) for solver in search_solvers()]
        for solver, steps in samplers:
            caches = [None] + (search_caches() if steps >= MIN_CACHE_STEPS else [])
            for path in paths:
                for cache in caches:
                    candidate = Candidate(base, solver, path, cache)
                    try:
                        check_stack(candidate.stack())
                    except DiTOptimumError:  # e.g. a runtime with a step cache: never built
                        continue
                    candidates.append(candidate)
    return candidates
