"""Evaluation, measuring only: quality (FID, sFID, KID) and cost (GFLOPs, speed, memory, size) of one pipeline.

Entry points: ``evaluate_quality`` and ``efficiency_metrics``; the matrix of techniques is ``dit_optimum.benchmark``.
The heavier ones are imported on first use, so ``import dit_optimum`` stays light.
"""

from importlib import import_module

from .flops import count_gflops, count_parameters, gflops_breakdown
from .size import saved_size_bytes
from .speed import time_forward

_LAZY = {
    "QualitySettings": ".quality",
    "evaluate_quality": ".quality",
    "SpeedSettings": ".efficiency",
    "efficiency_metrics": ".efficiency",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QualitySettings",
    "SpeedSettings",
    "count_gflops",
    "count_parameters",
    "efficiency_metrics",
    "evaluate_quality",
    "gflops_breakdown",
    "saved_size_bytes",
    "time_forward",
]
