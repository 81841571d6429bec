"""``optimize``: the best pipeline on a target within a quality budget, in one call, with its card and report.

The output folder holds ``pipeline/`` (the chosen pipeline, loadable by its card's line, with the card, its rows and a
sample grid), ``report.md`` and ``pareto.png`` (every candidate tried, its cost, its verdict, why it was kept or
dropped), ``search.json`` (the search log, from which a killed search resumes) and ``work/`` (the models the search
trained, per baseline). Nothing measured elsewhere is carried over: the result is re-measured against the baseline
round-robin, on this machine, in this run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..benchmark.contexts import _ARCHITECTURE_KEYS, VariantContext
from ..benchmark.runner import measure_pipeline, sample_grid_png
from ..benchmark.settings import RESULTS_FILE, BenchmarkSettings, TrainingRecipe
from ..benchmark.significance import WEAK_BASELINE, paired_comparisons, quality_verdict
from ..configs import dit_config, preset_names
from ..errors import DiTOptimumError
from ..evaluation.efficiency import SpeedSettings
from ..evaluation.hardware import hardware_description
from ..evaluation.quality import QualitySettings, output_resolution, resolve_metrics
from ..files import (
    check_save_target,
    check_writable,
    claim_files,
    folder_lock,
    path_overlap,
    read_manifest,
    write_json,
)
from ..hub.cards import RESULTS_FILE as CARD_RESULTS_FILE
from ..hub.cards import SAMPLE_GRID
from ..hub.releases import write_card_files
from ..models.autoencoder import IdentityAutoencoder
from ..models.runtimes import weights_digest
from ..pipelines.dit import DiTOptimumPipeline
from ..schemas import check_repo_id
from .budget import QualityBudget
from .report import PLOT_FILE, REPORT_FILE, write_search_report
from .search import SEARCH_FILE, SearchResult, SearchSettings, run_search

PIPELINE_FOLDER = "pipeline"
WORK_FOLDER = "work"
OUTPUT_FILES = (REPORT_FILE, PLOT_FILE, SEARCH_FILE, RESULTS_FILE)
DEFAULT_REPO_ID = "dit-optimum/dit-optimized"
GRID_IMAGES = 20


@dataclass
class OptimizeResult:
    """The chosen pipeline, its final measurement (a benchmark row: quality with intervals and verdict, cost against
    the baseline), the search, and where everything was written."""

    pipeline: DiTOptimumPipeline
    row: dict[str, Any]
    search: SearchResult
    output_dir: Path

    @property
    def pipeline_dir(self) -> Path:
        return self.output_dir / PIPELINE_FOLDER

    @property
    def report(self) -> Path:
        return self.output_dir / REPORT_FILE


def matching_preset(pipeline: DiTOptimumPipeline) -> str:
    """The DiT preset whose architecture ``pipeline``'s transformer has (its trained models are trained as that
    preset); a model of no preset's shape is refused, naming the presets."""
    config = pipeline.transformer.config
    heads, widths = config.get("layer_heads"), config.get("layer_mlp_dims")
    uniform = (heads is None or set(heads) == {config.get("num_attention_heads")}) and (
        widths is None or (len(set(widths)) == 1 and widths[0] == int(config.get("mlp_ratio", 4) * _width(config)))
    )
    for name in preset_names():
        expected = dit_config(name)
        if uniform and all(config.get(key) == expected.get(key) for key in _ARCHITECTURE_KEYS):
            return name
    found = ", ".join(f"{key}={config.get(key)!r}" for key in (*_ARCHITECTURE_KEYS, "layer_heads", "layer_mlp_dims"))
    raise DiTOptimumError(
        f"`pipe` is not a DiT preset ({found}); `optimize` searches from a preset's architecture: one of "
        f"{', '.join(preset_names())}."
    )


def _width(config: Mapping[str, Any]) -> int:
    return int(config.get("num_attention_heads")) * int(config.get("attention_head_dim"))


