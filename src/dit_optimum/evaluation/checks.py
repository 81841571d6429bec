"""Checks of the evaluation functions' inputs: feature sets, labels, resample counts and seeds.

Each refuses with a ``DiTOptimumError`` naming the parameter and what it allows, so that a metric never returns a
silently wrong number (NaN, a broadcast comparison) or a raw NumPy/SciPy error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DiTOptimumError
from ..utils import check_number, is_integer


def check_features(name: str, features: Any, *, minimum: int = 1) -> np.ndarray:
    """(N, D) finite features with N >= ``minimum`` and D >= 1, as float64."""
    try:
        array = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DiTOptimumError(f"`{name}` must be a numeric (N, D) array: {error}.") from None
    if array.ndim != 2 or array.shape[1] < 1:
        raise DiTOptimumError(f"`{name}` must be (N, D) features with D >= 1, got shape {array.shape}.")
    if len(array) < minimum:
        raise DiTOptimumError(f"`{name}` has N={len(array)} samples: it needs at least {minimum}.")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise DiTOptimumError(f"`{name}` has {bad} samples with NaN or infinite values: features must be finite.")
    return array


def check_labels(labels: Any, count: int, name: str = "labels") -> np.ndarray:
    """Integral class labels, one per sample (1-D, length ``count``), as int64."""
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != count:
        raise DiTOptimumError(f"`{name}` must be 1-D with one label per sample ({count}), got shape {array.shape}.")
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        return array.astype(np.int64)
    raise DiTOptimumError(f"`{name}` must be integral class labels, got dtype {array.dtype}.")


def sample_count(name: str, features: dict[str, np.ndarray]) -> int:
    """The common sample count N >= 1 of a feature dict (every kind the same N)."""
    if not isinstance(features, dict) or not features:
        raise DiTOptimumError(f"`{name}` must be a non-empty dict of (N, D) feature arrays, got {features!r:.80}.")
    counts = {kind: len(value) for kind, value in features.items()}
    if len(set(counts.values())) != 1:
        raise DiTOptimumError(f"`{name}` kinds have different sample counts: {counts}.")
    count = next(iter(counts.values()))
    if count < 1:
        raise DiTOptimumError(f"`{name}` has no samples: a statistic needs at least 1.")
    return count


def check_bootstrap(resamples: Any, confidence: Any, seed: Any) -> None:
    """``resamples``: an integer >= 2; ``confidence``: in (0, 1); ``seed``: a NumPy/torch seed (0..2**64 - 1)."""
    from ..models.resources import check_resources

    if not is_integer(resamples) or resamples < 2:
        raise DiTOptimumError(f"`resamples`={resamples!r} must be an integer >= 2 (a bootstrap interval needs 2).")
    check_number("confidence", confidence, 0, 1, include_minimum=False, include_maximum=False)
    check_resources(seed=seed, parameter="seed")


def check_finite_result(name: str, value: float) -> float:
    """A computed distance must be finite: features this large overflow float64."""
    if not np.isfinite(value):
        raise DiTOptimumError(
            f"{name} is not finite ({value}): the features are too large for float64 arithmetic; rescale them."
        )
    return float(value)
