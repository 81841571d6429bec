"""The search for the best pipeline on a target within a quality budget: anytime, resumable, every step logged.

Candidates (``space.search_space``) are tried in order of predicted gain (``costs.CostModel``). Each is built
(training a base once, or loading it from an earlier run or the benchmark's cells), screened on the first
``screen_samples`` samples against the baseline's same samples (a cheap paired test that drops clear losses), then
judged by the benchmark's own measurement on its full N: quality with intervals, paired with the baseline on the same
classes and seeds, and cost timed round-robin with the baseline in the same rounds. The best candidate within the
budget is kept (of two within the timing noise, the smaller). The search stops when no untried candidate is
predicted within ``slack`` of the best one's prediction, or when the time budget is spent (checked between
candidates; a training round started finishes).
``search.json`` is rewritten after every candidate, so a killed search resumes where it stopped, on this machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState

from ..benchmark.runner import measure_pipeline
from ..benchmark.settings import BenchmarkSettings
from ..benchmark.significance import paired_comparisons, quality_verdict, weak_baseline
from ..errors import DiTOptimumError
from ..evaluation.declarations import all_metrics
from ..evaluation.domain import domain_classifier
from ..evaluation.hardware import hardware_description
from ..evaluation.quality import evaluate_quality, output_resolution, resolve_metrics
from ..evaluation.reference import real_split
from ..files import write_json
from ..models.runtimes import weights_digest
from ..schemas import SEARCH_LOG, FileContentError, read_json_file
from ..techniques.runtimes import available_paths
from ..utils import is_integer
from .budget import QualityBudget
from .costs import TARGETS, CostModel, ShapeContext
from .space import Candidate, search_bases, search_space

logger = logging.getLogger(__name__)
SEARCH_FILE = "search.json"
SEARCH_FORMAT = 1
# The row columns a candidate's record keeps of its measured cost.
COST_KEYS = (
    "sampling_speedup",
    "sampling_speedup_range",
    "latency_ratio",
    "latency_ratio_range",
    "forward_speedup",
    "size_bytes",
    "peak_memory_bytes",
    "sampling_images_per_s",
    "runtime",
    "dtype",
    "sampler",
    "sampling_steps",
)


@dataclass
class SearchSettings:
    """What the search makes best (``target``, a ``TARGETS`` name) within ``budget``; ``time_budget`` of search
    in all (across resumed runs); ``max_size``: the largest saved size allowed, as a fraction of the baseline's (None:
    any); ``screen_samples``: the N of the cheap screen (0: no screen); ``slack``: candidates predicted within this
    factor of the best one's prediction are still tried; ``bases`` / ``paths`` restrict the space (None: all)."""

    budget: QualityBudget = field(default_factory=QualityBudget)
    target: str = "sampling"
    time_budget: float = 600.0
    max_size: float | None = None
    screen_samples: int = 100
    slack: float = 1.25
    bases: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None

    def validate(self) -> None:
        if not isinstance(self.target, str) or self.target not in TARGETS:
            raise DiTOptimumError(f"Unknown `target`={self.target!r}; allowed values: {', '.join(TARGETS)}.")
        for name, value, low in (("time_budget", self.time_budget, 0), ("slack", self.slack, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < low:
                raise DiTOptimumError(f"`{name}`={value!r} must be a finite number >= {low}.")
        size = self.max_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size <= 1):
            raise DiTOptimumError(f"`max_size`={size!r} must be a fraction of the baseline's size in (0, 1], or None.")
        if not is_integer(self.screen_samples) or self.screen_samples < 0:
            raise DiTOptimumError(f"`screen_samples`={self.screen_samples!r} must be an integer >= 0.")
        from ..techniques.registry import TECHNIQUES

        allowed = {"bases": search_bases(trained=list(TECHNIQUES)), "paths": available_paths()}
        for name, given in (("bases", self.bases), ("paths", self.paths)):
            if given is None:
                continue
            unknown = [item for item in given if not isinstance(item, str) or item not in allowed[name]]
            if isinstance(given, str) or unknown or not given or len(set(given)) != len(given):
                raise DiTOptimumError(
                    f"`{name}`={given if isinstance(given, str) else list(given)!r} must name some of, each once: "
                    f"{', '.join(allowed[name])} (a runtime's path needs its extra, e.g. dit-optimum[openvino])."
                )

    def comparable(self) -> dict[str, Any]:
        """What binds a search log to its search (the time budget may grow between runs)."""
        stored = {key: value for key, value in asdict(self).items() if key not in ("time_budget", "budget")}
        stored["budget"] = self.budget.to_dict()
        return {key: sorted(value) if isinstance(value, tuple) else value for key, value in stored.items()}


@dataclass
class SearchResult:
    """The chosen candidate and its pipeline, every candidate's record (in the order tried), the baseline's
    measurement, the search's time in all and why it stopped."""

    candidate: Candidate
    pipeline: Any
    record: dict[str, Any]
    records: list[dict[str, Any]]
    baseline: dict[str, Any]
    elapsed_s: float
    stopped: str
    budget: QualityBudget
    target: str
    baseline_row: dict[str, Any] = field(default_factory=dict)
    baseline_features: tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray] | None = None
    space: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a benchmark row and a card record of the search."""
        return {
            "chosen": self.candidate.name,
            "stack": self.candidate.to_dict(),
            "target": self.target,
            "budget": self.budget.describe(),
            "score": self.record.get("score"),
            "candidates_legal": self.space.get("legal"),
            "candidates_tried": len(self.records),
            "candidates_kept": sum(record["status"] == "kept" for record in self.records),
            "search_s": self.elapsed_s,
            "stopped": self.stopped,
        }


def _machine() -> dict[str, Any]:
    hardware = hardware_description()
    return {"cpu": hardware["cpu"], "threads": hardware["threads"], "torch": hardware["torch"]}


def _load_log(folder: Path, header: Mapping[str, Any]) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    """The records and elapsed time of an earlier run of this search in ``folder`` (none when there is none, or it
    was another search or another machine: speed is never carried over from one machine to another)."""
    path = folder / SEARCH_FILE
    if not path.exists():
        return [], 0.0, {}
    try:
        stored = read_json_file(path, SEARCH_LOG)
    except FileContentError as error:
        raise DiTOptimumError(
            f"The search log {str(path)!r} is damaged ({error.problem}); move it away to search again."
        ) from None
    differing = [key for key in ("search", "settings", "machine", "baseline_sha256") if stored.get(key) != header[key]]
    if differing:
        logger.warning(
            "%s is the log of another search (its %s differ): it is not resumed, and this search replaces it.",
            path,
            ", ".join(differing),
        )
        return [], 0.0, {}
    return list(stored["candidates"]), float(stored["elapsed_s"]), dict(stored.get("predictions") or {})


def _check_records(records: list[dict[str, Any]], space: set[str], folder: Path) -> None:
    """A resumed log's records must be candidates of this search, each once, named as their stack: a hand-edited
    record is refused, never shipped."""
    seen = set()
    for index, record in enumerate(records):
        try:
            name = Candidate.from_dict(record["candidate"]).name
        except (KeyError, TypeError, ValueError, IndexError):
            name = None
        problem = None
        if name != record["name"] or name in seen:
            problem = "its name is not its stack's, or it is listed twice"
        elif name not in space:
            problem = "it is not a candidate of this search"
        elif record["status"] == "kept" and (record.get("score") is None or not record.get("cost")):
            problem = "it is kept without a measured score and cost"
        if problem:
            raise DiTOptimumError(
                f"The search log {str(folder / SEARCH_FILE)!r} is damaged (candidates[{index}] {record.get('name')!r}: "
                f"{problem}); move it away to search again."
            )
        seen.add(name)


def _first(features: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    return {key: value[:count] for key, value in features.items()}


def _quality_numbers(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = [metric.key for metric in all_metrics("quality") if metric.key in row]
    numbers = {key: row[key] for key in keys}
    numbers.update({f"{key}_interval": row[f"{key}_interval"] for key in keys if f"{key}_interval" in row})
    numbers["num_samples"] = row.get("num_samples")
    return numbers


def run_search(
    context: Any,
    settings: BenchmarkSettings,
    search: SearchSettings,
    folder: str | Path,
    scorers: tuple[Any, Any] = (None, None),
    state: PartialState | None = None,
    echo: Callable[[str], None] = print,
) -> SearchResult:
    """Search the stacks of ``context``'s variant (a ``VariantContext``: its baseline, and training under
    ``settings``' recipe) for the best on ``search.target`` within ``search.budget``, judged with ``settings``'
    quality and speed measurements; ``folder`` keeps ``search.json`` (resumed when it is this search's, on this
    machine). ``scorers`` replace the Inception network / the domain classifier (tests inject small ones)."""
    search.validate()
    if settings.speed_only:
        raise DiTOptimumError("The search judges quality against the baseline: it cannot run with `speed_only`.")
    start = time.perf_counter()
    state = state or PartialState(cpu=True)
    folder = Path(folder)
    budget = search.budget
    budget_keys = [metric.key for metric in resolve_metrics(settings.quality)]
    unknown = [key for key in budget.max_drop if key not in budget_keys]
    if unknown:
        raise DiTOptimumError(
            f"The budget names {unknown}, which this run does not measure; measured: {', '.join(budget_keys)}."
        )

    baseline = context.baseline()
    baseline.set_progress_bar_config(disable=True)
    header = {
        "format": SEARCH_FORMAT,
        "search": search.comparable(),
        "settings": settings.comparable(),
        "machine": _machine(),
        "baseline_sha256": weights_digest(baseline.transformer),  # a log of other weights at the same path: not reused
    }
    earlier, spent, stored_predictions = _load_log(folder, header)
    done = {record["name"]: record for record in earlier}
    records: list[dict[str, Any]] = list(earlier)
    scorers = _fixed_scorers(settings, baseline, scorers)
    echo("  measuring the baseline (quality on the full N, and its cost)")
    base_row, base_quality = measure_pipeline(baseline, settings, context.baseline(), scorers, state)
    reference = (base_quality.features, base_quality.reference, base_quality.labels)
    base_values = {key: base_row[key] for key in budget_keys if key in base_row}
    weak = weak_baseline(base_row)
    baseline_summary = {**_quality_numbers(base_row), **{key: base_row.get(key) for key in COST_KEYS}}
    if weak:
        baseline_summary["baseline_weak"] = weak
        echo(f"  warning: weak baseline ({weak}); comparisons with it mean little")

    paths = list(search.paths) if search.paths is not None else available_paths()
    bases = list(search.bases) if search.bases is not None else search_bases()
    quality = settings.quality
    costs = CostModel(
        ShapeContext(baseline, settings, context.variant),
        batch_size=1 if search.target == "latency" else settings.speed.batch_size,
        steps=quality.num_inference_steps,
        guidance_scale=quality.guidance_scale,
        paths=paths,
    )
    echo(f"  baseline measured in {time.perf_counter() - start:.0f} s; predicting every candidate's cost from its "
         "untrained shape")  # fmt: skip
    phase = time.perf_counter()
    origin = Candidate("baseline")
    base_size = costs.size_bytes(origin)
    space = search_space(bases, paths, quality.num_inference_steps)
    legal = len(space)
    if search.max_size is not None:  # over the size limit even at the least it can weigh: never tried
        limit = search.max_size * base_size
        space = [candidate for candidate in space if costs.size_at_least(candidate) <= limit]
    skipped = {"over_size_limit": legal - len(space)} if search.max_size is not None else {}
    predicted: dict[Candidate, float] = {}
    for candidate in space:  # a resumed search keeps its predictions: its order and stopping point do not move
        value = stored_predictions.get(candidate.name) if earlier else None
        value = costs.predict(candidate, search.target, origin) if value is None else value
        if value is not None:
            predicted[candidate] = value
    _check_records(earlier, {candidate.name for candidate in predicted}, folder)
    order = sorted(predicted, key=lambda candidate: (-predicted[candidate], candidate.name))
    echo(f"  {len(order)} candidates predicted in {time.perf_counter() - phase:.0f} s")

    # the baseline itself is within the quality budget: the search starts from it, unless a size limit rules it out
    best: dict[str, Any] | None = {
        "name": origin.name,
        "candidate": origin.to_dict(),
        "status": "kept",
        "stage": "full",
        "reason": "the baseline itself",
        "wall_s": 0.0,
        "predicted": 1.0,
        "score": 1.0,
        "quality": _quality_numbers(base_row),
        "cost": {key: base_row.get(key) for key in COST_KEYS},
    }
    if search.max_size is not None and search.max_size < 1:
        best = None
    for record in earlier:
        if record["status"] == "kept" and beats(record, best, search.target):
            best = record
    stopped = "every candidate was tried"

    def elapsed() -> float:
        return spent + time.perf_counter() - start

    def save_log(chosen: str | None = None, stop: str | None = None) -> None:
        payload = {
            **header,
            "elapsed_s": elapsed(),
            "candidates": records,
            "baseline": baseline_summary,
            "space": {"legal": legal, **skipped},
            "predictions": {candidate.name: value for candidate, value in predicted.items()},
            **({"chosen": chosen} if chosen else {}),
            **({"stopped": stop} if stop else {}),
        }
        write_json(folder, SEARCH_FILE, payload)

    failed_bases: dict[str, str] = {}
    for candidate in order:
        if candidate.name in done or candidate == origin:
            continue
        if elapsed() > search.time_budget:
            stopped = f"time budget of {search.time_budget:g} s spent"
            break
        # predictions leave out per-step overhead, so they are compared with the best's own prediction: what is
        # predicted well below the best's prediction is not going to measure above it
        if best is not None and predicted[candidate] * search.slack < best["predicted"]:
            stopped = (
                f"no untried candidate is predicted within {search.slack:g}x of the best's prediction "
                f"({best['predicted']:.2f}x; measured {best['score']:.2f}x)"
            )
            break
        if candidate.base in failed_bases:  # its base could not be built: neither can this stack
            record = {
                "name": candidate.name,
                "candidate": candidate.to_dict(),
                "predicted": predicted[candidate],
                "status": "failed",
                "stage": "build",
                "reason": failed_bases[candidate.base],
                "wall_s": 0.0,
            }
        else:
            record = _try(candidate, predicted[candidate], context, settings, search, baseline, reference,
                          base_values, base_row, base_size, costs, scorers, state, echo)  # fmt: skip
            if record["status"] == "failed" and not _base_builds(candidate.base, context):
                failed_bases[candidate.base] = f"its base {candidate.base} could not be built: {record['reason']}"
        records.append(record)
        if record["status"] == "kept" and beats(record, best, search.target):
            best = record
        save_log()
    if best is None:
        save_log(None, stopped)
        raise DiTOptimumError(
            f"No pipeline within `max_size`={search.max_size:g} of the baseline's size kept its quality "
            f"({len(records)} candidates tried, {skipped.get('over_size_limit', 0)} over the limit at their least; "
            f"stopped: {stopped}); the baseline itself is 100%. Allow a larger size, a looser `budget` or more time; "
            f"every candidate is in {str(folder / SEARCH_FILE)!r}."
        )
    chosen = Candidate.from_dict(best["candidate"])
    echo(f"  chosen: {chosen.name} ({best['score']:.2f}x on {search.target}; {stopped})")
    pipeline = built_candidate(chosen, context, settings)
    save_log(chosen.name, stopped)
    return SearchResult(chosen, pipeline, best, records, baseline_summary, elapsed(), stopped, budget, search.target,
                        base_row, reference, {"legal": legal, **skipped})  # fmt: skip


def _span(record: Mapping[str, Any], target: str) -> tuple[float, float]:
    """The range of ``record``'s score over its timed rounds (its score alone for exact targets: size, memory)."""
    return TARGETS[target].span(record.get("cost") or {}) or (record["score"], record["score"])