def _loaded_baseline(pipe: Any) -> DiTOptimumPipeline:
    """The baseline pipeline (loaded when given as a folder or Hub id); a runtime pipeline is refused."""
    if isinstance(pipe, (str, os.PathLike)):
        pipeline = DiTOptimumPipeline.from_pretrained(pipe)
    elif isinstance(pipe, DiTOptimumPipeline):
        pipeline = pipe
    else:
        raise DiTOptimumError(f"`pipe` must be a DiTOptimumPipeline or a pipeline folder, got {type(pipe).__name__}.")
    if getattr(pipeline.transformer, "runtime", None) is not None:
        raise DiTOptimumError("`pipe` runs an exported runtime: give the float32 torch pipeline it was made from.")
    return pipeline


def _claim_output(output_dir: Any, pipe: Any) -> Path:
    """The output folder, checked before any work: not the baseline's folder or one around it, no file of a user's
    at the names it writes, and ``pipeline/`` absent or written by this package."""
    output = claim_files(output_dir, OUTPUT_FILES)
    if isinstance(pipe, (str, os.PathLike)) and path_overlap(output, pipe) is not None:
        raise DiTOptimumError(
            f"`output_dir`={str(output_dir)!r} and the baseline {str(pipe)!r} overlap: the result would be written "
            "over or into the baseline. Choose an output folder outside it."
        )
    folder = output / PIPELINE_FOLDER
    check_save_target(folder, "model_index.json", False, "output_dir")
    if os.path.lexists(folder) and read_manifest(folder) is None:
        raise DiTOptimumError(
            f"`output_dir`={str(output_dir)!r} holds a {PIPELINE_FOLDER}/ folder that dit-optimum did not write; the "
            "chosen pipeline is saved there. Move it away or choose another output folder."
        )
    claim_files(folder, ("README.md", CARD_RESULTS_FILE, SAMPLE_GRID))
    check_writable(output)
    return output


def _baseline_source(pipe: Any, pipeline: DiTOptimumPipeline, work: Path) -> tuple[str, Path]:
    """The baseline as a folder to train from, and the work folder of its models (one per baseline's weights:
    models derived from another baseline are never reused)."""
    folder = work / weights_digest(pipeline.transformer)[:16]
    source = str(pipe) if isinstance(pipe, (str, os.PathLike)) else ""
    if not source:  # an in-memory pipeline is saved once, as the folder its derived models train from
        source = str(folder / "baseline")
        if not (Path(source) / "model_index.json").is_file():
            pipeline.save_pretrained(source)
    return source, folder


