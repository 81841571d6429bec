"""Generate samples for the quality metrics and turn them into features, split across processes with accelerate.

Sample ``i`` always gets class ``i % num_classes`` and its own generator seeded by ``seed + i``, so the samples do
not depend on how many processes share the work or on the batch size. Each process extracts the features of its
contiguous share; only features (not images) are gathered, in sample order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather
from tqdm.auto import tqdm

from ..utils import check_positive_integers
from .features import FeatureExtractor, extract_features, to_uint8

MAX_SAMPLING_STEPS = 1000  # the DDPM schedule the models are trained with


@dataclass
class SampleFeatures:
    """Features of every generated sample (on every process), the first few images, and the sample count."""

    features: dict[str, np.ndarray]
    images: np.ndarray
    count: int


def sampling_options(pipeline, num_inference_steps: int, guidance_scale: float) -> tuple[int, float]:
    """The steps and guidance ``pipeline`` is measured with: its recorded ``sampling_defaults`` where it has them (a
    few-step solver, a step-distilled student samples as it was made to), else the given ones (the run's settings).
    Quality and speed both sample through this, so a row's numbers are for the same sampling."""
    recorded = getattr(pipeline, "sampling_defaults", None) or {}
    return (
        int(recorded.get("num_inference_steps", num_inference_steps)),
        float(recorded.get("guidance_scale", guidance_scale)),
    )


def sample_labels(count: int, num_classes: int, start: int = 0) -> list[int]:
    """Balanced class labels: sample ``i`` gets ``i % num_classes``."""
    return [index % num_classes for index in range(start, start + count)]


@torch.no_grad()
def generate_images(
    pipeline,
    indices: range,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
) -> np.ndarray:
    """uint8 images (B, H, W, C) of the samples with the given indices (labels and seeds fixed per index)."""
    num_classes = pipeline.transformer.config.num_embeds_ada_norm
    generators = [torch.Generator().manual_seed(seed + index) for index in indices]
    output = pipeline(
        sample_labels(len(indices), num_classes, indices.start),
        guidance_scale=guidance_scale,
        generator=generators,
        num_inference_steps=num_inference_steps,
        output_type="np",
    )
    return to_uint8(output.images)


def process_share(num_samples: int, world: int, rank: int) -> range:
    """Sample indices of process ``rank``: contiguous near-equal shares (the first ``num_samples % world`` longer)."""
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def sample_features(
    pipeline,
    num_samples: int,
    extractors: Mapping[str, FeatureExtractor],
    *,
    batch_size: int = 50,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.5,
    seed: int = 0,
    keep_images: int = 0,
    state: PartialState | None = None,
) -> SampleFeatures:
    """Generate ``num_samples`` images with ``pipeline`` and return every extractor's features (keyed
    ``<extractor name>.<kind>``) gathered from every process.

    Run under ``torchrun``/``accelerate launch`` and every process takes a share; ``keep_images`` of the first
    samples are kept (on the process that made them) for sample grids.
    """
    check_positive_integers(num_samples=num_samples, batch_size=batch_size)
    state = state or PartialState(cpu=not torch.cuda.is_available())
    share = process_share(num_samples, state.num_processes, state.process_index)
    device = state.device
    local: dict[str, list[np.ndarray]] = {}
    kept: list[np.ndarray] = []
    # One bar on the main process (for its share; on a terminal only): the others' shares progress alike.
    disable = None if state.is_main_process else True
    with tqdm(total=len(share), desc="Generated-sample features", unit="image", disable=disable) as bar:
        for start in range(share.start, share.stop, batch_size):
            indices = range(start, min(start + batch_size, share.stop))
            images = generate_images(pipeline, indices, num_inference_steps, guidance_scale, seed)
            if start < keep_images:
                kept.append(images[: keep_images - start])
            for name, extractor in extractors.items():
                for kind, value in extract_features(images, extractor, batch_size, device).items():
                    local.setdefault(f"{name}.{kind}", []).append(value)
            bar.update(len(indices))
    # A process with no share (fewer samples than processes) still takes part in the gather, with empty features.
    dims = {
        f"{name}.{kind}": dim for name, extractor in extractors.items() for kind, dim in extractor.feature_dims.items()
    }
    features = {
        kind: np.concatenate(local[kind]) if kind in local else np.zeros((0, dim), dtype=np.float32)
        for kind, dim in dims.items()
    }
    if state.num_processes > 1:
        features = _gather_in_order(features, num_samples, state)
    empty = np.zeros((0, 0, 0, 0), dtype=np.uint8)
    return SampleFeatures(features, np.concatenate(kept) if kept else empty, num_samples)


def _gather_in_order(features: dict[str, np.ndarray], num_samples: int, state: PartialState) -> dict[str, np.ndarray]:
    # Pad every share to the largest, gather, then drop the padding of the shorter shares.
    longest = math.ceil(num_samples / state.num_processes)
    gathered = {}
    for kind, value in sorted(features.items()):
        padded = torch.zeros(longest, value.shape[1], dtype=torch.float32, device=state.device)
        padded[: len(value)] = torch.from_numpy(value).to(state.device)
        everything = gather(padded).reshape(state.num_processes, longest, -1).cpu().numpy()
        lengths = [len(process_share(num_samples, state.num_processes, rank)) for rank in range(state.num_processes)]
        gathered[kind] = np.concatenate([everything[rank, :length] for rank, length in enumerate(lengths)])
    return gathered
