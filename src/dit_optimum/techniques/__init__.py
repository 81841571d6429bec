"""Techniques that turn a baseline DiT pipeline (or transformer) into a cheaper one of the same kind."""

from .pruning import IMPORTANCE_CRITERIA, SCOPES, importance_scores, prune, teacher_and_student
from .quantization import BACKENDS, DEFAULT_KEEP_FLOAT, SUPPORTED, CalibrationSettings, quantize

__all__ = [
    "BACKENDS",
    "DEFAULT_KEEP_FLOAT",
    "IMPORTANCE_CRITERIA",
    "SCOPES",
    "SUPPORTED",
    "CalibrationSettings",
    "importance_scores",
    "prune",
    "quantize",
    "teacher_and_student",
]
