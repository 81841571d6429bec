"""Reference (real-data) features, computed once and cached in a user cache folder.

The cache key names the dataset, split, resolution, N, the extractor and a hash of its weights, so a change to any
of them computes new statistics instead of silently reusing stale ones; a local folder is keyed by its content (the
listed image files' relative paths, sizes and modification times), not its path. An unreadable cache entry is
recomputed with a warning. Never written inside site-packages.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..data import digits_data, list_image_files, load_hub_dataset, load_image, pil_to_tensor, source_kind, warn_files
from ..errors import DiTOptimumError
from ..utils import atomic_file
from .features import FeatureExtractor, extract_features

REFERENCE_SPLITS = ("train",)  # digits and image folders have one split
# What reading a damaged .npz raises (truncated zip, bad member, empty file, arrays stored as objects).
_UNREADABLE_CACHE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def cache_dir() -> Path:
    """``$DIT_OPTIMUM_CACHE``, else ``$XDG_CACHE_HOME/dit_optimum``, else ``~/.cache/dit_optimum``."""
    if os.environ.get("DIT_OPTIMUM_CACHE"):
        return Path(os.environ["DIT_OPTIMUM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dit_optimum"


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 over the listed image files' relative paths, sizes and modification times (ns): changes when an image
    is added, removed, renamed or rewritten, without reading any image."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in list_image_files(folder).images:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _dataset_key(dataset: str) -> str:
    path = Path(dataset).expanduser()
    if path.is_dir():  # a local folder: its name plus a fingerprint of its images
        dataset = f"{path.name}-{folder_fingerprint(path)[:16]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-")


def reference_cache_path(
    dataset: str, split: str, resolution: int, num_samples: int, extractor: FeatureExtractor
) -> Path:
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


def _refuse_latents(dataset: str) -> None:
    raise DiTOptimumError(
        f"`reference`={dataset!r} holds VAE latents, not images: give the real images (an image folder or "
        "a datasets id) as the reference."
    )


def reference_image_count(dataset: str) -> int | None:
    """How many real images ``dataset`` offers, found cheaply (no image is decoded); ``None`` for a ``datasets``
    id, whose size is known only once it is loaded."""
    kind = source_kind(dataset, parameter="reference")
    if kind == "latents":
        _refuse_latents(dataset)
    if kind == "digits":
        return len(digits_data(8, channels=1).samples)
    if kind == "folder":
        return len(list_image_files(Path(dataset).expanduser()).images)
    return None


def load_reference_images(dataset: str, split: str, resolution: int, num_samples: int, seed: int = 0) -> np.ndarray:
    """``num_samples`` real images (uint8, (N, H, W, 3)) at the generator's ``resolution``, drawn without
    replacement in an order fixed by ``seed``: ``digits``, an image folder (``list_image_files``: recursive, hidden
    entries left out; only the chosen files are read) or a ``datasets`` id (``split`` of it)."""
    kind = source_kind(dataset, parameter="reference")
    if kind in ("digits", "folder") and split not in REFERENCE_SPLITS:
        raise DiTOptimumError(
            f"Unknown `reference_split`={split!r} for {dataset!r}; allowed values: {', '.join(REFERENCE_SPLITS)}."
        )
    if kind == "digits":
        samples = digits_data(resolution, channels=3).samples
        return _to_uint8(samples[_choose(len(samples), num_samples, seed, dataset)])
    if kind == "latents":
        _refuse_latents(dataset)
    if kind == "folder":
        folder = Path(dataset).expanduser()
        listing = list_image_files(folder)
        if listing.ignored:
            warn_files(
                f"Ignored {len(listing.ignored)} file(s) under {folder} that are not images", listing.ignored, folder
            )
        chosen = [listing.images[i] for i in _choose(len(listing.images), num_samples, seed, dataset)]
        return _to_uint8(torch.stack([load_image(file, resolution, 3) for file in chosen]))
    rows = load_hub_dataset(dataset, split, parameter="reference")
    chosen = rows.select(_choose(len(rows), num_samples, seed, dataset))
    return _to_uint8(torch.stack([pil_to_tensor(row["image"], resolution, 3) for row in chosen]))


def _read_cache(path: Path, num_samples: int, extractor: FeatureExtractor) -> dict[str, np.ndarray] | None:
    """The features cached at ``path``, or ``None`` with a warning naming it when it cannot be read or holds other
    arrays than ``extractor`` gives for ``num_samples`` images."""
    try:
        with np.load(path) as stored:
            features = {kind: stored[kind] for kind in stored.files}
    except _UNREADABLE_CACHE as error:
        reason = f"{type(error).__name__}: {error}"
    else:
        shapes = {kind: value.shape for kind, value in features.items()}
        expected = {kind: (num_samples, dim) for kind, dim in extractor.feature_dims.items()}
        if shapes == expected:
            return features
        reason = f"arrays {shapes}, expected {expected}"
    warnings.warn(f"Reference feature cache {path} is unreadable ({reason}); recomputing it.", stacklevel=3)
    return None


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
    """Features (``pool``, ``spatial``) of the reference images, from the cache or computed and cached (an
    unreadable entry is recomputed and rewritten atomically)."""
    if not isinstance(num_samples, int) or num_samples < 2:
        raise DiTOptimumError(f"`reference_samples`={num_samples!r} must be an integer >= 2.")
    path = reference_cache_path(dataset, split, resolution, num_samples, extractor)
    cached = _read_cache(path, num_samples, extractor) if use_cache and path.is_file() else None
    if cached is not None:
        return cached
    images = load_reference_images(dataset, split, resolution, num_samples)
    features = extract_features(images, extractor, batch_size, device, progress="Reference features")
    if use_cache:
        with atomic_file(path) as temporary, temporary.open("wb") as stream:
            np.savez(stream, **features)
    return features
