"""Releases: one Hub-ready folder per finished benchmark cell (the pipeline as measured, its card, its sample grid
and its rows of the results file), rebuilt through the same technique registry the benchmark ran."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..benchmark.contexts import VariantContext
from ..benchmark.runner import load_results
from ..benchmark.settings import BenchmarkSettings, settings_from_results
from ..errors import DiTOptimumError
from ..evaluation.size import saved_size_bytes
from ..files import check_save_target, claim_files, folder_lock, read_inside, write_bytes, write_json, write_text
from ..models.stock import folder_stock_problem
from ..models.transformer import is_quantized
from ..pipelines.dit import DiTOptimumPipeline
from ..schemas import check_namespace
from ..techniques.registry import get_technique
from ..training.config import TrainConfig
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
    settings = _recorded_settings(results.get("settings"), results_dir)
    targets = {id(row): output_dir / repo_name(row["variant"], row["technique"]) for row in rows}
    for target in targets.values():  # every target checked before the first is written
        check_save_target(target, "model_index.json", overwrite, "output_dir")
        claim_files(target, ("README.md", RESULTS_FILE, SAMPLE_GRID), overwrite)  # the card files: a user's stay

    released = []
    with folder_lock(results_dir, "release"):
        contexts: dict[str, VariantContext] = {}
        for row in rows:
            variant = row["variant"]
            context = contexts.setdefault(variant, VariantContext(settings, variant, trainer=_never_train))
            technique = get_technique(row["technique"])
            pipeline = technique.rebuild(context, row) if technique.rebuild else technique.build(context)
            _check_measured(pipeline, row)
            repo_id = f"{org}/{repo_name(variant, row['technique'])}"
            base = None if row["technique"] == "baseline" else f"{org}/{repo_name(variant, 'baseline')}"
            released.append(
                _write_release(pipeline, results, row, repo_id, base, results_dir, targets[id(row)], overwrite)
            )
    return released


# What a results file's `settings` must record for its cells to be rebuilt (``BenchmarkSettings.comparable()``).
RECORDED_SETTINGS = ("data", "image_size", "channels", "training", "quality", "speed")


def _recorded_settings(stored: dict[str, Any] | None, results_dir: Path) -> BenchmarkSettings:
    # The settings the benchmark measured with; a file that lacks some (none at all, or a key removed) names them.
    missing = [key for key in RECORDED_SETTINGS if key not in (stored or {})]
    if missing:
        where = "records no `settings`" if stored is None else f"lacks `settings.{'`, `settings.'.join(missing)}`"
        raise DiTOptimumError(
            f"The results file in {str(results_dir)!r} {where}: a release rebuilds its cells with the settings they "
            f"were measured with, so `settings` must hold {', '.join(RECORDED_SETTINGS)} (as `dit-optimum benchmark` "
            "writes them)."
        )
    return settings_from_results(stored, str(results_dir))


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
    overwrite: bool = False,
) -> Release:
    pipeline.save_pretrained(folder, overwrite=overwrite)
    save_half_precision_variants(pipeline, folder, overwrite=overwrite)
    grid = sample_grid_bytes(results_dir, row)
    write_card_files(folder, results, row, repo_id, base_model, grid, overwrite=overwrite)
    return Release(repo_id, folder, row["variant"], row["technique"])


# The half-precision weight files a float32 release carries beside its float32 ones, as diffusers repositories do:
# `from_pretrained(repo, variant="fp16", torch_dtype=torch.float16)` downloads only those.
HALF_PRECISION_VARIANTS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


def save_half_precision_variants(pipeline: DiTOptimumPipeline, folder: Path, overwrite: bool = False) -> list[str]:
    """Beside a saved float32 pipeline, its weights cast to float16 and bfloat16 as the ``fp16`` / ``bf16``
    variants (``diffusion_pytorch_model.fp16.safetensors``, ...), in the same format (stock or package) as the
    float32 files; the configs they rewrite are the same. A quantized or already half-precision transformer, or one
    that runs an exported runtime, gets none (its weights are what was measured). Returns the variants written."""
    transformer = pipeline.transformer
    if is_quantized(transformer) or transformer.dtype != torch.float32 or getattr(transformer, "runtime", None):
        return []  # a runtime's graph is exported from the float32 weights: half-precision files would not run it
    for variant, dtype in HALF_PRECISION_VARIANTS.items():
        half = copy.deepcopy(pipeline)
        for component in half.components.values():
            if isinstance(component, torch.nn.Module):  # torch's cast: diffusers' `to` warns about float32 modules
                torch.nn.Module.to(component, dtype)
        half.save_pretrained(folder, overwrite=overwrite, variant=variant)
    return list(HALF_PRECISION_VARIANTS)


def write_card_files(
    folder: Path,
    results: dict[str, Any],
    row: dict[str, Any],
    repo_id: str,
    base_model: str | None,
    grid: bytes | None,
    overwrite: bool = False,
) -> None:
    """Beside a saved pipeline: the release's rows of the results (its baseline and itself, and who it is),
    the sample grid (PNG bytes, when there is one) and the card, each written whole through the write path (a
    user's file of the same name is replaced only with ``overwrite``)."""
    own_rows = [r for r in results["rows"] if r["variant"] == row["variant"] and r["technique"] == "baseline"]
    if row["technique"] != "baseline":
        own_rows.append(row)
    identity = {"variant": row["variant"], "technique": row["technique"], "repo_id": repo_id, "base_model": base_model}
    own = {"settings": results.get("settings"), "rows": own_rows, "release": identity}
    write_json(folder, RESULTS_FILE, own, overwrite=overwrite)
    if grid is not None:
        write_bytes(folder, SAMPLE_GRID, grid, overwrite=overwrite)
    # the loading line that works for what the folder holds: plain diffusers for diffusers' own classes
    needs_package = folder_stock_problem(folder)
    card = model_card(own, row, repo_id, base_model, SAMPLE_GRID if grid is not None else None, needs_package)
    write_text(folder, "README.md", str(card), overwrite=overwrite)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sample_grid_bytes(results_dir: Path, row: dict[str, Any]) -> bytes | None:
    """The row's sample grid (a PNG inside ``results_dir``), or None when the row names none or it is gone; a path
    outside the folder, a link or a file that is not a PNG is refused naming the field."""
    relative = row.get("sample_grid")
    if not relative:
        return None
    if isinstance(relative, str) and not os.path.lexists(Path(results_dir) / relative) and ".." not in relative:
        return None
    data = read_inside(results_dir, relative, "sample_grid")
    if not data.startswith(_PNG_SIGNATURE):
        raise DiTOptimumError(f"`sample_grid`={relative!r} in {str(results_dir)!r} is not a PNG image.")
    return data
