"""Releases: one Hub-ready folder per finished benchmark cell (the pipeline as measured, its card, its sample grid
and its rows of the results file), rebuilt through the same technique registry the benchmark ran."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..benchmark.contexts import VariantContext
from ..benchmark.runner import load_results
from ..benchmark.settings import settings_from_results
from ..errors import DiTOptimumError
from ..evaluation.size import saved_size_bytes
from ..pipelines.dit import DiTOptimumPipeline
from ..schemas import check_namespace
from ..techniques.registry import get_technique
from ..training.config import TrainConfig
from ..utils import atomic_file, check_save_target, folder_lock, write_json_atomic
from .cards import RESULTS_FILE, SAMPLE_GRID, model_card, repo_name


@dataclass(frozen=True)
class Release:
    """One released cell: its repository id, the folder that holds it, and what it is."""

    repo_id: str
    folder: Path
    variant: str
    technique: str


def _never_train(config: TrainConfig) -> Path:
    raise DiTOptimumError(
        f"The trained model {config.output_dir!r} is missing (or unfinished): a release ships what the benchmark "
        "trained and measured; run the benchmark into that results folder first."
    )


def release(
    results_dir: str | Path,
    org: str,
    output_dir: str | Path,
    techniques: list[str] | None = None,
    overwrite: bool = False,
) -> list[Release]:
    """Write ``<output_dir>/<repo name>/`` for every finished cell of ``results_dir`` (or only ``techniques``):
    the pipeline as the benchmark built it (trained models loaded, post-training ones re-applied to the baseline and
    checked against the measured size), ``README.md`` (the card), ``samples.png`` and ``dit_optimum_results.json``.

    Derived models name the variant's baseline release as ``base_model``.
    """
    check_namespace(org)
    results_dir, output_dir = Path(results_dir), Path(output_dir)
    if not (results_dir / "results.json").exists():  # a FIFO or a folder there is refused by the read
        raise DiTOptimumError(f"`results_dir`={str(results_dir)!r} holds no results.json: run the benchmark first.")
    results = load_results(results_dir)
    if (results.get("settings") or {}).get("speed_only"):
        raise DiTOptimumError(
            f"{str(results_dir)!r} holds a --speed-only run: its models are untrained, there is nothing to release."
        )
    rows = [row for row in results["rows"] if row.get("status") == "ok"]
    if techniques is not None:
        unknown = sorted(set(techniques) - {row["technique"] for row in rows})
        if unknown:
            finished = ", ".join(sorted({row["technique"] for row in rows})) or "none"
            raise DiTOptimumError(f"`techniques` {unknown} have no finished cell here; finished: {finished}.")
        rows = [row for row in rows if row["technique"] in techniques]
    if not rows:
        raise DiTOptimumError(f"{str(results_dir)!r} has no finished cell to release.")
    targets = {id(row): output_dir / repo_name(row["variant"], row["technique"]) for row in rows}
    for target in targets.values():  # every target checked before the first is written
        check_save_target(target, "model_index.json", overwrite, "output_dir")

    settings = settings_from_results(results.get("settings") or {}, str(results_dir))
    released = []
    with folder_lock(results_dir, "release"):
        contexts: dict[str, VariantContext] = {}
        for row in rows:
            variant = row["variant"]
            context = contexts.setdefault(variant, VariantContext(settings, variant, trainer=_never_train))
            pipeline = get_technique(row["technique"]).build(context)
            _check_measured(pipeline, row)
            repo_id = f"{org}/{repo_name(variant, row['technique'])}"
            base = None if row["technique"] == "baseline" else f"{org}/{repo_name(variant, 'baseline')}"
            released.append(_write_release(pipeline, results, row, repo_id, base, results_dir, targets[id(row)]))
    return released


def _check_measured(pipeline: DiTOptimumPipeline, row: dict[str, Any]) -> None:
    # The rebuilt model must be the measured one: same saved size to the byte (weights, dtype, quantization).
    size = saved_size_bytes(pipeline.transformer)
    if row.get("size_bytes") is not None and size != row["size_bytes"]:
        raise DiTOptimumError(
            f"The rebuilt {row['variant']} / {row['technique']} saves to {size} bytes, the measured one to "
            f"{row['size_bytes']}: the models in the results folder changed since they were measured; rerun the "
            "benchmark into a new folder."
        )


def _write_release(
    pipeline: DiTOptimumPipeline,
    results: dict[str, Any],
    row: dict[str, Any],
    repo_id: str,
    base_model: str | None,
    results_dir: Path,
    folder: Path,
) -> Release:
    pipeline.save_pretrained(folder, overwrite=True)  # the target was checked above, with the user's choice
    grid = results_dir / row["sample_grid"] if row.get("sample_grid") else None
    write_card_files(folder, results, row, repo_id, base_model, grid)
    return Release(repo_id, folder, row["variant"], row["technique"])


def write_card_files(
    folder: Path,
    results: dict[str, Any],
    row: dict[str, Any],
    repo_id: str,
    base_model: str | None,
    grid: Path | None,
) -> None:
    """Beside a saved pipeline: the release's rows of the results (its baseline and itself, and who it is),
    the sample grid (when ``grid`` exists) and the card, each written atomically."""
    own_rows = [r for r in results["rows"] if r["variant"] == row["variant"] and r["technique"] == "baseline"]
    if row["technique"] != "baseline":
        own_rows.append(row)
    identity = {"variant": row["variant"], "technique": row["technique"], "repo_id": repo_id, "base_model": base_model}
    own = {"settings": results.get("settings"), "rows": own_rows, "release": identity}
    write_json_atomic(folder / RESULTS_FILE, own)
    has_grid = grid is not None and grid.is_file()
    if has_grid and grid.resolve() != (folder / SAMPLE_GRID).resolve():
        with atomic_file(folder / SAMPLE_GRID) as temporary:
            shutil.copyfile(grid, temporary)
    card = model_card(own, row, repo_id, base_model, SAMPLE_GRID if has_grid else None)
    with atomic_file(folder / "README.md") as temporary:
        card.save(temporary)
