"""The multi-method benchmark (the main job): model variants x techniques, each cell = train or load, optimize,
evaluate (FID/sFID/KID, GFLOPs, throughput, latency, peak memory, size), resumable.

Every technique comes from the registry (``techniques.registry``); the runner never special-cases one. After each
cell the whole results file is rewritten atomically, so a killed run loses at most the cell in progress, and a
rerun skips the finished cells. Training runs inside a cell checkpoint and resume on their own. One run at a time
holds the output folder (a lock), so two runs never mix their files or time each other's load.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image

from ..errors import DiTOptimumError
from ..evaluation.domain import TrainedClassifier
from ..evaluation.efficiency import efficiency_metrics
from ..evaluation.features import FeatureExtractor
from ..evaluation.fid import inception_extractor
from ..evaluation.hardware import hardware_description
from ..evaluation.quality import QualityEvaluation, evaluate_quality, feature_dimensions, resolve_metrics
from ..files import (
    check_writable,
    claim_files,
    csv_text,
    folder_lock,
    read_manifest,
    write_bytes,
    write_json,
    write_text,
)
from ..schemas import RESULTS, FileContentError, SchemaError, read_json_file
from ..techniques.registry import get_technique
from ..training.config import TrainConfig
from ..training.trainer import train
from .contexts import UntrainedContext, VariantContext, slug
from .settings import OUTPUT_FILES, RESULTS_CSV, RESULTS_FILE, BenchmarkSettings
from .significance import compare_with_baselines, features_path, save_features


def load_results(output_dir: str | Path) -> dict[str, Any]:
    """The results file of an output folder (empty if there is none yet)."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.exists():  # a FIFO or a folder in its place is refused by the read, not taken for no file
        return {"rows": []}
    try:
        return read_json_file(path, RESULTS)
    except SchemaError as error:
        raise DiTOptimumError(
            f"The results file {str(path)!r} is not a dit-optimum results file: {error.problem}; move it away to "
            "start this folder over."
        ) from None
    except FileContentError as error:
        raise DiTOptimumError(
            f"The results file {str(path)!r} is damaged ({error.problem}); move it away to start this folder over."
        ) from None


def _earlier_run(output_dir: Path) -> bool:
    """The folder holds a valid results file of a run from before manifests: its fixed-name files are the run's."""
    path = output_dir / RESULTS_FILE
    if read_manifest(output_dir) is not None or not os.path.isfile(path) or os.path.islink(path):
        return False
    try:
        read_json_file(path, RESULTS)
    except (SchemaError, FileContentError):
        return False
    return True


