"""Evaluation: quality (FID, sFID, KID), cost (GFLOPs, speed, memory, size) and the multi-method benchmark.

Entry points: ``evaluate_quality`` + ``efficiency_metrics`` for one pipeline, ``run_benchmark`` + ``write_report``
for the matrix. The heavier ones are imported on first use, so ``import dit_optimum`` stays light.
"""

from importlib import import_module

from .flops import count_gflops, count_parameters, gflops_breakdown
from .size import saved_size_bytes
from .speed import time_forward

_LAZY = {
    "QualitySettings": ".fid",
    "evaluate_quality": ".fid",
    "SpeedSettings": ".efficiency",
    "efficiency_metrics": ".efficiency",
    "BenchmarkSettings": ".benchmark",
    "TrainingRecipe": ".benchmark",
    "preset_settings": ".benchmark",
    "run_benchmark": ".benchmark",
    "write_report": ".report",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BenchmarkSettings",
    "QualitySettings",
    "SpeedSettings",
    "TrainingRecipe",
    "count_gflops",
    "count_parameters",
    "efficiency_metrics",
    "evaluate_quality",
    "gflops_breakdown",
    "preset_settings",
    "run_benchmark",
    "saved_size_bytes",
    "time_forward",
    "write_report",
]
