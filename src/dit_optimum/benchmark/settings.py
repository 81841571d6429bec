"""What a benchmark run measures: the matrix, the training recipe, quality and speed settings, the presets, and
how the command line assembles them. Everything is checked here, before the first cell starts."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..configs import PAPER_PRESETS, PATCH_SIZES, dit_config, parse_preset_name, preset_names
from ..data import list_image_files, source_kind
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
# The main job's cells, chosen to finish within 15 minutes on 2 CPU cores of either machine kind (BENCHMARKS.md):
# the baseline, the cheapest of the study's simplified attention types (shallow), post-training quantization and
# pruning, pruning with recovery, step caches, fewer sampling steps (a solver, progressive step distillation),
# combined recipes, and the optimizer's choice (`optimized`: a search over the registry's stacks, reusing these
# cells). `--preset study` adds the study's other trained families (mediated and focused multi-query attention, MoE,
# knowledge distillation); any registered technique is one `--techniques` away.
DEFAULT_TECHNIQUES: tuple[str, ...] = (
    "baseline",
    "attention-shallow",
    "bf16",
    "int8",
    "openvino",
    "openvino-int8",
    "onnxruntime",
    "prune-heads-50",
    "prune-mlp-50",
    "prune-depth-50",
    "prune-heads-50-recover",
    "prune-depth-50-recover",
    "cache-first-block-0.5",
    "cache-taylorseer",
    "solver-dpmpp-2m-5",
    "solver-unipc-5",
    "distill-steps-4",
    "distill-steps-2",
    "int8+cache-taylorseer",
    "prune-depth-50-recover+int8+cache-taylorseer",
    "distill-steps-2+fastest",
    "prune-depth-50-recover+distill-steps-4+int8",
    "prune-depth-50-recover+distill-steps-2+int8",
    "prune-depth-50-recover+distill-steps-2+fastest",
    "optimized",
)
# The study's trained families and the slower precisions that the main job leaves out for time; `--preset study`
# runs them after the default cells.
STUDY_TECHNIQUES: tuple[str, ...] = (
    "attention-mediated",
    "attention-focused_mqa",
    "moe",
    "distill",
    "int8-dynamic",
    "quanto-int8",
    "openvino-f32",
    "onnxruntime-int8",
)
PRESETS: tuple[str, ...] = ("default", "study", "paper")
# Class count assumed when checking memory before the data is loaded (only the embedding table depends on it).
_ESTIMATE_CLASSES = 1000
# The data the default recipe was tuned on: the embedded digits (1,797 images), 16x16 with patch 4 = 16 tokens of
# 16 values (4 x 4 pixels, 1 channel).
RECIPE_IMAGES = 1797
RECIPE_TOKENS = 16
RECIPE_TOKEN_VALUES = 16
# What the recipe's new networks predict for tokens of more values than the tuned ones: DiT's noise prediction fails
# there (the 32x32 upscaled digits, 64 values per token: 32% class accuracy against 95% with v at the same 1,600 steps;
# BENCHMARKS.md), while at 16 values it keeps the better FD_domain.
LARGE_TOKEN_PREDICTION = "v_prediction"
# A scaled recipe trains at most this many times the default's compute (steps x tokens per image, the batch kept):
# its baseline then takes about 4-5 minutes on 2 CPU cores, the most the main job's 15 minutes leave it.
RECIPE_MAX_COMPUTE = 3.0


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
    # what a network trained from scratch predicts (fine-tunes and distilled students keep their source's)
    prediction_type: str = "epsilon"
    # fine-tuning steps of the recovery techniques (a pruned baseline distilled from the unpruned one)
    recovery_steps: int = 400

    def train_config(self, output_dir: str, variant: str, data: str, image_size: int, channels: int, **extra: Any):
        """The trainer's config for one run of this recipe (resumable, logging about ten times); ``extra`` adds or
        replaces trainer settings (a fine-tune's ``pretrained`` and ``steps``)."""
        recipe = {name: value for name, value in asdict(self).items() if name != "recovery_steps"}
        if extra.get("pretrained") or extra.get("teacher"):  # continues or matches its source's outputs
            recipe.pop("prediction_type")
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

    def scaled(self, num_images: int, image_size: int, patch_size: int) -> TrainingRecipe:
        """This recipe scaled from the data it was tuned on (``RECIPE_IMAGES`` images of ``RECIPE_TOKENS`` tokens) to
        ``num_images`` images of ``(image_size / patch_size)^2`` tokens: more images want more steps (by the square
        root of the image ratio, never fewer than tuned), and the compute, steps x tokens per image, is capped at
        ``RECIPE_MAX_COMPUTE`` times the tuned one (more tokens make each step dearer). Steps round to hundreds;
        recovery steps and checkpoints follow the steps; batch size and learning rate stay as the sweep chose them.
        The tuned data itself (1,797 images at 16x16, patch 4) gets this recipe unchanged."""
        check_positive_integers(num_images=num_images, image_size=image_size, patch_size=patch_size)
        tokens = max(1, image_size // patch_size) ** 2
        wanted = self.steps * max(1.0, math.sqrt(num_images / RECIPE_IMAGES))
        budget = self.steps * RECIPE_MAX_COMPUTE * RECIPE_TOKENS / tokens
        steps = max(100, round(min(wanted, budget) / 100) * 100)
        if steps == self.steps:
            return replace(self)
        factor = steps / self.steps
        return replace(
            self,
            steps=steps,
            recovery_steps=max(50, round(self.recovery_steps * factor / 50) * 50),
            checkpoint_every=max(1, steps // 4),
        )

    def summary(self) -> str:
        """One line: steps, batch, learning rate, schedule, EMA, precision, prediction, recovery steps."""
        return (
            f"{self.steps} steps, batch {self.batch_size}, lr {self.learning_rate:g} {self.lr_schedule}, "
            f"EMA {self.ema_decay}, {self.mixed_precision}, predicts {self.prediction_type}, "
            f"{self.recovery_steps} recovery steps"
        )


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
    # how the training recipe was chosen (``scale_recipe``), printed by the command line; not a compared setting
    recipe_note: str = field(default="", compare=False)

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
    """``default``: the embedded CPU run (DiT-XS/4 on digits, small N); ``study``: the same with the study's other
    trained families too (``STUDY_TECHNIQUES``); ``paper``: DiT-S/2, S/4, XS/2, XS/4 on 256 px latents with every
    registered technique, 50K samples and 250 steps as in DiT, for user-supplied data (``extract_features.py``
    latents) and GPUs."""
    if name not in PRESETS:
        raise DiTOptimumError(f"Unknown `preset`={name!r}; allowed values: {', '.join(PRESETS)}.")
    if name in ("default", "study"):
        settings = BenchmarkSettings()
        if name == "study":
            settings.techniques = DEFAULT_TECHNIQUES + STUDY_TECHNIQUES
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
        "--preset",
        default="default",
        help="default | study (+ mediated and focused attention, MoE, distillation) | paper (DiT-S/2, S/4, XS/2, "
        "XS/4, every technique)",
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
    parser.add_argument(
        "--prediction-type",
        help="what networks trained from scratch predict: epsilon | v_prediction (default: epsilon, v_prediction for "
        f"tokens of more than {RECIPE_TOKEN_VALUES} values)",
    )
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


def training_images(data: str) -> int | None:
    """How many images ``data`` holds, where that is known without loading it (the digits, an image folder's files);
    None for latents folders and ``datasets`` ids."""
    kind = source_kind(data, "data")
    if kind == "digits":
        return RECIPE_IMAGES
    if kind == "folder":
        return len(list_image_files(Path(data).expanduser()).images)
    return None


def recipe_variant(image_size: int, variant: str = DEFAULT_VARIANTS[0]) -> str:
    """``variant`` with the patch that gives images of ``image_size`` the tokens the recipe was tuned at
    (``RECIPE_TOKENS``: 16x16 with patch 4), or the nearest allowed patch: 32x32 images train DiT-XS/8, as cheap
    per step as the tuned default, instead of DiT-XS/4 at four times the tokens."""
    size, patch = parse_preset_name(variant)
    wanted = image_size / math.isqrt(RECIPE_TOKENS)
    fitting = [allowed for allowed in PATCH_SIZES if image_size % allowed == 0]  # a patch must tile the image
    if fitting:
        patch = min(fitting, key=lambda allowed: (abs(math.log2(allowed / wanted)), allowed))
    return f"DiT-{size}/{patch}"


def choose_recipe_variant(settings: BenchmarkSettings) -> str:
    """Replace the default variant by ``recipe_variant`` for the run's image size (no ``--variants`` given), in
    place; returns what changed, for the command line to print ("" when nothing did). A ``--pretrained`` baseline
    names its variant: then nothing changes."""
    if settings.variants != DEFAULT_VARIANTS or settings.pretrained:
        return ""
    chosen = recipe_variant(settings.image_size)
    if chosen == settings.variants[0]:
        return ""
    settings.variants = (chosen,)
    settings._check_variant(chosen)  # the rest was validated with the default variant
    return f"variant {chosen} for {settings.image_size}x{settings.image_size} images (--variants chooses another)"


def choose_recipe_prediction(settings: BenchmarkSettings) -> str:
    """Set what the recipe's new networks predict from the variants' tokens, in place: v-prediction
    (``LARGE_TOKEN_PREDICTION``) when any variant's tokens hold more values (patch x patch x channels) than the tuned
    data's ``RECIPE_TOKEN_VALUES``; returns what changed, for the command line to print ("" when nothing did)."""
    values = max(parse_preset_name(variant)[1] ** 2 * settings.channels for variant in settings.variants)
    if values <= RECIPE_TOKEN_VALUES or settings.training.prediction_type == LARGE_TOKEN_PREDICTION:
        return ""
    settings.training = replace(settings.training, prediction_type=LARGE_TOKEN_PREDICTION)
    return (
        f"networks trained from scratch predict {LARGE_TOKEN_PREDICTION} (tokens of {values} values; the default "
        f"recipe's noise prediction was tuned on {RECIPE_TOKEN_VALUES})"
    )


def scale_recipe(settings: BenchmarkSettings) -> str:
    """Scale ``settings.training`` (the default recipe) to the data's image count and the variants' tokens per image
    (``TrainingRecipe.scaled``; the variant with the smallest patch, the dearest, sets it), in place; returns how
    the recipe was chosen, for the command line to print."""
    count = training_images(settings.data)
    if count is None:
        return "the default recipe: the image count of this data is known only once loaded"
    if count == 0:
        raise DiTOptimumError(f"`data`={settings.data!r} holds no images (PNG, JPEG, ... in class folders).")
    patch = min(parse_preset_name(variant)[1] for variant in settings.variants)
    tokens = max(1, settings.image_size // patch) ** 2
    scaled = settings.training.scaled(count, settings.image_size, patch)
    if scaled == settings.training:
        return f"the default recipe: {count:,} images of {tokens} tokens, the data it was tuned on or smaller"
    settings.training = scaled
    return (
        f"scaled to {count:,} images of {tokens} tokens (the default, 1,600 steps, was tuned on {RECIPE_IMAGES:,} "
        f"images of {RECIPE_TOKENS}); --train-steps / --train-batch-size / --learning-rate override it"
    )


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
    if settings.speed_only and args.techniques is None:  # a preset's cells that judge quality have no cost-only form
        settings.techniques = tuple(name for name in settings.techniques if not TECHNIQUES[name].needs_quality)
    training = {
        "steps": args.train_steps,
        "batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "recovery_steps": args.recovery_steps,
        "prediction_type": args.prediction_type,
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
    if args.preset in ("default", "study") and not settings.speed_only:
        variant_note = choose_recipe_variant(settings) if args.variants is None else ""
        given = [args.train_steps, args.train_batch_size, args.learning_rate]
        recipe_note = "as given on the command line" if any(v is not None for v in given) else scale_recipe(settings)
        prediction_note = choose_recipe_prediction(settings) if args.prediction_type is None else ""
        settings.recipe_note = "; ".join(note for note in (recipe_note, prediction_note, variant_note) if note)
        if args.recovery_steps is not None:  # an explicit option wins over the scaling
            settings.training = replace(settings.training, recovery_steps=args.recovery_steps)
    if not settings.speed_only:  # impossible metric / N combinations fail before the first cell
        resolve_metrics(settings.quality)
    return settings
