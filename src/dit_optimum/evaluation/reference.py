"""Real images for the quality metrics: one seeded split of the real data into disjoint sets, and their features,
computed once and cached in a user cache folder.

``reference``: the set generated samples are compared with; ``floor``: real images scored exactly like generated
ones (the real-vs-real value at the same N, the best a generator can show); ``fit``: the rest, on which the domain
classifier is trained. The cache key names the dataset (a local folder by its content: the listed image files'
relative paths, sizes and modification times), split, resolution, role, the chosen images, the extractor and a hash
of its weights, so a change to any of them computes new features instead of silently reusing stale ones. An
unreadable cache entry is recomputed with a warning. Never written inside site-packages.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import digits_data, list_image_files, load_hub_dataset, load_image, pil_to_tensor, source_kind, warn_files
from ..errors import DiTOptimumError
from ..files import write_cache_entry
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


def dataset_key(dataset: str) -> str:
    """``dataset`` as a cache-file name part: a local folder by its name and a fingerprint of its images."""
    path = Path(dataset).expanduser()
    if path.is_dir():  # a local folder: its name plus a fingerprint of its images
        dataset = f"{path.name}-{folder_fingerprint(path)[:16]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-")


ROLES = ("reference", "floor", "fit")


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    # (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)
    images = ((images + 1) / 2).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass(frozen=True)
class RealSplit:
    """Disjoint sets of a real dataset's images (indices into its image list), drawn once from a seeded permutation:
    ``reference`` first, then ``floor``, and the rest is ``fit``."""

    dataset: str
    split: str
    available: int
    reference: tuple[int, ...]
    floor: tuple[int, ...]
    fit: tuple[int, ...]

    def indices(self, role: str) -> tuple[int, ...]:
        if role not in ROLES:
            raise DiTOptimumError(f"Unknown `role`={role!r}; allowed values: {', '.join(ROLES)}.")
        return getattr(self, role)


def _refuse_latents(dataset: str) -> None:
    raise DiTOptimumError(
        f"`reference`={dataset!r} holds VAE latents, not images: give the real images (an image folder or "
        "a datasets id) as the reference."
    )


def _checked_kind(dataset: str, split: str) -> str:
    kind = source_kind(dataset, parameter="reference")
    if kind == "latents":
        _refuse_latents(dataset)
    if kind in ("digits", "folder") and split not in REFERENCE_SPLITS:
        raise DiTOptimumError(
            f"Unknown `reference_split`={split!r} for {dataset!r}; allowed values: {', '.join(REFERENCE_SPLITS)}."
        )
    return kind


def reference_image_count(dataset: str, split: str = "train") -> int | None:
    """How many real images ``dataset`` offers, found cheaply (no image is decoded); ``None`` for a ``datasets``
    id, whose size is known only once it is loaded."""
    kind = _checked_kind(dataset, split)
    if kind == "digits":
        return len(digits_data(8, channels=1).samples)
    if kind == "folder":
        return len(list_image_files(Path(dataset).expanduser()).images)
    return None


def real_split(dataset: str, split: str, reference_samples: int, floor_samples: int, seed: int = 0) -> RealSplit:
    """The reference, floor and fit sets of ``dataset``: ``reference_samples`` images compared with the generated
    ones, up to ``floor_samples`` more scored like generated ones (fewer if the data runs short), the rest to fit on."""
    available = reference_image_count(dataset, split)
    if available is None:
        available = len(load_hub_dataset(dataset, split, parameter="reference"))
    if reference_samples > available:
        raise DiTOptimumError(
            f"`reference_samples`={reference_samples} is more than the {available} images of `reference`={dataset!r}."
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed)).tolist()
    floor_end = reference_samples + min(floor_samples, available - reference_samples)
    return RealSplit(
        dataset,
        split,
        available,
        tuple(order[:reference_samples]),
        tuple(order[reference_samples:floor_end]),
        tuple(order[floor_end:]),
    )


@dataclass
class RealImages:
    """uint8 images (N, H, W, 3) and their class labels (``None`` for a folder without class folders)."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: dict[int, str]


