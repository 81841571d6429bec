"""Every result column declared once: its key, header, format, direction and how it is compared to the baseline.

Each metric is declared next to the function that computes it (``fid.py``, ``domain.py``, ``efficiency.py``); the
benchmark's table, change table, significance marks, plots and the command line all iterate ``all_metrics()``.
Quality metrics also carry their ``statistic``, so that intervals and paired comparisons can recompute them on
resampled features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import numpy as np

from ..errors import DiTOptimumError

# statistic(generated features, reference features, generated labels) -> value; features keyed "<extractor>.<kind>"
Statistic = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray], float]
DIRECTIONS = ("lower", "higher", None)
KINDS = ("quality", "cost")
# The modules that declare metrics, in the order their columns appear.
_DECLARING_MODULES = ("domain", "fid", "efficiency")


@dataclass(frozen=True)
class Metric:
    """One result column.

    ``scale`` turns the stored value into the shown one (KID x1e3, accuracy in %, bytes in MB); ``better`` is the
    direction of improvement (None: no direction, e.g. parameter count); ``paired_ratio`` names the key of the
    ratio to the baseline timed in the same rounds (speed columns), whose change the change table shows instead of
    a ratio of two separately measured values; ``features`` are the feature kinds a quality ``statistic`` reads;
    ``frechet`` metrics need more samples than feature dimensions; ``max_resamples`` caps the bootstrap of costly
    statistics.
    """

    key: str
    header: str
    kind: str
    better: str | None = "lower"
    format: str = "{:.2f}"
    scale: float = 1.0
    paired_ratio: str | None = None
    statistic: Statistic | None = None
    features: tuple[str, ...] = ()
    frechet: bool = False
    max_resamples: int | None = None
    description: str = ""

    @property
    def family(self) -> str | None:
        """The feature extractor a quality metric reads (``inception`` or ``domain``)."""
        return self.features[0].split(".")[0] if self.features else None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.better not in DIRECTIONS:
            raise DiTOptimumError(f"Metric {self.key!r}: kind must be one of {KINDS}, better one of {DIRECTIONS}.")
        if (self.kind == "quality") != (self.statistic is not None):
            raise DiTOptimumError(f"Metric {self.key!r}: quality metrics (and only they) carry a statistic.")

    def shown(self, value: float | None) -> str:
        """``value`` as the table shows it (``n/a`` when missing)."""
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "n/a"
        return self.format.format(value * self.scale)


_METRICS: dict[str, Metric] = {}


def declare_metric(metric: Metric) -> Metric:
    """Register ``metric`` (keys are unique)."""
    if metric.key in _METRICS:
        raise DiTOptimumError(f"A metric with key {metric.key!r} is already declared.")
    _METRICS[metric.key] = metric
    return metric


def all_metrics(kind: str | None = None) -> list[Metric]:
    """Every declared metric (of ``kind`` if given), quality first, in declaration order."""
    for module in _DECLARING_MODULES:
        import_module(f"{__package__}.{module}")
    # quality first (the domain metrics, which mean something at small scale, before Inception's), then cost
    families = (None, "domain", "inception")
    metrics = sorted(_METRICS.values(), key=lambda metric: (KINDS.index(metric.kind), families.index(metric.family)))
    return [metric for metric in metrics if kind is None or metric.kind == kind]


def get_metric(key: str) -> Metric:
    """The metric declared as ``key``; an unknown key raises, listing the quality metrics."""
    metrics = {metric.key: metric for metric in all_metrics()}
    if key not in metrics:
        names = ", ".join(metric.key for metric in all_metrics("quality"))
        raise DiTOptimumError(f"Unknown metric {key!r}; quality metrics: {names}.")
    return metrics[key]
