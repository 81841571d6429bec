"""Training preparation: encode images once to scaled VAE latents (fast-DiT style), saved for ``load_training_data``.

The loaders themselves (digits, image folders, latents folders, ``datasets`` ids) live in ``dit_optimum.data``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..data import LATENTS_METADATA, TrainingData
from ..errors import DiTOptimumError
from ..utils import check_save_target, load_from_source, save_directory


def load_vae(vae_path: str | os.PathLike) -> AutoencoderKL:
    """The ``AutoencoderKL`` at ``vae_path`` (a folder, or a Hub id available offline), refused naming it."""
    return load_from_source(AutoencoderKL.from_pretrained, vae_path, "vae")


@torch.no_grad()
def extract_latents(
    data: TrainingData,
    vae_path: str | os.PathLike,
    output_dir: str | Path,
    batch_size: int = 32,
    sample_posterior: bool = False,
    overwrite: bool = False,
) -> Path:
    """Encode images to scaled VAE latents once and save them with labels (a ``datasets`` folder) for training.

    ``data`` images must have the VAE's channel count and be in [-1, 1]; latents are multiplied by the VAE's
    ``scaling_factor`` so the trainer and the pipeline see the usual latent scale. ``output_dir`` must be new,
    empty or an earlier extraction, unless ``overwrite`` (its other files are left alone).
    """
    from datasets import Dataset

    check_save_target(output_dir, LATENTS_METADATA, overwrite, parameter="output_dir")  # before any encoding
    vae = load_vae(vae_path).eval()
    if data.samples.shape[1] != vae.config.in_channels:
        raise DiTOptimumError(
            f"Images have {data.samples.shape[1]} channels; the VAE expects {vae.config.in_channels}."
        )
    latents = []
    for start in range(0, len(data.samples), batch_size):
        distribution = vae.encode(data.samples[start : start + batch_size]).latent_dist
        latent = distribution.sample() if sample_posterior else distribution.mode()
        latents.append(latent * vae.config.scaling_factor)
    latents = torch.cat(latents)
    dataset = Dataset.from_dict({"latents": latents.numpy(), "label": data.labels.numpy()})
    with save_directory(output_dir, LATENTS_METADATA, overwrite, parameter="output_dir") as staging:
        dataset.save_to_disk(str(staging))
        metadata = {"vae": str(vae_path), "id2label": {str(k): v for k, v in data.id2label.items()}}
        (staging / LATENTS_METADATA).write_text(json.dumps(metadata, indent=2))
    return Path(output_dir)
