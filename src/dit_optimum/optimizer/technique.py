"""The benchmark's ``optimized`` row: the search run inside a benchmark cell, on the run's own baseline, its trained
cells reused and its measurements as the judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..benchmark.contexts import VariantContext, slug
from ..errors import DiTOptimumError
from ..pipelines.dit import DiTOptimumPipeline
from ..techniques.registry import check_stack, get_technique, register_technique
from .budget import QualityBudget
from .report import write_search_report
from .search import SearchSettings, built_candidate, run_search
from .space import Candidate

SEARCH_FOLDER = "optimize"


def optimized(
    context: Any,
    target: str = "sampling",
    budget: str | None = None,
    max_size: float | None = None,
    time_budget: float = 600.0,
    bases: list[str] | None = None,
    paths: list[str] | None = None,
) -> DiTOptimumPipeline:
    """The stack the optimizer's search chose on this run's baseline, fastest within the quality budget.

    The search (``dit-optimum optimize``) runs over the registry's stacks; its report is in ``optimize/<variant>/``.
    ``target``, ``budget``, ``max_size`` and ``time_budget`` are the search's; ``bases`` / ``paths`` restrict it
    (default: all)."""
    if not isinstance(context, VariantContext) or context.settings.speed_only:
        raise DiTOptimumError(
            "`optimized` searches under a quality budget: it needs a benchmark run that measures quality (not "
            "--speed-only)."
        )
    settings = context.settings
    search = SearchSettings(
        QualityBudget.parse(budget),
        target,
        time_budget,
        max_size,
        bases=tuple(bases) if bases is not None else None,
        paths=tuple(paths) if paths is not None else None,
    )
    folder = Path(settings.output_dir) / SEARCH_FOLDER / slug(context.variant)
    result = run_search(context, settings, search, folder, getattr(context, "scorers", (None, None)))
    write_search_report(result, folder)
    pipeline = result.pipeline
    pipeline.search_summary = {**result.summary(), "report": f"{SEARCH_FOLDER}/{slug(context.variant)}/report.md"}
    return pipeline


def rebuild_optimized(context: Any, row: dict[str, Any]) -> DiTOptimumPipeline:
    """The stack an ``optimized`` row records as chosen (``optimize.stack``), built again from the run's trained
    models: a release ships what was measured, without searching again."""
    stack = (row.get("optimize") or {}).get("stack")
    if not isinstance(stack, dict):
        raise DiTOptimumError(f"The {row.get('variant')} / optimized row records no chosen stack (`optimize.stack`).")
    try:
        candidate = Candidate.from_dict(stack)
        get_technique(candidate.base)
        check_stack(candidate.stack())
    except (KeyError, TypeError, ValueError, IndexError, DiTOptimumError) as error:
        raise DiTOptimumError(
            f"The optimized row's `optimize.stack`={stack!r} is not a registered stack: {error}"
        ) from None
    return built_candidate(candidate, context, context.settings)


# The default run's row: the fastest sampling within the default budget (no significant change) at most 30% of the
# baseline's saved size, searched for at most 4 minutes (it stops sooner once no untried stack can win).
OPTIMIZED = {"target": "sampling", "max_size": 0.3, "time_budget": 240.0}
register_technique(
    "optimized",
    optimized,
    "the fastest sampling pipeline with no significant quality change at most 30% of the baseline's size, found by "
    "`dit-optimum optimize`'s search over the registered stacks",
    OPTIMIZED,
    trains=True,
    needs_quality=True,
    rebuild=rebuild_optimized,
)