def beats(record: Mapping[str, Any], best: Mapping[str, Any] | None, target: str) -> bool:
    """Whether kept ``record`` is better than ``best`` (None: nothing kept yet) on ``target``: a higher score, unless
    the two are within the timing noise (their ranges over the timed rounds overlap), where the smaller size wins."""
    if best is None:
        return True
    (low, high), (best_low, best_high) = _span(record, target), _span(best, target)
    if low > best_high or high < best_low or best["name"] == "baseline":
        return record["score"] > best["score"]
    size, best_size = (record.get("cost") or {}).get("size_bytes"), (best.get("cost") or {}).get("size_bytes")
    if size and best_size and size != best_size:
        return size < best_size
    return record["score"] > best["score"]


def _fixed_scorers(settings: BenchmarkSettings, baseline: Any, scorers: tuple[Any, Any]) -> tuple[Any, Any]:
    """The scoring networks every evaluation of the search shares: the domain classifier is fitted on the real images
    the full N leaves over, so a screen at a smaller N would otherwise score with another classifier, in another
    feature space than the baseline's features it is paired with."""
    inception, classifier = scorers
    quality = settings.quality
    if classifier is None and any(metric.family == "domain" for metric in resolve_metrics(quality)):
        real = real_split(quality.reference, quality.reference_split, quality.reference_samples, quality.num_samples,
                          quality.seed)  # fmt: skip
        classifier = domain_classifier(real, output_resolution(baseline), use_cache=quality.use_cache)
    return inception, classifier