def real_images(real: RealSplit, role: str, resolution: int) -> RealImages:
    """The images of one set of ``real`` at the generator's ``resolution``; only those images are read."""
    kind = _checked_kind(real.dataset, real.split)
    chosen = list(real.indices(role))
    if kind == "digits":
        data = digits_data(resolution, channels=3)
        return RealImages(_to_uint8(data.samples[chosen]), data.labels[chosen].numpy(), data.id2label)
    if kind == "folder":
        folder = Path(real.dataset).expanduser()
        listing = list_image_files(folder)
        if listing.ignored:
            warn_files(
                f"Ignored {len(listing.ignored)} file(s) under {folder} that are not images", listing.ignored, folder
            )
        files = [listing.images[i] for i in chosen]
        images = _stacked([load_image(file, resolution, 3) for file in files], resolution)
        return RealImages(images, *_folder_labels(folder, listing.images, files))
    rows = load_hub_dataset(real.dataset, real.split, parameter="reference").select(chosen)
    images = _stacked([pil_to_tensor(row["image"], resolution, 3) for row in rows], resolution)
    if "label" not in rows.column_names:
        return RealImages(images, None, {})
    names = getattr(rows.features["label"], "names", None) or []
    return RealImages(images, np.asarray(rows["label"]), dict(enumerate(names)))


def _stacked(images: list[torch.Tensor], resolution: int) -> np.ndarray:
    # (C, H, W) tensors in [-1, 1] -> uint8 (N, H, W, C); an empty set keeps its shape
    if not images:
        return np.zeros((0, resolution, resolution, 3), dtype=np.uint8)
    return _to_uint8(torch.stack(images))


def _folder_labels(folder: Path, every: list[Path], chosen: list[Path]) -> tuple[np.ndarray | None, dict[int, str]]:
    # Classes as the image-folder loader numbers them (class folders in sorted order); None for a flat folder.
    if any(len(path.relative_to(folder).parts) == 1 for path in every):
        return None, {}
    classes = sorted({path.relative_to(folder).parts[0] for path in every})
    label_of = {name: label for label, name in enumerate(classes)}
    return np.asarray([label_of[path.relative_to(folder).parts[0]] for path in chosen]), dict(enumerate(classes))


def digest_indices(indices: tuple[int, ...]) -> str:
    """A short hash of chosen image indices (which images a cached set holds)."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]


def real_cache_path(real: RealSplit, role: str, resolution: int, extractor: FeatureExtractor) -> Path:
    """File holding ``extractor``'s features of one set of ``real`` at ``resolution``."""
    chosen = real.indices(role)
    name = (
        f"{dataset_key(real.dataset)}_{real.split}_{resolution}px_{role}{len(chosen)}-{digest_indices(chosen)}_"
        f"{extractor.name}_{extractor.weights_hash[:16]}"
    )
    return cache_dir() / "reference" / f"{name}.npz"


def _read_cache(path: Path, count: int, extractor: FeatureExtractor) -> dict[str, np.ndarray] | None:
    """The features cached at ``path``, or ``None`` with a warning naming it when it cannot be read or holds other
    arrays than ``extractor`` gives for ``count`` images."""
    try:
        with np.load(path) as stored:
            features = {kind: stored[kind] for kind in stored.files}
    except _UNREADABLE_CACHE as error:
        reason = f"{type(error).__name__}: {error}"
    else:
        shapes = {kind: value.shape for kind, value in features.items()}
        expected = {kind: (count, dim) for kind, dim in extractor.feature_dims.items()}
        if shapes == expected:
            return features
        reason = f"arrays {shapes}, expected {expected}"
    warnings.warn(f"Reference feature cache {path} is unreadable ({reason}); recomputing it.", stacklevel=3)
    return None


def real_features(
    real: RealSplit,
    role: str,
    resolution: int,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """``extractor``'s features of one set of ``real``, from the cache or computed and cached (an unreadable entry
    is recomputed and rewritten atomically)."""
    count = len(real.indices(role))
    path = real_cache_path(real, role, resolution, extractor)
    cached = _read_cache(path, count, extractor) if use_cache and path.is_file() else None
    if cached is not None:
        return cached
    images = real_images(real, role, resolution).images
    features = extract_features(images, extractor, batch_size, device, progress=f"Real features ({role})")
    if not features:  # an empty set
        features = {kind: np.zeros((0, dim), dtype=np.float32) for kind, dim in extractor.feature_dims.items()}
    if use_cache:

        def save(temporary: Path) -> None:
            with temporary.open("wb") as stream:
                np.savez(stream, **features)

        write_cache_entry(path, save)
    return features
