"""Techniques that turn a baseline DiT pipeline (or transformer) into a cheaper one of the same kind."""

from .caching import (
    CACHE_METHODS,
    calibrate_block_schedule,
    calibrate_mag_ratios,
    disable_step_cache,
    enable_step_cache,
)
from .pruning import IMPORTANCE_CRITERIA, SCOPES, importance_scores, prune, teacher_and_student
from .quantization import (
    BACKENDS,
    DEFAULT_KEEP_FLOAT,
    SUPPORTED,
    CalibrationSettings,
    compile_for_inference,
    quantize,
    recommended_quantization,
)
from .registry import TECHNIQUES, Technique, TechniqueContext, get_technique, register_technique
from .runtimes import FORWARD_PATHS, PathChoice, apply_path, fastest_path, with_runtime
from .solvers import SOLVERS, Solver, get_solver, solver_scheduler, with_solver

__all__ = [
    "BACKENDS",
    "CACHE_METHODS",
    "DEFAULT_KEEP_FLOAT",
    "FORWARD_PATHS",
    "IMPORTANCE_CRITERIA",
    "SCOPES",
    "SOLVERS",
    "SUPPORTED",
    "TECHNIQUES",
    "CalibrationSettings",
    "PathChoice",
    "Solver",
    "Technique",
    "TechniqueContext",
    "apply_path",
    "calibrate_block_schedule",
    "calibrate_mag_ratios",
    "compile_for_inference",
    "disable_step_cache",
    "enable_step_cache",
    "fastest_path",
    "get_solver",
    "get_technique",
    "importance_scores",
    "prune",
    "quantize",
    "recommended_quantization",
    "register_technique",
    "solver_scheduler",
    "teacher_and_student",
    "with_runtime",
    "with_solver",
]
