"""Sample quality: FID, sFID and KID of a pipeline against a real reference set.

``evaluate_quality`` samples (split across processes under accelerate), extracts Inception features once for all
three metrics, and compares with cached reference features. Every number carries its N.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from ..errors import DiTOptimumError, MissingPathError
from ..models.autoencoder import IdentityAutoencoder
from ..utils import check_number, check_positive_integers, csv_list, is_integer
from .features import FeatureExtractor, InceptionFeatures
from .metrics import frechet_distance, gaussian_statistics, kernel_inception_distance, minimum_samples_for_frechet
from .reference import reference_features, reference_image_count
from .sampling import MAX_SAMPLING_STEPS, sample_features

METRICS: tuple[str, ...] = ("fid", "sfid", "kid")
METRIC_FEATURES = {"fid": "pool", "sfid": "spatial", "kid": "pool"}
FRECHET_METRICS = ("fid", "sfid")


@dataclass
class QualitySettings:
    """What quality is measured against and with: reference data and N, sampling, metrics, Inception weights.

    ``metrics=None`` computes every metric the sample counts allow (KID always; FID/sFID only when both N exceed
    the feature dimension); naming a Frechet metric that N cannot support is an error.
    """

    reference: str = "digits"
    reference_split: str = "train"
    reference_samples: int = 1000
    num_samples: int = 250
    batch_size: int = 50
    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    seed: int = 0
    metrics: tuple[str, ...] | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    inception_weights: str | None = None
    use_cache: bool = True

    def validate(self) -> None:
        names = ("reference_samples", "num_samples", "batch_size", "num_inference_steps", "kid_subsets")
        check_positive_integers(**{name: getattr(self, name) for name in names})
        if self.num_samples < 2 or self.reference_samples < 2:
            raise DiTOptimumError("`num_samples` and `reference_samples` must be >= 2 (KID compares pairs of samples).")
        check_number("guidance_scale", self.guidance_scale, 1)
        check_positive_integers(kid_subset_size=self.kid_subset_size)
        if not is_integer(self.seed) or self.seed < 0:
            raise DiTOptimumError(f"`seed`={self.seed!r} must be an integer >= 0.")
        available = reference_image_count(self.reference)
        if available is not None and self.reference_samples > available:
            raise DiTOptimumError(
                f"`reference_samples`={self.reference_samples} is more than the {available} images of "
                f"`reference`={self.reference!r}."
            )
        if self.inception_weights is not None and not Path(self.inception_weights).is_file():
            raise MissingPathError(f"`inception_weights`={str(self.inception_weights)!r} is not a file.")
        if self.num_inference_steps > MAX_SAMPLING_STEPS:
            raise DiTOptimumError(
                f"`num_inference_steps`={self.num_inference_steps} must be at most {MAX_SAMPLING_STEPS} "
                "(the training timesteps)."
            )
        if self.metrics is not None:
            unknown = [name for name in self.metrics if name not in METRICS]
            if unknown or not self.metrics:
                raise DiTOptimumError(f"Unknown `metrics` {list(self.metrics)}; allowed values: {', '.join(METRICS)}.")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``QualitySettings`` (shared by ``evaluate`` and ``benchmark``)."""
    parser.add_argument("--num-samples", type=int, help="generated images for the quality metrics")
    parser.add_argument("--reference", help="real images: digits | imagefolder | datasets id")
    parser.add_argument("--reference-samples", type=int, help="real images in the reference statistics")
    parser.add_argument("--steps", type=int, help="sampling steps (DDIM)")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--metrics", type=csv_list, help=f"{','.join(METRICS)} (default: all that N supports)")
    parser.add_argument("--inception-weights", help="FID Inception TorchScript file (default: found offline)")
    parser.add_argument("--batch-size", type=int, help="sampling/feature batch for the quality metrics")


def quality_settings_from_arguments(args: argparse.Namespace, base: QualitySettings) -> QualitySettings:
    """``base`` changed by the quality options given on the command line."""
    if args.metrics is not None and not args.metrics:
        raise DiTOptimumError(f"`--metrics` names no metric; allowed values: {', '.join(METRICS)}.")
    changes = {
        "num_samples": args.num_samples,
        "reference": args.reference,
        "reference_samples": args.reference_samples,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "metrics": tuple(args.metrics) if args.metrics is not None else None,
        "inception_weights": args.inception_weights,
        "batch_size": args.batch_size,
    }
    return replace(base, **{key: value for key, value in changes.items() if value is not None})


