"""Uncertainty of quality numbers: bootstrap intervals over samples, and paired bootstrap comparisons.

Generated samples are resampled with their labels and the real reference set independently, and the statistic is
recomputed on each resample. A comparison of two models resamples the same sample indices for both (sample ``i``
has the same class and seed in every cell, so the two sets are paired) and the same reference indices: the interval
of the difference then excludes the shared noise, and a difference is significant when it excludes 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import DiTOptimumError
from .checks import check_bootstrap, check_labels, sample_count
from .declarations import Statistic

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Comparison:
    """``candidate - baseline`` of a statistic, its interval, and whether the interval excludes 0."""

    difference: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return not self.low <= 0 <= self.high


def _resample(features: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    return {kind: value[indices] for kind, value in features.items()}


def _resamples(
    count: int, reference: dict[str, np.ndarray], resamples: int, seed: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``resamples`` bootstrap draws: indices into the ``count`` generated samples, and the reference resampled
    too (when it has samples), from one seeded generator."""
    generator = np.random.default_rng(seed)
    references = _count(reference)
    for _ in range(resamples):
        picked = generator.integers(0, count, count)
        yield picked, _resample(reference, generator.integers(0, references, references)) if references else reference


def _count(features: dict[str, np.ndarray]) -> int:
    return len(next(iter(features.values()))) if features else 0


def _percentiles(values: list[float], estimate: float, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` range of the bootstrap values, re-centred so that their median is the estimate.

    Resampling with replacement duplicates samples, which shifts Frechet distances up (a covariance from fewer
    distinct samples is noisier): the raw percentile range can miss the estimate entirely. Re-centring keeps the
    spread and removes that shift; for unbiased statistics (accuracies) it changes nothing.
    """
    tail = (1 - confidence) / 2
    low, median, high = np.quantile(np.asarray(values, dtype=np.float64), [tail, 0.5, 1 - tail])
    shift = median - estimate
    return float(low - shift), float(high - shift)


def bootstrap_interval(
    statistic: Statistic,
    generated: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: np.ndarray,
    resamples: int,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(generated, reference, labels)`` (re-centred percentiles, see above)."""
    check_bootstrap(resamples, confidence, seed)
    labels = check_labels(labels, sample_count("generated", generated))
    values = [
        statistic(_resample(generated, picked), chosen, labels[picked])
        for picked, chosen in _resamples(len(labels), reference, resamples, seed)
    ]
    return _percentiles(values, statistic(generated, reference, labels), confidence)


def paired_comparison(
    statistic: Statistic,
    candidate: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: np.ndarray,
    resamples: int,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """``statistic(candidate) - statistic(baseline)`` with a paired bootstrap interval (same resampled indices)."""
    check_bootstrap(resamples, confidence, seed)
    if sample_count("candidate", candidate) != sample_count("baseline", baseline):
        raise DiTOptimumError("A paired comparison needs the same samples (count and order) in both cells.")
    labels = check_labels(labels, _count(candidate))
    difference = statistic(candidate, reference, labels) - statistic(baseline, reference, labels)
    values = [
        statistic(_resample(candidate, picked), chosen, labels[picked])
        - statistic(_resample(baseline, picked), chosen, labels[picked])
        for picked, chosen in _resamples(len(labels), reference, resamples, seed)
    ]
    low, high = _percentiles(values, difference, confidence)
    return Comparison(float(difference), low, high)
