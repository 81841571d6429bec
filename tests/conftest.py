"""Shared helpers: tiny DiT configs that run in milliseconds on CPU."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from diffusers import DiTTransformer2DModel  # noqa: E402

from dit_optimum import DiTOptimumTransformer2DModel  # noqa: E402

TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_embeds_ada_norm": 10,
}


def tiny_config(**overrides) -> dict:
    return {**TINY, **overrides}


def tiny_model(seed: int = 0, **overrides) -> DiTOptimumTransformer2DModel:
    """A tiny model with random (non-zero) weights everywhere, adaLN-Zero gates included."""
    torch.manual_seed(seed)
    model = DiTOptimumTransformer2DModel(**tiny_config(**overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def model_inputs(model, batch: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    timestep = torch.tensor([1, 500, 999, 250, 750, 10][:batch])
    labels = torch.arange(batch) % config.num_embeds_ada_norm
    return sample, timestep, labels


def stock_model(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """A stock diffusers DiT whose per-block embedder copies are equal, as in every real checkpoint."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
        state = model.state_dict()
        for key, tensor in state.items():
            if ".norm1.emb." in key:
                tensor.copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
    return model.eval()
