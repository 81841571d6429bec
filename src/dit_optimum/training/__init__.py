"""Training with accelerate: base DiT, mixture of experts, knowledge distillation and step distillation.

Data loaders live in ``dit_optimum.data``; ``extract_latents`` prepares latents for latent-space training.
"""

from .config import TrainConfig
from .data import extract_latents
from .diffusion import GaussianDiffusion
from .ema import EMA
from .trainer import final_loss, train

__all__ = [
    "EMA",
    "GaussianDiffusion",
    "TrainConfig",
    "extract_latents",
    "final_loss",
    "train",
]
