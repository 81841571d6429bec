"""What a benchmark run measures: the matrix, the training recipe, quality and speed settings, the presets, and
how the command line assembles them. Everything is checked here, before the first cell starts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..configs import PAPER_PRESETS, dit_config, parse_preset_name, preset_names
from ..data import source_kind
from ..errors import DiTOptimumError
from ..evaluation.efficiency import SpeedSettings
from ..evaluation.quality import (
    QualitySettings,
    add_quality_arguments,
    quality_settings_from_arguments,
    resolve_metrics,
)
from ..files import check_output_path
from ..models.transformer import DiTOptimumTransformer2DModel, check_activation_memory
from ..techniques.registry import TECHNIQUES
from ..training.config import TrainConfig
from ..utils import check_positive_integers, check_source, csv_list

RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"
REPORT_FILE = "report.md"
# The fixed-name files a run writes into its output folder: a user's file of the same name there is refused up front.
OUTPUT_FILES = (RESULTS_FILE, RESULTS_CSV, REPORT_FILE)
DEFAULT_VARIANTS: tuple[str, ...] = ("DiT-XS/4",)
# Every technique family of the study; the attention types are its simplified ones (shallow, mediated, focused
# multi-query linear); pruning also with recovery; step caches and combined recipes (the best of those measured in
# BENCHMARKS.md). Others (gqa, mqa, focused, quanto-int4, the other caches, ...): --techniques.
DEFAULT_TECHNIQUES: tuple[str, ...] = (
    "baseline",
    "attention-shallow",
    "attention-mediated",
    "attention-focused_mqa",
    "moe",
    "distill",
    "bf16",
    "int8",
    "int8-dynamic",
    "quanto-int8",
    "prune-heads-50",
    "prune-mlp-50",
    "prune-depth-50",
    "prune-heads-50-recover",
    "prune-depth-50-recover",
    "cache-first-block-0.5",
    "cache-taylorseer",
    "cache-block-schedule",
    "int8+cache-taylorseer",
    "prune-depth-50-recover+int8+cache-taylorseer",
)
PRESETS: tuple[str, ...] = ("default", "paper")
# Class count assumed when checking memory before the data is loaded (only the embedding table depends on it).
_ESTIMATE_CLASSES = 1000


@dataclass
class TrainingRecipe:
    """How the baseline and every trained technique of a variant are trained (identically, for fairness). Each field
    but ``recovery_steps`` is the ``TrainConfig`` field of the same name.

    The defaults are the small-data recipe chosen by the sweep in BENCHMARKS.md (``benchmarks/digits_recipe.py``):
    DiT-XS/4 on the digits reaches real digits within the CPU budget. ``--preset paper`` uses fast-DiT's.
    """

    steps: int = 1600
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    ema_decay: float = 0.999
    checkpoint_every: int = 400
    mixed_precision: str = "bf16"
    seed: int = 0
    # fine-tuning steps of the recovery techniques (a pruned baseline distilled from the unpruned one)
    recovery_steps: int = 400

    def train_config(self, output_dir: str, variant: str, data: str, image_size: int, channels: int, **extra: Any):
        """The trainer's config for one run of this recipe (resumable, logging about ten times); ``extra`` adds or
        replaces trainer settings (a fine-tune's ``pretrained`` and ``steps``)."""
        recipe = {name: value for name, value in asdict(self).items() if name != "recovery_steps"}
        options = {
            "output_dir": output_dir,
            "model": variant,
            "data": data,
            "image_size": image_size,
            "channels": channels,
            **recipe,  # the recipe's fields are TrainConfig's, by name
            "resume": True,
            **extra,
        }
        steps = options["steps"]
        options["log_every"] = max(1, min(50, steps // 10)) if isinstance(steps, int) else 1
        return TrainConfig(**options)


@dataclass
class BenchmarkSettings:
    """The whole matrix: variants x techniques, the data they train on, and how each cell is measured. The
    defaults are the embedded default run (``preset_settings("default")``).

    ``pretrained`` maps a variant to a trained baseline pipeline (folder or Hub id) used instead of training one.
    ``speed_only`` measures the cost columns alone on untrained models (``UntrainedContext``): no data, no training,
    no quality metrics; ``channels=4`` then means latents decoded by an SD-VAE-shaped autoencoder.
    """

    output_dir: str = "benchmark-results"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    techniques: tuple[str, ...] = DEFAULT_TECHNIQUES
    data: str = "digits"
    image_size: int = 16
    channels: int = 1
    pretrained: dict[str, str] = field(default_factory=dict)
    training: TrainingRecipe = field(default_factory=TrainingRecipe)
    # the domain metrics (class accuracy, FD_domain) with N=300: the embedded default fits 15 minutes on 2 CPU cores
    quality: QualitySettings = field(
        default_factory=lambda: QualitySettings(
            num_samples=300,
            reference_samples=500,
            num_inference_steps=10,
            guidance_scale=2.0,
            batch_size=100,
            metrics=("class_accuracy", "fd_domain"),
        )
    )
    speed: SpeedSettings = field(
        default_factory=lambda: SpeedSettings(
            batch_size=16, forward_batch_size=64, num_inference_steps=10, guidance_scale=2.0
        )
    )
    grid_size: int = 20
    speed_only: bool = False

    def validate(self) -> None:
        """Check every setting, and that each variant's model and batches can be built here, before any work."""
        check_output_path(self.output_dir, "output_dir")  # '' would silently mean the current folder
        for name in ("variants", "techniques"):  # a plain string would be read letter by letter
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(item, str) for item in value):
                example = "DiT-S/2" if name == "variants" else "baseline"
                raise DiTOptimumError(f"`{name}`={value!r} must be a tuple of names, e.g. {name}=({example!r},).")
        if not self.variants or not self.techniques:
            raise DiTOptimumError("`variants` and `techniques` must each name at least one entry.")
        seen: dict[tuple[str, int], str] = {}
        for variant in self.variants:  # one model measured twice under two spellings would be two rows of one
            key = parse_preset_name(variant)
            if key in seen:
                raise DiTOptimumError(f"`variants` names one preset twice ({seen[key]!r} and {variant!r}).")
            seen[key] = variant
        for name in set(self.techniques):
            if self.techniques.count(name) > 1:
                raise DiTOptimumError(f"`techniques` names {name!r} twice.")
        unknown = [name for name in self.techniques if name not in TECHNIQUES]
        if unknown:
            raise DiTOptimumError(f"Unknown `techniques` {unknown}; allowed values: {', '.join(TECHNIQUES)}.")
        extra = [variant for variant in self.pretrained if variant not in self.variants]
        if extra:
            raise DiTOptimumError(
                f"`pretrained` names variants {extra} that are not in `variants` {list(self.variants)}."
            )
        for path in self.pretrained.values():
            check_source(path, "pretrained")
        check_positive_integers(
            image_size=self.image_size, grid_size=self.grid_size, recovery_steps=self.training.recovery_steps
        )
        allowed_channels = (1, 3, 4) if self.speed_only else (1, 3)
        if self.channels not in allowed_channels:
            raise DiTOptimumError(
                f"`channels`={self.channels!r} is not allowed; allowed values: {allowed_channels} "
                "(4 = latents, with --speed-only; real latents come from a --data latents folder)."
            )
        if not self.speed_only:
            source_kind(self.data, "data")
        self.quality.validate(reference=not self.speed_only)  # a cost-only run samples but reads no reference
        self.speed.validate()
        for variant in self.variants:
            self._check_variant(variant)

    def _check_variant(self, variant: str) -> None:
        config = dit_config(
            variant, sample_size=self.image_size, in_channels=self.channels, num_classes=_ESTIMATE_CLASSES
        )
        with torch.device("meta"):  # runs the model's own validation without allocating weights
            DiTOptimumTransformer2DModel(**config)
        guided = 2 if self.quality.guidance_scale > 1 else 1
        check_activation_memory(config, self.speed.batch_size * guided, "speed_batch_size")
        check_activation_memory(config, self.speed.forward_batch_size, "speed.forward_batch_size")
        if not self.speed_only:
            check_activation_memory(config, self.quality.batch_size * guided, "batch_size")
            if variant not in self.pretrained:
                self.training.train_config("-", variant, self.data, self.image_size, self.channels).validate()
                check_activation_memory(config, self.training.batch_size, "train_batch_size", training=True)

    def comparable(self) -> dict[str, Any]:
        """The settings that must match for results of two runs to share one table, as stored in JSON."""
        settings = {
            "data": self.data,
            "image_size": self.image_size,
            "channels": self.channels,
            "pretrained": dict(self.pretrained),
            "training": asdict(self.training),
            "quality": {k: v for k, v in asdict(self.quality).items() if k not in ("use_cache", "batch_size")},
            "speed": asdict(self.speed),
            "speed_only": self.speed_only,
        }
        return json.loads(json.dumps(settings, default=str))


def settings_from_results(stored: Mapping[str, Any], output_dir: str) -> BenchmarkSettings:
    """The settings a results file recorded (``comparable()``), to rebuild its cells from ``output_dir``'s models."""
    try:
        quality = dict(stored["quality"])
        if quality.get("metrics") is not None:
            quality["metrics"] = tuple(quality["metrics"])
        return BenchmarkSettings(
            output_dir=output_dir,
            data=stored["data"],
            image_size=stored["image_size"],
            channels=stored["channels"],
            pretrained=dict(stored.get("pretrained") or {}),
            training=TrainingRecipe(**stored["training"]),
            quality=QualitySettings(**quality),
            speed=SpeedSettings(**stored["speed"]),
            speed_only=bool(stored.get("speed_only", False)),
        )
    except (KeyError, TypeError) as error:
        raise DiTOptimumError(
            f"The results file in {output_dir!r} records settings this version cannot read ({error})."
        ) from None


def preset_settings(name: str, **overrides: Any) -> BenchmarkSettings:
    """``default``: the embedded CPU run (DiT-XS/4 on digits, small N); ``paper``: DiT-S/2, S/4, XS/2, XS/4 on
    256 px latents with every registered technique, 50K samples and 250 steps as in DiT, for user-supplied data
    (``extract_features.py`` latents) and GPUs."""
    if name not in PRESETS:
        raise DiTOptimumError(f"Unknown `preset`={name!r}; allowed values: {', '.join(PRESETS)}.")
    if name == "default":
        settings = BenchmarkSettings()
    else:
        settings = BenchmarkSettings(
            variants=PAPER_PRESETS,
            techniques=tuple(TECHNIQUES),
            image_size=32,  # latents of 256 px images (fast-DiT's precomputed features); --data gives them
            channels=4,
            training=TrainingRecipe(  # fast-DiT's ImageNet recipe
                steps=400_000,
                batch_size=256,
                learning_rate=1e-4,
                warmup_steps=0,
                ema_decay=0.9999,
                checkpoint_every=10_000,
                mixed_precision="no",
            ),
            quality=QualitySettings(
                num_samples=50_000,
                reference_samples=50_000,
                num_inference_steps=250,
                batch_size=125,
                metrics=("fid", "sfid", "kid"),
            ),
            speed=SpeedSettings(batch_size=64, forward_batch_size=256, num_inference_steps=250),
        )
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise DiTOptimumError(f"Unknown benchmark setting {key!r}.")
        setattr(settings, key, value)
    return settings


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dit-optimum benchmark`` options; ``settings_from_arguments`` turns them into settings."""
    parser.add_argument(
        "--preset", default="default", help="default | paper (DiT-S/2, S/4, XS/2, XS/4, every technique)"
    )
    parser.add_argument(
        "--variants", type=csv_list, help=f"comma-separated presets; allowed: {', '.join(preset_names())}"
    )
    parser.add_argument("--techniques", type=csv_list, help="comma-separated registered techniques (see --list)")
    parser.add_argument("--list", action="store_true", help="list the registered techniques and exit")
    parser.add_argument("--data", help="training data: digits | imagefolder | latents folder | datasets id")
    parser.add_argument("--image-size", type=int, help="training image side (pixels; ignored for latents)")
    parser.add_argument("--channels", type=int, help="1 or 3 for pixel data")
    parser.add_argument(
        "--pretrained", type=csv_list, default=[], help="VARIANT=PIPELINE,...: trained baselines to load instead"
    )
    parser.add_argument("--train-steps", type=int)
    parser.add_argument("--train-batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--recovery-steps", type=int, help="fine-tuning steps of the prune-*-recover techniques")
    add_quality_arguments(parser)
    parser.add_argument("--speed-batch-size", type=int, help="batch of the sampling-throughput and memory measurement")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="cost columns only, on untrained models (no data, training or FID); --channels 4 = latents + SD-VAE",
    )
    parser.add_argument("--output-dir", default="benchmark-results")


def _pretrained_pipelines(entries: list[str]) -> dict[str, str]:
    pretrained = {}
    for entry in entries:
        variant, separator, path = entry.partition("=")
        if not separator or not path:
            raise DiTOptimumError(f"`--pretrained` entry {entry!r} must be VARIANT=PIPELINE, e.g. DiT-S/2=./dit-s2.")
        pretrained[variant] = path
    return pretrained


def settings_from_arguments(args: argparse.Namespace) -> BenchmarkSettings:
    """Settings of the preset, changed by the options given (``None`` = not given; an empty list is an error)."""
    settings = preset_settings(args.preset, output_dir=str(args.output_dir))
    for option, value in (("--variants", args.variants), ("--techniques", args.techniques)):
        if value is not None and not value:
            raise DiTOptimumError(f"`{option}` names no entry; give a comma-separated list (see --list).")
    matrix = {
        "variants": tuple(args.variants) if args.variants is not None else None,
        "techniques": tuple(args.techniques) if args.techniques is not None else None,
        "data": args.data,
        "image_size": args.image_size,
        "channels": args.channels,
        "pretrained": _pretrained_pipelines(args.pretrained) or None,
        "speed_only": args.speed_only or None,
    }
    settings = replace(settings, **{key: value for key, value in matrix.items() if value is not None})
    training = {
        "steps": args.train_steps,
        "batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "recovery_steps": args.recovery_steps,
    }
    settings.training = replace(settings.training, **{k: v for k, v in training.items() if v is not None})
    settings.quality = quality_settings_from_arguments(args, settings.quality)
    speed = {
        "batch_size": args.speed_batch_size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    settings.speed = replace(settings.speed, **{k: v for k, v in speed.items() if v is not None})
    if args.preset == "paper" and settings.data == "digits" and not settings.speed_only:
        raise DiTOptimumError(
            "`--preset paper` needs `--data` (a latents folder, an imagefolder or a datasets id) and "
            "`--reference` (real images) of the dataset to reproduce, e.g. ImageNet 256."
        )
    settings.validate()
    if not settings.speed_only:  # impossible metric / N combinations fail before the first cell
        resolve_metrics(settings.quality)
    return settings