def optimize(
    pipe: DiTOptimumPipeline | str | os.PathLike,
    reference: str = "digits",
    budget: str | Mapping[str, float] | QualityBudget | None = None,
    target: str = "sampling",
    output_dir: str | os.PathLike = "optimized",
    *,
    time_budget: float = 600.0,
    max_size: float | None = None,
    data: str | None = None,
    quality: QualitySettings | None = None,
    speed: SpeedSettings | None = None,
    training: TrainingRecipe | None = None,
    repo_id: str = DEFAULT_REPO_ID,
    screen_samples: int = 100,
    bases: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    inception: Any = None,
    classifier: Any = None,
    echo: Callable[[str], None] = print,
) -> OptimizeResult:
    """The best pipeline derived from ``pipe`` on ``target`` (``sampling`` | ``latency`` | ``size`` | ``memory``)
    whose quality against ``pipe`` on ``reference`` stays within ``budget`` (default: no significant change; or
    ``{"class_accuracy": 1, "fd_domain": 10}``: points / percent of the baseline), searched for at most
    ``time_budget`` seconds over the registry's stacks, at most ``max_size`` of the baseline's size when given.

    Bases that train (recoveries, step-distilled students) train on ``data`` (default: ``reference``) under
    ``training`` (default: the default run's recipe). ``quality`` / ``speed`` are the benchmark's measurements
    (default: the default run's, against ``reference``). ``bases`` / ``paths`` restrict the search to those
    registered bases / forward paths (default: all). Writes into ``output_dir`` (see the module doc) and resumes a
    killed search there. ``inception`` / ``classifier`` replace the scoring networks (tests inject small ones)."""
    search = SearchSettings(
        QualityBudget.parse(budget),
        target,
        time_budget,
        max_size,
        screen_samples,
        bases=tuple(bases) if bases is not None and not isinstance(bases, str) else bases,
        paths=tuple(paths) if paths is not None and not isinstance(paths, str) else paths,
    )
    search.validate()
    check_repo_id(repo_id, "repo_id")
    baseline = _loaded_baseline(pipe)  # refused here, before the output folder is touched
    variant = matching_preset(baseline)
    output = _claim_output(output_dir, pipe)
    state = PartialState(cpu=True)
    with folder_lock(output, "optimize"):
        source, work = _baseline_source(pipe, baseline, output / WORK_FOLDER)
        pixels = isinstance(baseline.vae, IdentityAutoencoder)
        defaults = BenchmarkSettings()
        settings = BenchmarkSettings(
            output_dir=str(work),
            variants=(variant,),
            techniques=("baseline",),
            data=data or reference,
            image_size=output_resolution(baseline),
            channels=baseline.transformer.config.in_channels if pixels else baseline.vae.config.in_channels,
            pretrained={variant: source},
            quality=quality or replace(defaults.quality, reference=reference),
            speed=speed or defaults.speed,
            training=training or defaults.training,
        )
        settings.validate()
        context = VariantContext(settings, variant, device="cpu")
        scorers = (inception, classifier)
        context.scorers = scorers
        echo(f"Searching {variant} stacks for the best {target} within: {search.budget.describe()}")
        result = run_search(context, settings, search, output, scorers, state, echo)
        echo("  measuring the chosen pipeline against the baseline (round-robin, this machine)")
        row, grid = final_row(result, settings, context, scorers, state)
        base_row = {"variant": variant, "technique": "baseline", **result.baseline_row, "status": "ok"}
        result.pipeline.save_pretrained(output / PIPELINE_FOLDER)
        results = {"settings": settings.comparable(), "rows": [base_row, row]}
        write_json(output, RESULTS_FILE, results)
        write_card_files(output / PIPELINE_FOLDER, results, row, repo_id, None, grid)
        hardware = row["hardware"]
        machine = f"{hardware['cpu']}, {hardware['threads']} threads, torch {hardware['torch']}"
        write_search_report(result, output, row, notes=[f"Measured on {machine}."])
    return OptimizeResult(result.pipeline, row, result, output)


def final_row(
    result: SearchResult, settings: BenchmarkSettings, context: Any, scorers: tuple[Any, Any], state: PartialState
) -> tuple[dict[str, Any], bytes]:
    """The chosen pipeline measured as a benchmark row (technique ``optimized``) against the baseline, with the
    paired comparison on the baseline's samples and the benchmark's verdict; and a PNG grid of its first samples."""
    measured, evaluation = measure_pipeline(
        result.pipeline, settings, context.baseline(), scorers, state, keep_images=GRID_IMAGES
    )
    grid = sample_grid_png(evaluation.images)
    keys = [metric.key for metric in resolve_metrics(settings.quality)]
    comparisons = paired_comparisons(evaluation.features, evaluation.labels, result.baseline_features,
                                     settings.quality.bootstrap, keys)  # fmt: skip
    verdict = WEAK_BASELINE if result.baseline.get("baseline_weak") else quality_verdict(comparisons)
    return {
        "variant": context.variant,
        "technique": "optimized",
        "description": f"search result: {result.candidate.name} ({result.target}, {result.budget.describe()})",
        **measured,
        "vs_baseline": comparisons,
        "quality_verdict": verdict,
        "optimize": result.summary(),
        "device": str(state.device),
        "hardware": hardware_description(),
        "status": "ok",
    }, grid
