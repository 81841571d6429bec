"""The quality budget of a search, in the benchmark's own terms: what a candidate may lose against the baseline on
the same samples and seeds.

The default, ``no significant change``, is the benchmark's verdict: no quality metric significantly worse (95%
paired bootstrap). A maximum drop per metric (``class_accuracy=1,fd_domain=10``) accepts a candidate whose 95%
interval of the change stays within the allowed drop at its worse end (a non-inferiority test, not a point
estimate): in points for metrics shown as percentages (class accuracy), else in percent of the baseline's value
(FD_domain, FID, sFID, KID). Metrics it does not name keep the default rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import DiTOptimumError
from ..evaluation.declarations import Metric, all_metrics, get_metric

NO_SIGNIFICANT_CHANGE = "no-significant-change"


def drop_unit(metric: Metric) -> str:
    """How a maximum drop of ``metric`` is given: ``points`` for metrics shown as percentages, else ``%`` of the
    baseline's value."""
    return "points" if metric.scale == 100 else "%"


@dataclass(frozen=True)
class QualityBudget:
    """``max_drop``: metric key -> the drop allowed (``drop_unit``); empty: no significant change in any metric."""

    max_drop: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = [metric.key for metric in all_metrics("quality")]
        for key, value in self.max_drop.items():
            if key not in known:
                raise DiTOptimumError(f"Unknown metric {key!r} in `budget`; allowed values: {', '.join(known)}.")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DiTOptimumError(f"`budget` drop for {key!r}={value!r} must be a finite number >= 0.")

    @classmethod
    def parse(cls, budget: str | Mapping[str, float] | QualityBudget | None) -> QualityBudget:
        """A budget from ``None`` / ``"no-significant-change"``, ``"class_accuracy=1,fd_domain=10"`` or a mapping."""
        if isinstance(budget, QualityBudget):
            return budget
        if budget is None or budget == NO_SIGNIFICANT_CHANGE:
            return cls()
        if isinstance(budget, Mapping):
            return cls(dict(budget))
        if not isinstance(budget, str):
            raise DiTOptimumError(f"`budget`={budget!r} must be {NO_SIGNIFICANT_CHANGE!r} or METRIC=DROP,...")
        drops: dict[str, float] = {}
        for entry in budget.split(","):
            key, separator, value = entry.strip().partition("=")
            if key.strip() in drops:
                raise DiTOptimumError(f"`budget` names {key.strip()!r} twice; give each metric's drop once.")
            try:
                drops[key.strip()] = float(value)
            except ValueError:
                separator = ""
            if not separator:
                raise DiTOptimumError(
                    f"`budget` entry {entry!r} must be METRIC=DROP (e.g. class_accuracy=1,fd_domain=10), or the "
                    f"budget {NO_SIGNIFICANT_CHANGE!r}."
                )
        return cls(drops)

    def describe(self) -> str:
        """The budget in words."""
        if not self.max_drop:
            return "no significant change in any quality metric (95% paired bootstrap against the baseline)"
        parts = []
        for key, value in self.max_drop.items():
            metric = get_metric(key)
            worse = "lower" if metric.better == "higher" else "higher"
            parts.append(f"{metric.header} at most {value:g} {drop_unit(metric)} {worse}")
        return ", ".join(parts) + " at the worse end of the 95% paired interval; other metrics: no significant change"

    def allowed_drop(self, metric: Metric, baseline_value: float) -> float | None:
        """The drop allowed for ``metric`` in its stored units (None: the default rule applies)."""
        if metric.key not in self.max_drop:
            return None
        value = self.max_drop[metric.key]
        return value / metric.scale if drop_unit(metric) == "points" else value / 100 * abs(baseline_value)

    def judge(self, comparisons: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, float]) -> tuple[bool, str]:
        """Whether paired ``comparisons`` (``benchmark.significance.paired_comparisons``) fit the budget, and why
        (the first metric that breaks it, or each metric's change)."""
        changes = []
        for key, comparison in comparisons.items():
            metric = get_metric(key)
            low, high = comparison["interval"]
            sign = -1 if metric.better == "higher" else 1  # a positive `worsening` is a loss of quality
            worst = max(sign * low, sign * high)
            shown = (
                f"{metric.header} {comparison['difference'] * metric.scale:+.3g} "
                f"[{low * metric.scale:+.3g}, {high * metric.scale:+.3g}]"
            )
            allowed = self.allowed_drop(metric, baseline.get(key, 0.0))
            if allowed is not None and worst > allowed:
                return False, f"{shown}: could lose more than the {self.max_drop[key]:g} {drop_unit(metric)} allowed"
            if allowed is None and comparison["significant"] and sign * comparison["difference"] > 0:
                return False, f"{shown}: significantly worse"
            changes.append(shown)
        return True, "; ".join(changes) or "no metric compared"

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop": dict(self.max_drop)} if self.max_drop else {"max_drop": {}}
