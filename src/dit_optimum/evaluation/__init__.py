"""Evaluation: accounting (parameters, GFLOPs, saved size) and speed measurement."""

from .flops import count_gflops, count_parameters, gflops_breakdown
from .size import saved_size_bytes
from .speed import time_forward

__all__ = ["count_gflops", "count_parameters", "gflops_breakdown", "saved_size_bytes", "time_forward"]
