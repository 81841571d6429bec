"""Models: the DiT transformer, its attention variants and the identity autoencoder for pixel space."""

from .attention import (
    ATTENTION_TYPES,
    DiTAttention,
    FocusedLinearAttnProcessor,
    MediatedAttnProcessor,
    SDPAAttnProcessor,
)
from .autoencoder import IdentityAutoencoder
from .transformer import DiTOptimumTransformer2DModel

__all__ = [
    "ATTENTION_TYPES",
    "DiTAttention",
    "DiTOptimumTransformer2DModel",
    "FocusedLinearAttnProcessor",
    "IdentityAutoencoder",
    "MediatedAttnProcessor",
    "SDPAAttnProcessor",
]
