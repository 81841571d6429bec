"""dit-optimum: Diffusion Transformers made cheaper to run, as diffusers components.

``ModelMixin`` is re-exported because diffusers' pipeline loader requires it at the top level of any library that
provides pipeline components (``["dit_optimum", "DiTOptimumTransformer2DModel"]`` in model_index.json).
"""

from diffusers import ModelMixin

from .configs import DIT_SIZES, PATCH_SIZES, dit_config, preset_names
from .errors import DiTOptimumError, MissingPathError
from .evaluation.flops import count_gflops, count_parameters, gflops_breakdown
from .models import (
    ATTENTION_TYPES,
    DiTAttention,
    DiTOptimumTransformer2DModel,
    FocusedLinearAttnProcessor,
    IdentityAutoencoder,
    MediatedAttnProcessor,
    SDPAAttnProcessor,
)
from .pipelines import DiTOptimumPipeline
from .techniques import CalibrationSettings, prune, quantize

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_TYPES",
    "DIT_SIZES",
    "PATCH_SIZES",
    "CalibrationSettings",
    "DiTAttention",
    "DiTOptimumError",
    "DiTOptimumPipeline",
    "DiTOptimumTransformer2DModel",
    "FocusedLinearAttnProcessor",
    "IdentityAutoencoder",
    "MediatedAttnProcessor",
    "MissingPathError",
    "ModelMixin",
    "SDPAAttnProcessor",
    "count_gflops",
    "count_parameters",
    "dit_config",
    "gflops_breakdown",
    "preset_names",
    "prune",
    "quantize",
]
