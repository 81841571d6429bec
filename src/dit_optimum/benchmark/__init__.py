"""The multi-method benchmark (the main job): settings and presets, technique contexts, the resumable runner, the
report. ``evaluation`` only measures; this package decides what to measure and writes the results."""

from .report import write_report
from .runner import load_results, run_benchmark
from .settings import BenchmarkSettings, TrainingRecipe, preset_settings

__all__ = ["BenchmarkSettings", "TrainingRecipe", "load_results", "preset_settings", "run_benchmark", "write_report"]
