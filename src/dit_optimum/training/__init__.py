"""Training with accelerate: base DiT, mixture of experts and knowledge distillation."""

from .data import TrainingData, extract_latents, load_training_data
from .diffusion import GaussianDiffusion
from .ema import EMA
from .trainer import TrainConfig, final_loss, train

__all__ = [
    "EMA",
    "GaussianDiffusion",
    "TrainConfig",
    "TrainingData",
    "extract_latents",
    "final_loss",
    "load_training_data",
    "train",
]