def _check_comparable(previous: Mapping[str, Any], settings: BenchmarkSettings) -> None:
    # Only finished cells bind the folder to its settings: a run whose cells all failed may be corrected and rerun.
    if not any(row.get("status") == "ok" for row in previous["rows"]):
        return
    stored = previous.get("settings")
    current = settings.comparable()
    if stored is not None:  # a setting newer than the results file was, for its rows, at its default
        stored = _with_defaults(stored, BenchmarkSettings().comparable())
    if stored is not None and stored != current:
        changes = "; ".join(
            f"{key}: {json.dumps(old, default=str)[:80]} -> {json.dumps(new, default=str)[:80]}"
            for key, old, new in _differences(stored, current)
        )
        raise DiTOptimumError(
            f"`output_dir`={settings.output_dir!r} holds results measured with other settings (results.json -> this "
            f"run: {changes}): choose another output folder, or delete its results.json to start over."
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted keys where two settings trees differ, with both values (at most 8)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [(prefix or "settings", old, new)] if old != new else []
    found = []
    for key in sorted(set(old) | set(new), key=str):
        found += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
    return found[:8]


def _with_defaults(stored: Any, defaults: Any) -> Any:
    if not isinstance(stored, dict) or not isinstance(defaults, dict):
        return stored
    filled = {key: _with_defaults(value, defaults.get(key)) for key, value in stored.items()}
    return {**{key: value for key, value in defaults.items() if key not in stored}, **filled}


def sample_grid_png(images: np.ndarray, columns: int = 10, min_side: int = 64) -> bytes:
    """uint8 images (B, H, W, C) as the bytes of one PNG grid, nearest-upscaled so tiny images stay visible."""
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    scale = max(1, -(-min_side // height))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_sample_grid(images: np.ndarray, path: Path, columns: int = 10, min_side: int = 64) -> None:
    """``sample_grid_png`` of ``images``, written atomically to ``path``."""
    write_bytes(path.parent, path.name, sample_grid_png(images, columns, min_side))


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: json.dumps(value) if isinstance(value, (dict, list)) else value for key, value in row.items()}


def run_benchmark(
    settings: BenchmarkSettings,
    inception: FeatureExtractor | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    trainer: Callable[[TrainConfig], Path] = train,
    classifier: TrainedClassifier | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished cell of the matrix and return all rows (finished earlier ones included), each finished
    row compared with its variant's baseline (``vs_baseline``, ``quality_verdict``).

    ``inception`` / ``classifier`` replace the Inception network / the domain classifier (tests inject small ones);
    ``on_cell`` is called with each new row.
    """
    settings.validate()
    output_dir = Path(settings.output_dir)
    state = PartialState(cpu=not torch.cuda.is_available())
    if not settings.speed_only:
        # an impossible metric fails now, not in every cell
        metrics = resolve_metrics(settings.quality, feature_dimensions(inception))
        if inception is None and any(metric.family == "inception" for metric in metrics):
            inception = inception_extractor(settings.quality.inception_weights, state.device)
    if state.is_main_process:  # before any work: a user's results.json or report.md there is never replaced
        claim_files(output_dir, OUTPUT_FILES, overwrite=_earlier_run(output_dir))
        check_writable(output_dir)
    with folder_lock(output_dir, "benchmark", enabled=state.is_main_process):
        previous = load_results(output_dir)
        _check_comparable(previous, settings)
        # a finished row holding NaN (a hand-edited or older file) is not finished: its cell runs again
        records = {(row["variant"], row["technique"]): _finished_row(row) for row in previous["rows"]}
        hardware = hardware_description()
        for variant in settings.variants:
            if settings.speed_only:
                context = UntrainedContext(settings, variant, device=state.device)
            else:
                context = VariantContext(settings, variant, trainer, device=state.device)
            for name in settings.techniques:
                if records.get((variant, name), {}).get("status") == "ok":
                    continue
                row = _finished_row(_run_cell(settings, context, name, (inception, classifier), state))
                row.update(device=str(state.device), hardware=hardware)
                state.wait_for_everyone()
                if state.is_main_process:
                    records[(variant, name)] = row
                    _write_results(output_dir, settings, list(records.values()))
                    if on_cell is not None:
                        on_cell(row)
        rows = list(records.values())
        if state.is_main_process and not settings.speed_only:
            compare_with_baselines(rows, output_dir, settings.quality.bootstrap)
            _write_results(output_dir, settings, rows)
    return rows


def measure_pipeline(
    pipeline: Any,
    settings: BenchmarkSettings,
    reference: Any,
    scorers: tuple[FeatureExtractor | None, TrainedClassifier | None],
    state: PartialState,
    keep_images: int = 0,
) -> tuple[dict[str, Any], QualityEvaluation | None]:
    """The benchmark's measurement of one built pipeline: its quality (unless ``speed_only``) and its cost, timed
    round-robin with ``reference`` (the baseline) in the same rounds. Returns the row's numbers (``quality_wall_s``
    and ``speed_wall_s`` included) and the quality evaluation (per-sample features for the paired comparison)."""
    row: dict[str, Any] = {}
    quality = None
    if not settings.speed_only:
        phase = time.perf_counter()
        inception, classifier = scorers
        quality = evaluate_quality(pipeline, settings.quality, inception, classifier, keep_images, state=state)
        row.update(quality.metrics, quality_wall_s=time.perf_counter() - phase)
    if state.is_main_process:
        phase = time.perf_counter()
        # the baseline is re-timed with every candidate, interleaved with it: paired ratios survive a noisy machine
        reference.set_progress_bar_config(disable=True)
        row.update(efficiency_metrics(pipeline, settings.speed, reference), speed_wall_s=time.perf_counter() - phase)
        # the steps the pipeline really sampled with (its own where it records them): the quality ones
        row["sampling_steps"] = (row.get("quality_settings") or row["speed_settings"])["num_inference_steps"]
        if getattr(pipeline, "sampling_defaults", None):  # what a release's loading code must pass to DiTPipeline
            row["sampling_defaults"] = dict(pipeline.sampling_defaults)
        if getattr(pipeline, "forward_path_choice", None):  # a measured choice: the path and every candidate
            row["forward_path_choice"] = dict(pipeline.forward_path_choice)
    return row, quality


def _run_cell(
    settings: BenchmarkSettings,
    context: VariantContext | UntrainedContext,
    name: str,
    scorers: tuple[FeatureExtractor | None, TrainedClassifier | None],
    state: PartialState,
) -> dict[str, Any]:
    """Build one technique's pipeline and measure it; a failure is recorded in the row (and retried next run)."""
    technique = get_technique(name)
    start = time.perf_counter()
    row: dict[str, Any] = {"variant": context.variant, "technique": name, "description": technique.description}
    try:
        context.scorers = scorers  # a technique that measures while it builds (the optimizer) scores alike
        pipeline = technique.build(context).to(state.device)
        pipeline.set_progress_bar_config(disable=True)
        row["build_wall_s"] = time.perf_counter() - start  # training included, when the cell trains
        measured, quality = measure_pipeline(
            pipeline, settings, context.baseline(), scorers, state, keep_images=settings.grid_size
        )
        row.update(measured)
        if state.is_main_process:
            row.update(context.trained.get(name, {}))
            if getattr(pipeline, "search_summary", None):  # an optimizer's pipeline: what it searched and chose
                row["optimize"] = dict(pipeline.search_summary)
            if quality is not None:
                save_features(features_path(settings.output_dir, context.variant, name), quality)
                grid = Path(settings.output_dir) / "samples" / f"{slug(context.variant)}__{slug(name)}.png"
                save_sample_grid(quality.images, grid)
                row["sample_grid"] = str(grid.relative_to(settings.output_dir))
        row["status"] = "ok"
    except Exception as error:  # one broken cell must not end a long matrix: record it, go on, retry next run
        row.update(status="failed", error=f"{type(error).__name__}: {error}")
    row["cell_wall_s"] = time.perf_counter() - start
    return row


def _non_finite(value: Any, path: str = "") -> list[str]:
    """Dotted paths of the NaN / inf numbers in a row (nested dicts and lists included)."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return [f"{path}={float(value)}"]
    if isinstance(value, Mapping):
        return [found for key, item in value.items() for found in _non_finite(item, f"{path}.{key}" if path else key)]
    if isinstance(value, (list, tuple)):
        return [found for index, item in enumerate(value) for found in _non_finite(item, f"{path}[{index}]")]
    return []


def _finished_row(row: dict[str, Any]) -> dict[str, Any]:
    """A cell's row as recorded: an ``ok`` row holding a NaN / inf number is a failed cell whose error names the
    metric (it is not a result, and it runs again next time), and no row keeps a non-finite number (results.json
    is strict JSON: such entries are left out)."""
    bad = _non_finite(row)
    if bad and row.get("status") == "ok":
        row = {
            **row,
            "status": "failed",
            "error": f"DiTOptimumError: non-finite metric(s) {', '.join(bad[:6])}: the cell's samples or measurements "
            "are NaN/inf (diverged training, non-finite weights or a broken measurement), so it is not a result.",
        }
    return _finite_values(row)


def _finite_values(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without its non-finite numbers: an entry holding one (a number, or a list with one) is left out, in
    nested objects too (results.json is strict JSON, and a null would not be a number either)."""
    kept = {}
    for key, value in row.items():
        if isinstance(value, dict):
            kept[key] = _finite_values(value)
        elif not _non_finite(value):
            kept[key] = float(value) if isinstance(value, np.floating) else value
    return kept


def _write_results(output_dir: Path, settings: BenchmarkSettings, rows: Sequence[dict[str, Any]]) -> None:
    payload = {"settings": settings.comparable(), "rows": [_finite_values(row) for row in rows]}
    write_json(output_dir, RESULTS_FILE, payload)
    write_text(output_dir, RESULTS_CSV, csv_text([_flat(row) for row in rows]))
