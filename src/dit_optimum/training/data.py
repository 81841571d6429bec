"""Training data: images (pixel mode) or precomputed VAE latents, as in-memory tensors with labels.

Sources: ``"digits"`` (scikit-learn's 1,797 8x8 handwritten digits, 10 classes; ships with the package, no
download), an ``imagefolder`` directory (one sub-folder per class), a latents folder written by
``extract_latents``, or a ``datasets`` id with ``image`` and ``label`` columns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import DiTOptimumError

logger = logging.getLogger(__name__)
LATENTS_METADATA = "dit_optimum_latents.json"


@dataclass
class TrainingData:
    """Samples (N, C, H, W) in the model's input space, labels (N,), class names, and the VAE they need (if any)."""

    samples: torch.Tensor
    labels: torch.Tensor
    id2label: dict[int, str] = field(default_factory=dict)
    vae: str | None = None
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    # images: (N, C, h, w) in [0, 1] -> (N, C, image_size, image_size) in [-1, 1]
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).contiguous()


def digits_data(image_size: int = 16, channels: int = 1) -> TrainingData:
    """scikit-learn's digits (8x8, 16 grey levels), upscaled bilinearly to ``image_size``; labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    samples = _resize(images, image_size).repeat(1, channels, 1, 1)
    return TrainingData(samples, torch.tensor(digits.target, dtype=torch.long), {i: str(i) for i in range(10)})


def pil_to_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image as (channels, image_size, image_size) in [-1, 1] (grey or RGB, bilinear resize)."""
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    tensor = tensor[None] if channels == 1 else tensor.permute(2, 0, 1)
    return _resize(tensor[None], image_size)[0]


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """An image file as ``pil_to_tensor`` gives it."""
    with Image.open(path) as image:
        return pil_to_tensor(image, image_size, channels)


def image_folder_data(root: str | Path, image_size: int, channels: int = 3, skip_corrupt: bool = False) -> TrainingData:
    """Images under ``root/<class name>/``; an unreadable image raises naming the file, or is skipped and counted."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DiTOptimumError(f"`data`={str(root)!r} has no class sub-folders (expected root/<class>/<image files>).")
    samples, labels, skipped = [], [], 0
    for label, name in enumerate(classes):
        for path in sorted(p for p in (root / name).iterdir() if p.is_file()):
            try:
                samples.append(load_image(path, image_size, channels))
            except (UnidentifiedImageError, OSError, ValueError) as error:
                if not skip_corrupt:
                    raise DiTOptimumError(
                        f"Unreadable image {path}: {error}. Fix or remove it, or pass skip_corrupt."
                    ) from error
                skipped += 1
                continue
            labels.append(label)
    if skipped:
        logger.warning("Skipped %d unreadable image(s) under %s.", skipped, root)
    if not samples:
        raise DiTOptimumError(f"`data`={str(root)!r} holds no readable images.")
    return TrainingData(torch.stack(samples), torch.tensor(labels), dict(enumerate(classes)), skipped=skipped)


def latents_data(root: str | Path) -> TrainingData:
    """Latents written by ``extract_latents`` (a ``datasets`` folder plus metadata naming the VAE)."""
    from datasets import load_from_disk

    root = Path(root)
    metadata = json.loads((root / LATENTS_METADATA).read_text())
    dataset = load_from_disk(str(root)).with_format("numpy")
    return TrainingData(
        torch.as_tensor(np.asarray(dataset["latents"]), dtype=torch.float32),
        torch.as_tensor(np.asarray(dataset["label"]), dtype=torch.long),
        {int(k): v for k, v in metadata.get("id2label", {}).items()},
        vae=metadata["vae"],
    )


def hub_data(name: str, image_size: int, channels: int = 3, split: str = "train") -> TrainingData:
    """A ``datasets`` dataset (Hub id or local script) with ``image`` and ``label`` columns."""
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    images = [pil_to_tensor(example["image"], image_size, channels) for example in dataset]
    names = dataset.features["label"].names if hasattr(dataset.features["label"], "names") else None
    id2label = dict(enumerate(names)) if names else {}
    return TrainingData(torch.stack(images), torch.tensor(dataset["label"]), id2label)


def load_training_data(
    source: str = "digits", image_size: int = 16, channels: int = 1, skip_corrupt: bool = False
) -> TrainingData:
    """Dispatch on ``source``: ``"digits"``, a latents folder, an imagefolder directory, or a ``datasets`` id."""
    if source == "digits":
        return digits_data(image_size, channels)
    path = Path(source)
    if (path / LATENTS_METADATA).is_file():
        return latents_data(path)
    if path.is_dir():
        return image_folder_data(path, image_size, channels, skip_corrupt)
    return hub_data(source, image_size, channels)


@torch.no_grad()
def extract_latents(
    data: TrainingData, vae_path: str, output_dir: str | Path, batch_size: int = 32, sample_posterior: bool = False
) -> Path:
    """Encode images to scaled VAE latents once and save them with labels (a ``datasets`` folder) for training.

    ``data`` images must have the VAE's channel count and be in [-1, 1]; latents are multiplied by the VAE's
    ``scaling_factor`` so the trainer and the pipeline see the usual latent scale.
    """
    from datasets import Dataset
    from diffusers import AutoencoderKL

    from ..utils import save_directory

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
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
    with save_directory(output_dir, LATENTS_METADATA, parameter="output_dir") as staging:
        dataset.save_to_disk(str(staging))
        metadata = {"vae": str(vae_path), "id2label": {str(k): v for k, v in data.id2label.items()}}
        (staging / LATENTS_METADATA).write_text(json.dumps(metadata, indent=2))
    return Path(output_dir)