def _base_builds(base: str, context: Any) -> bool:
    """Whether ``base`` itself builds (a failure beyond it lies in a stacked part, which other stacks may avoid)."""
    try:
        Candidate(base).build(context)
    except Exception:
        return False
    return True


def built_candidate(candidate: Candidate, context: Any, settings: BenchmarkSettings) -> Any:
    """The candidate's pipeline, recording the steps and guidance it was judged with: loaded with no other
    argument, it samples as it was measured."""
    pipeline = candidate.build(context)
    defaults = pipeline.sampling_defaults
    pipeline.set_sampling_defaults(
        num_inference_steps=int(defaults.get("num_inference_steps", settings.quality.num_inference_steps)),
        guidance_scale=float(defaults.get("guidance_scale", settings.quality.guidance_scale)),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _try(
    candidate: Candidate,
    predicted: float,
    context: Any,
    settings: BenchmarkSettings,
    search: SearchSettings,
    baseline: Any,
    reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray],
    base_values: Mapping[str, float],
    base_row: Mapping[str, Any],
    base_size: int,
    costs: CostModel,
    scorers: tuple[Any, Any],
    state: PartialState,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Build, screen and judge one candidate; its record says how far it got and why it was kept or dropped."""
    start = time.perf_counter()
    record: dict[str, Any] = {"name": candidate.name, "candidate": candidate.to_dict(), "predicted": predicted}
    quality = settings.quality
    resamples = quality.bootstrap
    keys = [metric.key for metric in resolve_metrics(quality)]  # the run's metrics, as the benchmark compares them

    def finish(status: str, stage: str, reason: str) -> dict[str, Any]:
        record.update(status=status, stage=stage, reason=reason, wall_s=time.perf_counter() - start)
        echo(f"  {candidate.name}: {status} at {stage} ({reason})")
        return record

    if search.max_size is not None and costs.size_bytes(candidate) > search.max_size * base_size:
        share = costs.size_bytes(candidate) / base_size
        return finish("dropped", "cost", f"size {100 * share:.0f}% of the baseline's, above {100 * search.max_size:g}%")
    try:
        pipeline = built_candidate(candidate, context, settings)
    except Exception as error:  # a base that cannot be trained here, a path that fails to build: next candidate
        return finish("failed", "build", f"{type(error).__name__}: {error}")
    count = min(search.screen_samples, quality.num_samples)
    if 0 < count < quality.num_samples:
        screen = replace(quality, num_samples=count)
        try:
            resolve_metrics(screen)  # a metric N cannot support (FID below its feature dimension): no screen
        except DiTOptimumError:
            count = 0
        if count:
            inception, classifier = scorers
            evaluation = evaluate_quality(pipeline, screen, inception, classifier, state=state)
            labels = reference[2][:count]
            comparisons = paired_comparisons(
                evaluation.features, labels, (_first(reference[0], count), reference[1], labels), resamples, keys
            )
            accepted, reason = search.budget.judge(comparisons, base_values)
            record["screen"] = {"num_samples": count, "vs_baseline": comparisons, "accepted": accepted}
            if not accepted:
                return finish("dropped", "screen", f"N={count}: {reason}")
    row, evaluation = measure_pipeline(pipeline, settings, baseline, scorers, state)
    comparisons = paired_comparisons(evaluation.features, evaluation.labels, reference, resamples, keys)
    accepted, reason = search.budget.judge(comparisons, base_values)
    record["quality"] = {
        **_quality_numbers(row),
        "vs_baseline": comparisons,
        "verdict": quality_verdict(comparisons),
    }
    record["cost"] = {key: row.get(key) for key in COST_KEYS}
    record["score"] = TARGETS[search.target].score(row, base_row)
    if not accepted:
        return finish("dropped", "full", f"N={row.get('num_samples')}: {reason}")
    if record["score"] is None:
        return finish("dropped", "full", f"its {search.target} cannot be measured on {row.get('runtime')}")
    if search.max_size is not None and row["size_bytes"] > search.max_size * base_row["size_bytes"]:
        return finish("dropped", "full", f"measured size above {100 * search.max_size:g}% of the baseline's")
    return finish("kept", "full", f"{record['score']:.2f}x on {search.target}; {reason}")
