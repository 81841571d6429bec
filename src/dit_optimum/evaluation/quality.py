"""Sample quality of a pipeline: the declared quality metrics with their 95% intervals and real-vs-real floors.

``evaluate_quality`` samples once (split across processes under accelerate; sample ``i`` has class
``i % classes`` and seed ``seed + i``), extracts the features every requested metric needs (Inception for FID /
sFID / KID, the domain classifier for class accuracy and FD_domain), and scores them against the real
``reference`` set of ``reference.real_split``. Every number comes with a bootstrap interval and with the same
metric computed on real ``floor`` images at the same N: the value a perfect generator would show.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from ..errors import DiTOptimumError, MissingPathError
from ..models.autoencoder import IdentityAutoencoder
from ..models.resources import check_resources
from ..pipelines.dit import MAX_GUIDANCE_SCALE
from ..utils import check_number, check_positive_integers, csv_list
from .declarations import Metric, all_metrics, get_metric
from .domain import FEATURE_DIM, TrainedClassifier, domain_classifier
from .features import FeatureExtractor, InceptionFeatures
from .fid import inception_extractor
from .intervals import CONFIDENCE, bootstrap_interval
from .metrics import minimum_samples_for_frechet
from .reference import RealSplit, real_features, real_images, real_split, reference_image_count
from .sampling import MAX_SAMPLING_STEPS, sample_features, sample_labels, sampling_options


@dataclass
class QualitySettings:
    """What quality is measured against and with: reference data and N, sampling, metrics, resamples.

    ``metrics=None`` computes every quality metric that applies: the Inception ones N supports (FID/sFID need N
    above their feature dimension, KID does not), and the domain ones when the reference has class labels
    (``digits`` or a folder of class folders). Naming a metric that N cannot support is an error. The real data is
    split once (seeded) into ``reference_samples`` reference images, up to ``num_samples`` floor images and the
    rest, on which the domain classifier is fitted.
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
    bootstrap: int = 200
    inception_weights: str | None = None
    use_cache: bool = True

    def validate(self, reference: bool = True) -> None:
        """Check every setting (and, unless ``reference`` is False, the reference's size: a cost-only run reads no
        reference) before anything is sampled."""
        names = ("reference_samples", "num_samples", "batch_size", "num_inference_steps", "bootstrap")
        check_positive_integers(**{name: getattr(self, name) for name in names})
        if self.num_samples < 2 or self.reference_samples < 2 or self.bootstrap < 2:
            raise DiTOptimumError(
                "`num_samples`, `reference_samples` and `bootstrap` must be >= 2 (intervals resample, KID pairs)."
            )
        check_number("guidance_scale", self.guidance_scale, 1, MAX_GUIDANCE_SCALE)
        # sample i is seeded with seed + i: every one must be a torch seed
        check_resources(seed=self.seed, seeds=self.num_samples, parameter="seed")
        if self.num_inference_steps > MAX_SAMPLING_STEPS:
            raise DiTOptimumError(
                f"`num_inference_steps`={self.num_inference_steps} must be at most {MAX_SAMPLING_STEPS} "
                "(the training timesteps)."
            )
        available = reference_image_count(self.reference, self.reference_split) if reference else None
        if available is not None and self.reference_samples > available:
            raise DiTOptimumError(
                f"`reference_samples`={self.reference_samples} is more than the {available} images of "
                f"`reference`={self.reference!r}."
            )
        if self.inception_weights is not None and not Path(self.inception_weights).is_file():
            raise MissingPathError(f"`inception_weights`={str(self.inception_weights)!r} is not a file.")
        if self.metrics is not None:
            known = [metric.key for metric in all_metrics("quality")]
            unknown = [name for name in self.metrics if name not in known]
            if unknown or not self.metrics:
                raise DiTOptimumError(f"Unknown `metrics` {list(self.metrics)}; allowed values: {', '.join(known)}.")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``QualitySettings`` (shared by ``evaluate`` and ``benchmark``)."""
    names = ",".join(metric.key for metric in all_metrics("quality"))
    parser.add_argument("--num-samples", type=int, help="generated images for the quality metrics")
    parser.add_argument("--reference", help="real images: digits | imagefolder | datasets id")
    parser.add_argument("--reference-samples", type=int, help="real images the generated ones are compared with")
    parser.add_argument("--steps", type=int, help="sampling steps (DDIM)")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--metrics", type=csv_list, help=f"{names} (default: all that apply)")
    parser.add_argument("--bootstrap", type=int, help="resamples of each 95%% interval")
    parser.add_argument("--inception-weights", help="FID Inception TorchScript file (default: found offline)")
    parser.add_argument("--batch-size", type=int, help="sampling/feature batch for the quality metrics")


def quality_settings_from_arguments(args: argparse.Namespace, base: QualitySettings) -> QualitySettings:
    """``base`` changed by the quality options given on the command line."""
    if args.metrics is not None and not args.metrics:
        names = ", ".join(metric.key for metric in all_metrics("quality"))
        raise DiTOptimumError(f"`--metrics` names no metric; allowed values: {names}.")
    changes = {
        "num_samples": args.num_samples,
        "reference": args.reference,
        "reference_samples": args.reference_samples,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "metrics": tuple(args.metrics) if args.metrics is not None else None,
        "bootstrap": args.bootstrap,
        "inception_weights": args.inception_weights,
        "batch_size": args.batch_size,
    }
    return replace(base, **{key: value for key, value in changes.items() if value is not None})


def feature_dimensions(inception: FeatureExtractor | None = None) -> dict[str, int]:
    """Dimension of every feature kind the quality metrics read (the Inception network's, or a stand-in's)."""
    inception_dims = (inception or InceptionFeatures).feature_dims
    return {
        **{f"inception.{kind}": dim for kind, dim in inception_dims.items()},
        "domain.features": FEATURE_DIM,
        "domain.logits": FEATURE_DIM,  # at most as many classes as features: an upper estimate for memory checks
    }


def _labelled(settings: QualitySettings) -> bool:
    # Whether the reference has class labels without loading it: digits, or a folder of class folders only.
    if settings.reference == "digits":
        return True
    folder = Path(settings.reference).expanduser()
    return folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def resolve_metrics(settings: QualitySettings, dimensions: dict[str, int] | None = None) -> list[Metric]:
    """The metrics to compute: the requested ones (checked against N, and N against memory), or all that apply.

    ``dimensions`` are the feature sizes (``feature_dimensions``; default: the FID Inception network's).
    """
    settings.validate()
    dimensions = dimensions or feature_dimensions()
    fewest = min(settings.num_samples, settings.reference_samples)
    requested = settings.metrics
    candidates = [get_metric(name) for name in requested] if requested else all_metrics("quality")
    chosen = []
    for metric in candidates:
        needed = minimum_samples_for_frechet(dimensions[metric.features[0]]) if metric.frechet else 2
        if fewest < needed:
            if requested:
                raise DiTOptimumError(
                    f"`metrics` asks for {metric.key} but `num_samples`={settings.num_samples} / `reference_samples`="
                    f"{settings.reference_samples}: {metric.key} needs N >= {needed} in both sets "
                    f"({needed - 1}-d features). Raise N, or use a metric without that limit (kid, class_accuracy)."
                )
            continue
        if metric.family == "domain" and not requested and not _labelled(settings):
            continue
        chosen.append(metric)
    _check_feature_memory(settings, chosen, dimensions)
    return chosen


def _check_feature_memory(settings: QualitySettings, metrics: list[Metric], dimensions: dict[str, int]) -> None:
    import psutil

    # generated + floor + reference sets
    dims = {kind: dimensions[kind] for metric in metrics for kind in metric.features}
    floats = sum(dims.values()) * (2 * settings.num_samples + settings.reference_samples)
    needed, available = 4 * floats, psutil.virtual_memory().available
    if needed > available:
        raise DiTOptimumError(
            f"`num_samples`={settings.num_samples} and `reference_samples`={settings.reference_samples} need about "
            f"{needed / 2**30:.1f} GiB for their features ({sum(dims.values())} floats per image); "
            f"{available / 2**30:.1f} GiB are available. Use fewer samples."
        )


def output_resolution(pipeline) -> int:
    """Side in pixels of the images ``pipeline`` generates."""
    side = pipeline.transformer.config.sample_size
    if isinstance(pipeline.vae, IdentityAutoencoder):
        return side
    return side * 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


@dataclass
class QualityEvaluation:
    """The quality numbers of one pipeline (``metrics``: values, ``<key>_interval``, ``<key>_real`` floors, N and
    settings), the per-sample features and labels they came from, and the first generated images."""

    metrics: dict[str, Any]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 0), dtype=np.uint8))


def _prefixed(name: str, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{name}.{kind}": value for kind, value in features.items()}


def _resamples(metric: Metric, settings: QualitySettings) -> int:
    return min(settings.bootstrap, metric.max_resamples or settings.bootstrap)


_FLOORS: dict[tuple, tuple[float, tuple[float, float]]] = {}  # real-vs-real values, computed once per process


def _floor(metric: Metric, real: RealSplit, floor: dict, reference: dict, labels: np.ndarray, settings, key) -> dict:
    if len(labels) < 2:
        return {}
    memo = (key, metric.key, real, _resamples(metric, settings), settings.seed)
    if memo not in _FLOORS:
        value = metric.statistic(floor, reference, labels)
        interval = bootstrap_interval(
            metric.statistic, floor, reference, labels, _resamples(metric, settings), CONFIDENCE, settings.seed
        )
        _FLOORS[memo] = (value, interval)
    value, interval = _FLOORS[memo]
    return {f"{metric.key}_real": value, f"{metric.key}_real_interval": _within_range(metric, interval)}


def _within_range(metric: Metric, interval: tuple[float, float]) -> list[float]:
    """A share's interval (a metric shown in percent) kept inside [0, 1]: the re-centred bootstrap range of an
    accuracy near 100% can otherwise pass it."""
    low, high = interval
    return [max(0.0, low), min(1.0, high)] if metric.scale == 100 else [low, high]


def evaluate_quality(
    pipeline,
    settings: QualitySettings | None = None,
    inception: FeatureExtractor | None = None,
    classifier: TrainedClassifier | None = None,
    keep_images: int = 0,
    state: PartialState | None = None,
) -> QualityEvaluation:
    """The quality metrics of ``pipeline`` against ``settings.reference``, plus the first ``keep_images`` samples.

    ``inception`` / ``classifier`` replace the FID Inception network / the domain classifier (tests inject small
    ones); by default they are loaded (Inception, found offline) or trained and cached (the classifier). Under
    several processes each samples a share; the numbers are computed on the main process, the others return only
    their images. A pipeline with recorded sampling defaults (``sampling_options``) samples with its own steps and
    guidance; ``quality_settings`` in the result records the ones used.
    """
    settings = settings or QualitySettings()
    steps, guidance = sampling_options(pipeline, settings.num_inference_steps, settings.guidance_scale)
    state = state or PartialState(cpu=not torch.cuda.is_available())
    metrics = resolve_metrics(settings, feature_dimensions(inception))
    resolution = output_resolution(pipeline)
    num_classes = pipeline.transformer.config.num_embeds_ada_norm
    real = real_split(
        settings.reference, settings.reference_split, settings.reference_samples, settings.num_samples, settings.seed
    )
    families = {metric.family for metric in metrics}
    extractors: dict[str, FeatureExtractor] = {}
    if "inception" in families:
        extractors["inception"] = inception or inception_extractor(settings.inception_weights, state.device)
    if "domain" in families:
        classifier = classifier or domain_classifier(real, resolution, use_cache=settings.use_cache)
        if classifier.num_classes != num_classes:
            raise DiTOptimumError(
                f"The domain metrics need the generator's classes to be the reference's: the pipeline has "
                f"{num_classes} classes, `reference`={settings.reference!r} has {classifier.num_classes}."
            )
        extractors["domain"] = classifier.model.to(state.device)
    generated = sample_features(
        pipeline,
        settings.num_samples,
        extractors,
        batch_size=settings.batch_size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=settings.seed,
        keep_images=keep_images,
        state=state,
    )
    if not state.is_main_process:
        return QualityEvaluation({}, images=generated.images)
    labels = np.asarray(sample_labels(settings.num_samples, num_classes))
    reference, floor = {}, {}
    for name, extractor in extractors.items():
        options = {"batch_size": settings.batch_size, "device": state.device, "use_cache": settings.use_cache}
        reference.update(_prefixed(name, real_features(real, "reference", resolution, extractor, **options)))
        floor.update(_prefixed(name, real_features(real, "floor", resolution, extractor, **options)))
    # labels of the floor images (class accuracy of real images); the Inception metrics only count them
    floor_labels = (
        real_images(real, "floor", resolution).labels if "domain" in families else np.zeros(len(real.floor), np.int64)
    )
    result: dict[str, Any] = {}
    for metric in metrics:
        value = metric.statistic(generated.features, reference, labels)
        interval = bootstrap_interval(
            metric.statistic,
            generated.features,
            reference,
            labels,
            _resamples(metric, settings),
            CONFIDENCE,
            settings.seed,
        )
        result.update({metric.key: value, f"{metric.key}_interval": _within_range(metric, interval)})
        cache_key = tuple(getattr(extractor, "weights_hash", "") for extractor in extractors.values())
        result.update(_floor(metric, real, floor, reference, floor_labels, settings, (resolution, cache_key)))
    if classifier is not None:
        result.update(
            classifier_accuracy=classifier.held_out_accuracy, classifier_held_out_samples=classifier.held_out_samples
        )
    result.update(
        num_samples=settings.num_samples,
        reference_samples=len(real.reference),
        floor_samples=len(real.floor),
        confidence=CONFIDENCE,
        sampler=type(pipeline.scheduler).__name__,
        feature_extractors={name: f"{e.name}:{e.weights_hash[:12]}" for name, e in extractors.items()},
        processes=state.num_processes,
        quality_settings={
            **{k: v for k, v in asdict(settings).items() if k != "use_cache"},
            "num_inference_steps": steps,
            "guidance_scale": guidance,
        },
    )
    return QualityEvaluation(result, generated.features, labels, reference, generated.images)
