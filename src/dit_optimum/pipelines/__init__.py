"""Pipelines built on diffusers' DiTPipeline."""

from .dit import OUTPUT_TYPES, DiTOptimumPipeline

__all__ = ["OUTPUT_TYPES", "DiTOptimumPipeline"]
