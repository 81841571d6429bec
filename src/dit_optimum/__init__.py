"""dit-optimum: Diffusion Transformers made cheaper to run, as diffusers components.

``ModelMixin`` is re-exported because diffusers' pipeline loader requires it at the top level of any library that
provides pipeline components (``["dit_optimum", "DiTOptimumTransformer2DModel"]`` in model_index.json). Importing
the package also registers it with diffusers (``registration.py``), so that Hub repositories of it download.
"""

from .import_messages import known_import_messages_hidden

with known_import_messages_hidden():  # diffusers imports torchao here, which prints two harmless messages
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
from .models.block_cache import BlockCacheSchedule
from .optimizer import QualityBudget, optimize
from .pipelines import DiTOptimumPipeline
from .registration import register_with_diffusers
from .techniques import CACHE_METHODS, CalibrationSettings, disable_step_cache, enable_step_cache, prune, quantize

register_with_diffusers()  # `import dit_optimum` is what lets diffusers download our repositories from the Hub

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_TYPES",
    "CACHE_METHODS",
    "DIT_SIZES",
    "PATCH_SIZES",
    "BlockCacheSchedule",
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
    "QualityBudget",
    "SDPAAttnProcessor",
    "count_gflops",
    "count_parameters",
    "disable_step_cache",
    "dit_config",
    "enable_step_cache",
    "gflops_breakdown",
    "optimize",
    "preset_names",
    "prune",
    "quantize",
]
