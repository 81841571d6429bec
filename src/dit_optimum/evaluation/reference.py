"""Reference (real-data) features, computed once and cached in a user cache folder.

The cache key names the dataset, split, resolution, N, the extractor and a hash of its weights, so a change to any
of them computes new statistics instead of silently reusing stale ones. Never written inside site-packages.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import DiTOptimumError
from ..utils import atomic_file
from .features import FeatureExtractor, extract_features

REFERENCE_SPLITS = ("train",)  # digits and image folders have one split
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def cache_dir() -> Path:
    """``$DIT_OPTIMUM_CACHE``, else ``$XDG_CACHE_HOME/dit_optimum``, else ``~/.cache/dit_optimum``."""
    if os.environ.get("DIT_OPTIMUM_CACHE"):
        return Path(os.environ["DIT_OPTIMUM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dit_optimum"


def _dataset_key(dataset: str) -> str:
    path = Path(dataset)
    if path.exists():  # a local folder: its name plus a hash of its absolute path
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
        dataset = f"{path.name}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-")


def reference_cache_path(dataset: str, split: str, resolution: int, num_samples: int, extractor: FeatureExtractor):
    """File holding the features of ``num_samples`` real images of ``dataset`` at ``resolution`` for ``extractor``."""
    name = (
        f"{_dataset_key(dataset)}_{split}_{resolution}px_n{num_samples}_{extractor.name}_{extractor.weights_hash[:16]}"
    )
    return cache_dir() / "reference" / f"{name}.npz"


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    # (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)
    images = ((images + 1) / 2).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _choose(available: int, num_samples: int, seed: int, dataset: str) -> list[int]:
    if num_samples > available:
        raise DiTOptimumError(
            f"`reference_samples`={num_samples} is more than the {available} images of `reference`={dataset!r}."
        )
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()


def load_reference_images(dataset: str, split: str, resolution: int, num_samples: int, seed: int = 0) -> np.ndarray:
    """``num_samples`` real images (uint8, (N, H, W, 3)) at the generator's ``resolution``, drawn without
    replacement in an order fixed by ``seed``: ``digits``, an image folder (searched recursively; only the chosen
    files are read) or a ``datasets`` id (``split`` of it)."""
    from ..training.data import LATENTS_METADATA, digits_data, load_image, pil_to_tensor

    path = Path(dataset)
    if (dataset == "digits" or path.is_dir()) and split not in REFERENCE_SPLITS:
        raise DiTOptimumError(
            f"Unknown `reference_split`={split!r} for {dataset!r}; allowed values: {', '.join(REFERENCE_SPLITS)}."
        )
    if dataset == "digits":
        samples = digits_data(resolution, channels=3).samples
        return _to_uint8(samples[_choose(len(samples), num_samples, seed, dataset)])
    if path.is_dir():
        if (path / LATENTS_METADATA).is_file():
            raise DiTOptimumError(
                f"`reference`={dataset!r} holds VAE latents, not images: give the real images (an image folder or "
                "a datasets id) as the reference."
            )
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        chosen = [files[i] for i in _choose(len(files), num_samples, seed, dataset)]
        return _to_uint8(torch.stack([load_image(file, resolution, 3) for file in chosen]))
    from datasets import load_dataset

    rows = load_dataset(dataset, split=split)
    chosen = rows.select(_choose(len(rows), num_samples, seed, dataset))
    return _to_uint8(torch.stack([pil_to_tensor(row["image"], resolution, 3) for row in chosen]))


def reference_features(
    dataset: str,
    resolution: int,
    num_samples: int,
    extractor: FeatureExtractor,
    split: str = "train",
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """Features (``pool``, ``spatial``) of the reference images, from the cache or computed and cached."""
    if not isinstance(num_samples, int) or num_samples < 2:
        raise DiTOptimumError(f"`reference_samples`={num_samples!r} must be an integer >= 2.")
    path = reference_cache_path(dataset, split, resolution, num_samples, extractor)
    if use_cache and path.is_file():
        with np.load(path) as stored:
            return {kind: stored[kind] for kind in stored.files}
    images = load_reference_images(dataset, split, resolution, num_samples)
    features = extract_features(images, extractor, batch_size, device)
    if use_cache:
        with atomic_file(path) as temporary, temporary.open("wb") as stream:
            np.savez(stream, **features)
    return features
