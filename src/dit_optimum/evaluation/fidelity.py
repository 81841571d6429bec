"""Output difference between two pipelines for the same seed: the built-in quality check of a compression."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import DiTOptimumError


def output_difference(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, for images in [0, 1]) and relative L2 error ``||c - r|| / ||r||``."""
    if reference.shape != candidate.shape:
        raise DiTOptimumError(
            f"Shapes differ: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}."
        )
    reference, candidate = reference.double(), candidate.double()
    mse = torch.mean((candidate - reference) ** 2).item()
    relative = (torch.linalg.vector_norm(candidate - reference) / torch.linalg.vector_norm(reference)).item()
    return {"psnr_db": math.inf if mse == 0 else 10 * math.log10(1.0 / mse), "relative_error": relative}


def compare_pipelines(
    reference,
    candidate,
    class_labels: Sequence[int] | None = None,
    num_inference_steps: int = 10,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Sample the same classes with the same seed from both pipelines and compare the images (``output_type="pt"``).

    By default four images of the model's classes in turn (a model may have fewer than four), with guidance 4 when
    the model has a null class and none otherwise."""
    config = reference.transformer.config
    if class_labels is None:
        class_labels = [index % config.num_embeds_ada_norm for index in range(4)]
    if guidance_scale is None:
        guidance_scale = 4.0 if reference.transformer.null_class_label is not None else 1.0
    images = []
    for pipe in (reference, candidate):
        generator = torch.Generator().manual_seed(seed)
        output = pipe(
            list(class_labels),
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pt",
        )
        images.append(output.images.float().cpu())
    return output_difference(images[0], images[1])
