"""Evaluation: accounting (parameters, GFLOPs) and speed measurement."""

from .flops import count_gflops, count_parameters, gflops_breakdown
from .speed import time_forward

__all__ = ["count_gflops", "count_parameters", "gflops_breakdown", "time_forward"]
