"""Which differences against the baseline lie outside the noise.

Quality: every cell stores its per-sample features (``features/<variant>__<technique>.npz``); a technique is
compared with its variant's baseline by a paired bootstrap of the difference of each quality metric (sample ``i``
has the same class and seed in both cells). Speed: the baseline is re-timed in every cell, round-robin with the
technique, and a change counts when the paired ratios of all rounds lie on the same side of 1.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.declarations import all_metrics
from ..evaluation.intervals import paired_comparison
from ..evaluation.quality import QualityEvaluation
from ..files import write_bytes
from .contexts import slug

FEATURES_FOLDER = "features"
WEAK_BASELINE = "weak baseline"
VERDICTS = ("costs quality", "no significant change", "better quality", WEAK_BASELINE)
# When is a baseline too far from real data for any comparison with it to mean something: per quality metric with a
# real-vs-real floor, the factor of the floor past which the baseline is weak (below it for a metric where higher is
# better, above it where lower is). Declared here once; the report, the command line and the model cards read it.
WEAK_BASELINE_FACTORS: dict[str, float] = {
    "class_accuracy": 0.8,  # below 80% of the real images' class accuracy: it does not draw its classes
    "fd_domain": 3.0,  # above 3x the real-vs-real Frechet distance: its images are not yet the data's
}
WEAK_BASELINE_ADVICE = (
    "train the baseline longer (`--train-steps`, e.g. twice as many) or load a trained one "
    "(`--pretrained VARIANT=PIPELINE`), then rerun into a new output folder"
)


def features_path(output_dir: str | Path, variant: str, technique: str) -> Path:
    """Where the per-sample features of one cell are kept."""
    return Path(output_dir) / FEATURES_FOLDER / f"{slug(variant)}__{slug(technique)}.npz"


def save_features(path: Path, evaluation: QualityEvaluation) -> None:
    """The per-sample features, labels and reference features of one cell (what a paired comparison needs)."""
    arrays = {f"generated/{key}": value for key, value in evaluation.features.items()}
    arrays.update({f"reference/{key}": value for key, value in evaluation.reference.items()})
    buffer = io.BytesIO()
    np.savez(buffer, labels=evaluation.labels, **arrays)
    write_bytes(path.parent, path.name, buffer.getvalue())


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as stored:
        generated = {k.split("/", 1)[1]: stored[k] for k in stored.files if k.startswith("generated/")}
        reference = {k.split("/", 1)[1]: stored[k] for k in stored.files if k.startswith("reference/")}
        return generated, reference, stored["labels"]


def weak_baseline(row: dict[str, Any]) -> str | None:
    """Why a baseline row is too far from its real-vs-real floors for comparisons with it to mean something
    (``WEAK_BASELINE_FACTORS``; every metric with a value and a floor is read), or None when it is not weak."""
    reasons = []
    for metric in all_metrics("quality"):
        factor = WEAK_BASELINE_FACTORS.get(metric.key)
        value, floor = row.get(metric.key), row.get(f"{metric.key}_real")
        if factor is None or value is None or floor is None:
            continue
        if metric.better == "higher" and value < factor * floor:
            reasons.append(
                f"{metric.header} {metric.shown(value)} is below {100 * factor:g}% of the real-vs-real floor "
                f"{metric.shown(floor)}"
            )
        elif metric.better == "lower" and value > factor * floor:
            reasons.append(
                f"{metric.header} {metric.shown(value)} is above {factor:g}x the real-vs-real floor "
                f"{metric.shown(floor)}"
            )
    return "; ".join(reasons) or None


def compare_with_baselines(rows: Sequence[dict[str, Any]], output_dir: str | Path, resamples: int) -> None:
    """Add ``vs_baseline`` (per quality metric: difference, 95% interval, significant) and ``quality_verdict`` to
    every finished row whose cell and baseline stored features, in place. A weak baseline (``weak_baseline``) gets
    ``baseline_weak`` (why), and every finished row of its variant the verdict ``weak baseline``. A row scored by
    other feature extractors than its baseline (``feature_extractors``) gets ``comparison_problem`` instead."""
    baselines = {row["variant"]: row for row in rows if row.get("status") == "ok" and row["technique"] == "baseline"}
    for base in baselines.values():
        base.pop("baseline_weak", None)  # read again from this run's numbers
        reason = weak_baseline(base)
        if reason:
            base["baseline_weak"] = reason
    metrics = all_metrics("quality")
    for row in rows:
        base = baselines.get(row["variant"])
        if row.get("status") != "ok" or base is None:
            continue
        if base.get("baseline_weak"):  # also where no features allow a paired comparison
            row["quality_verdict"] = WEAK_BASELINE
        elif row.get("quality_verdict") == WEAK_BASELINE:  # an earlier run's, against a baseline since replaced
            del row["quality_verdict"]
        row.pop("comparison_problem", None)
        if row.get("feature_extractors") != base.get("feature_extractors"):
            # features of two different networks (a classifier trained again between runs) share no space: a paired
            # comparison of them would be noise presented as a verdict
            row.pop("vs_baseline", None)
            if row.get("quality_verdict") != WEAK_BASELINE:
                row.pop("quality_verdict", None)
            row["comparison_problem"] = (
                f"scored with {row.get('feature_extractors')}, its baseline with {base.get('feature_extractors')}: "
                "not comparable; run both again into a new output folder"
            )
            continue
        candidate = _load(features_path(output_dir, row["variant"], row["technique"]))
        reference_cell = _load(features_path(output_dir, row["variant"], "baseline"))
        if candidate is None or reference_cell is None or len(candidate[2]) != len(reference_cell[2]):
            continue
        keys = [
            metric.key for metric in metrics if row.get(metric.key) is not None and base.get(metric.key) is not None
        ]
        comparisons = paired_comparisons(candidate[0], candidate[2], reference_cell, resamples, keys)
        row["vs_baseline"] = comparisons
        row["quality_verdict"] = WEAK_BASELINE if base.get("baseline_weak") else quality_verdict(comparisons)


def paired_comparisons(
    generated: dict[str, np.ndarray],
    labels: np.ndarray,
    baseline: tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray],
    resamples: int,
    keys: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per quality metric (of ``keys``, default all whose features both hold): the candidate's difference to the
    baseline on the same samples (``generated`` features and ``labels`` against the baseline's ``(generated,
    reference, labels)``), its 95% paired-bootstrap interval and whether it excludes 0."""
    comparisons = {}
    for metric in all_metrics("quality"):
        if keys is not None and metric.key not in keys:
            continue
        if not all(kind in generated and kind in baseline[0] for kind in metric.features):
            continue
        count = min(resamples, metric.max_resamples or resamples)
        result = paired_comparison(metric.statistic, generated, baseline[0], baseline[1], labels, count)
        comparisons[metric.key] = {
            "difference": result.difference,
            "interval": [result.low, result.high],
            "significant": result.significant,
        }
    return comparisons


def quality_verdict(comparisons: dict[str, dict[str, Any]]) -> str:
    """``costs quality`` if any metric is significantly worse, ``better quality`` if some are significantly better
    and none worse, else ``no significant change``."""
    directions = {metric.key: metric.better for metric in all_metrics("quality")}
    worse = better = False
    for key, comparison in comparisons.items():
        if not comparison["significant"]:
            continue
        improved = (comparison["difference"] > 0) == (directions[key] == "higher")
        better, worse = better or improved, worse or not improved
    if worse:
        return VERDICTS[0]
    return VERDICTS[2] if better else VERDICTS[1]


def speed_change_is_significant(row: dict[str, Any], ratio_key: str) -> bool | None:
    """Whether every round's paired ratio lies on the same side of 1 (None without per-round ratios)."""
    span = row.get(f"{ratio_key}_range")
    if not span:
        return None
    return span[0] > 1 or span[1] < 1