def check_feature_memory(settings: QualitySettings, feature_dims: dict[str, int]) -> None:
    """Refuse sample counts whose features (float32, generated + reference) cannot fit in the memory available."""
    import psutil

    needed = 4 * sum(feature_dims.values()) * (settings.num_samples + settings.reference_samples)
    available = psutil.virtual_memory().available
    if needed > available:
        raise DiTOptimumError(
            f"`num_samples`={settings.num_samples} and `reference_samples`={settings.reference_samples} need about "
            f"{needed / 2**30:.1f} GiB for their features ({sum(feature_dims.values())} floats per image); "
            f"{available / 2**30:.1f} GiB are available. Use fewer samples."
        )


def resolve_metrics(settings: QualitySettings, feature_dims: dict[str, int]) -> list[str]:
    """The metrics to compute: the requested ones (checked against N, and N against memory), or all N supports."""
    settings.validate()
    check_feature_memory(settings, feature_dims)
    fewest = min(settings.num_samples, settings.reference_samples)
    requested = list(settings.metrics) if settings.metrics is not None else list(METRICS)
    chosen = []
    for name in requested:
        needed = minimum_samples_for_frechet(feature_dims[METRIC_FEATURES[name]])
        if name in FRECHET_METRICS and fewest < needed:
            if settings.metrics is not None:
                raise DiTOptimumError(
                    f"`metrics` asks for {name} but `num_samples`={settings.num_samples} / `reference_samples`="
                    f"{settings.reference_samples}: {name} needs N >= {needed} in both sets "
                    f"({feature_dims[METRIC_FEATURES[name]]}-d features). Raise N, or use kid, which is unbiased "
                    "at small N."
                )
            continue
        chosen.append(name)
    return chosen


def output_resolution(pipeline) -> int:
    """Side in pixels of the images ``pipeline`` generates."""
    side = pipeline.transformer.config.sample_size
    if isinstance(pipeline.vae, IdentityAutoencoder):
        return side
    return side * 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def default_feature_extractor(settings: QualitySettings, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The FID Inception network (weights from ``settings.inception_weights`` or the offline search order)."""
    return InceptionFeatures(settings.inception_weights).to(device)


def evaluate_quality(
    pipeline,
    settings: QualitySettings | None = None,
    extractor: FeatureExtractor | None = None,
    keep_images: int = 0,
    state: PartialState | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """FID / sFID / KID of ``pipeline`` against ``settings.reference``, plus the first ``keep_images`` samples.

    Under several processes each samples a share; the metrics are computed (and returned) on the main process,
    the others return an empty dict.
    """
    settings = settings or QualitySettings()
    state = state or PartialState(cpu=not torch.cuda.is_available())
    extractor = extractor or default_feature_extractor(settings, state.device)
    metrics = resolve_metrics(settings, extractor.feature_dims)
    generated = sample_features(
        pipeline,
        settings.num_samples,
        extractor,
        batch_size=settings.batch_size,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        seed=settings.seed,
        keep_images=keep_images,
        state=state,
    )
    if not state.is_main_process:
        return {}, generated.images
    reference = reference_features(
        settings.reference,
        output_resolution(pipeline),
        settings.reference_samples,
        extractor,
        split=settings.reference_split,
        batch_size=settings.batch_size,
        device=state.device,
        use_cache=settings.use_cache,
    )
    result: dict[str, Any] = {name: None for name in METRICS}
    for name in metrics:
        kind = METRIC_FEATURES[name]
        if name == "kid":
            result["kid"], result["kid_std"] = kernel_inception_distance(
                generated.features[kind],
                reference[kind],
                num_subsets=settings.kid_subsets,
                subset_size=settings.kid_subset_size,
                seed=settings.seed,
            )
        else:
            result[name] = frechet_distance(
                gaussian_statistics(generated.features[kind], "generated features"),
                gaussian_statistics(reference[kind], "reference features"),
            )
    result.update(
        num_samples=settings.num_samples,
        reference_samples=settings.reference_samples,
        kid_subset_size=min(settings.kid_subset_size, settings.num_samples, settings.reference_samples),
        sampler=type(pipeline.scheduler).__name__,
        feature_extractor=f"{extractor.name}:{extractor.weights_hash[:12]}",
        processes=state.num_processes,
        quality_settings={k: v for k, v in asdict(settings).items() if k != "use_cache"},
    )
    return result, generated.images
