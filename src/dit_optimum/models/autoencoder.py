"""IdentityAutoencoder: the "VAE" of a pixel-space pipeline, so that pixel models save and load like latent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class IdentityEncoderOutput(BaseOutput):
    latents: torch.Tensor


class IdentityAutoencoder(ModelMixin, ConfigMixin):
    """Encodes and decodes as the identity, with ``scaling_factor`` 1: pixel-space diffusion in a DiT pipeline."""

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0):
        super().__init__()
        # diffusers saves no weights file for a stateless module and then fails to load it: keep one buffer.
        self.register_buffer("identity", torch.ones(1), persistent=True)

    def encode(self, sample: torch.Tensor, return_dict: bool = True) -> IdentityEncoderOutput | tuple[torch.Tensor]:
        latents = sample * self.config.scaling_factor
        return IdentityEncoderOutput(latents=latents) if return_dict else (latents,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        return DecoderOutput(sample=latents) if return_dict else (latents,)
