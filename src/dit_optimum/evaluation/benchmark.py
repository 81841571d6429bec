"""The multi-method benchmark (the main job): model variants x techniques, each cell = train or load, optimize,
evaluate (FID/sFID/KID, GFLOPs, throughput, latency, peak memory, size), resumable.

Every technique comes from the registry (``techniques.registry``); the runner never special-cases one. After each
cell the whole results file is rewritten atomically, so a killed run loses at most the cell in progress, and a
rerun skips the finished cells. Training runs inside a cell checkpoint and resume on their own.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers import AutoencoderKL, DDIMScheduler
from PIL import Image

from ..configs import PAPER_PRESETS, dit_config, parse_preset_name
from ..errors import DiTOptimumError
from ..models.transformer import DiTOptimumTransformer2DModel
from ..pipelines.dit import DiTOptimumPipeline
from ..techniques.registry import TECHNIQUES, get_technique
from ..training.trainer import TrainConfig, final_loss, train
from ..utils import atomic_file
from .efficiency import SpeedSettings, efficiency_metrics
from .features import FeatureExtractor
from .fid import QualitySettings, default_feature_extractor, evaluate_quality, resolve_metrics
from .records import hardware_description, write_csv_atomic, write_json_atomic

RESULTS_FILE = "results.json"
DEFAULT_VARIANTS: tuple[str, ...] = ("DiT-XS/4",)
DEFAULT_TECHNIQUES: tuple[str, ...] = (
    "baseline",
    "attention-gqa",
    "attention-mqa",
    "attention-shallow",
    "attention-mediated",
    "attention-focused",
    "moe",
    "distill",
    "bf16",
    "int8",
    "int8-dynamic",
    "quanto-int8",
    "prune-heads-50",
    "prune-mlp-50",
    "prune-depth-50",
)
PRESETS: tuple[str, ...] = ("default", "paper")


@dataclass
class TrainingRecipe:
    """How the baseline and every trained technique of a variant are trained (identically, for fairness)."""

    steps: int = 250
    batch_size: int = 32
    learning_rate: float = 1e-3
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    mixed_precision: str = "no"
    seed: int = 0


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
    # small N and few steps: the embedded default fits about 15 minutes on 2 CPU cores
    quality: QualitySettings = field(
        default_factory=lambda: QualitySettings(num_samples=150, reference_samples=500, num_inference_steps=20)
    )
    speed: SpeedSettings = field(
        default_factory=lambda: SpeedSettings(batch_size=16, forward_batch_size=64, num_inference_steps=20)
    )
    grid_size: int = 20
    speed_only: bool = False

    def validate(self) -> None:
        for variant in self.variants:
            parse_preset_name(variant)
        unknown = [name for name in self.techniques if name not in TECHNIQUES]
        if unknown:
            raise DiTOptimumError(f"Unknown `techniques` {unknown}; allowed values: {', '.join(TECHNIQUES)}.")
        if not self.variants or not self.techniques:
            raise DiTOptimumError("`variants` and `techniques` must each name at least one entry.")
        extra = [variant for variant in self.pretrained if variant not in self.variants]
        if extra:
            raise DiTOptimumError(
                f"`pretrained` names variants {extra} that are not in `variants` {list(self.variants)}."
            )
        self.quality.validate()
        self.speed.validate()

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
            training=TrainingRecipe(
                steps=400_000, batch_size=256, learning_rate=1e-4, ema_decay=0.9999, checkpoint_every=10_000
            ),
            quality=QualitySettings(
                num_samples=50_000, reference_samples=50_000, num_inference_steps=250, batch_size=125
            ),
            speed=SpeedSettings(batch_size=64, forward_batch_size=256, num_inference_steps=250),
        )
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise DiTOptimumError(f"Unknown benchmark setting {key!r}.")
        setattr(settings, key, value)
    return settings


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


class VariantContext:
    """The ``TechniqueContext`` of one model variant: its baseline, and training under the benchmark's recipe.

    Trained models live in ``<output_dir>/models/<variant>/<name>/pipeline``; a finished one is loaded, an
    interrupted one resumes from its last checkpoint.
    """

    def __init__(
        self,
        settings: BenchmarkSettings,
        variant: str,
        trainer: Callable[[TrainConfig], Path] = train,
        device: torch.device | str = "cpu",
    ):
        self.settings = settings
        self.variant = variant
        self.device = torch.device(device)
        self.root = Path(settings.output_dir) / "models" / _slug(variant)
        self.trainer = trainer
        self.trained: dict[str, dict[str, Any]] = {}

    def baseline_path(self) -> str:
        if self.variant in self.settings.pretrained:
            return self.settings.pretrained[self.variant]
        return str(self._train("baseline", {}, distill=False))

    def baseline(self) -> DiTOptimumPipeline:
        return DiTOptimumPipeline.from_pretrained(self.baseline_path()).to(self.device)

    def baseline_config(self) -> Mapping[str, Any]:
        return DiTOptimumTransformer2DModel.load_config(self.baseline_path(), subfolder="transformer")

    def train(
        self, name: str, model_overrides: Mapping[str, Any] | None = None, *, distill: bool = False, **options: Any
    ) -> DiTOptimumPipeline:
        pipeline = DiTOptimumPipeline.from_pretrained(self._train(name, model_overrides or {}, distill, **options))
        return pipeline.to(self.device)

    def _train(self, name: str, model_overrides: Mapping[str, Any], distill: bool, **options: Any) -> Path:
        folder = self.root / _slug(name)
        pipeline = folder / "pipeline"
        if not (pipeline / "model_index.json").is_file():
            recipe = self.settings.training
            config = TrainConfig(
                output_dir=str(folder),
                model=self.variant,
                model_overrides=dict(model_overrides),
                data=self.settings.data,
                image_size=self.settings.image_size,
                channels=self.settings.channels,
                steps=recipe.steps,
                batch_size=recipe.batch_size,
                learning_rate=recipe.learning_rate,
                ema_decay=recipe.ema_decay,
                checkpoint_every=recipe.checkpoint_every,
                mixed_precision=recipe.mixed_precision,
                seed=recipe.seed,
                resume=True,
                log_every=max(1, min(50, recipe.steps // 10)),
                teacher=self.baseline_path() if distill else None,
                **options,
            )
            start = time.perf_counter()
            pipeline = self.trainer(config)
            self.trained[name] = {"train_wall_s": time.perf_counter() - start}
        record = self.trained.setdefault(name, {})
        record.update(train_steps=self.settings.training.steps)
        if (folder / "train_log.csv").is_file():
            record["train_final_loss"] = final_loss(folder)
        return pipeline


def sd_vae_architecture() -> AutoencoderKL:
    """An autoencoder shaped like Stable Diffusion's VAE (what DiT decodes with), randomly initialised: its decode
    cost is real, and nothing is downloaded."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=0.18215,
    )


class UntrainedContext:
    """The ``TechniqueContext`` of a cost-only run: every model is built untrained from the variant's config.

    GFLOPs, size, speed and memory do not depend on the weights (MoE routing aside), so they can be measured on any
    hardware without data or training.
    """

    def __init__(
        self, settings: BenchmarkSettings, variant: str, num_classes: int = 1000, device: torch.device | str = "cpu"
    ):
        self.settings = settings
        self.variant = variant
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.trained: dict[str, dict[str, Any]] = {}
        self.vae = sd_vae_architecture() if settings.channels == 4 else None

    def _pipeline(self, model_overrides: Mapping[str, Any]) -> DiTOptimumPipeline:
        torch.manual_seed(self.settings.training.seed)
        config = dit_config(
            self.variant,
            sample_size=self.settings.image_size,
            in_channels=self.settings.channels,
            num_classes=self.num_classes,
            **model_overrides,
        )
        return DiTOptimumPipeline(
            transformer=DiTOptimumTransformer2DModel(**config).eval(), vae=self.vae, scheduler=DDIMScheduler()
        ).to(self.device)

    def baseline(self) -> DiTOptimumPipeline:
        return self._pipeline({})

    def baseline_config(self) -> Mapping[str, Any]:
        return self.baseline().transformer.config

    def train(
        self, name: str, model_overrides: Mapping[str, Any] | None = None, *, distill: bool = False, **options: Any
    ) -> DiTOptimumPipeline:
        return self._pipeline(model_overrides or {})


def load_results(output_dir: str | Path) -> dict[str, Any]:
    """The results file of an output folder (empty if there is none yet)."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        return {"rows": []}
    return json.loads(path.read_text())


def _check_comparable(previous: Mapping[str, Any], settings: BenchmarkSettings) -> None:
    stored = previous.get("settings")
    current = settings.comparable()
    if stored is not None and stored != current:
        differing = sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))
        raise DiTOptimumError(
            f"`output_dir`={settings.output_dir!r} holds results measured with other settings ({', '.join(differing)}"
            "): choose another output folder, or delete its results.json to start over."
        )


def save_sample_grid(images: np.ndarray, path: Path, columns: int = 10, min_side: int = 64) -> None:
    """uint8 images (B, H, W, C) as one PNG grid (nearest-upscaled so tiny images stay visible), written atomically."""
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    scale = max(1, -(-min_side // height))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    with atomic_file(path) as temporary:
        picture.save(temporary, format="PNG")


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: json.dumps(value) if isinstance(value, (dict, list)) else value for key, value in row.items()}


def run_benchmark(
    settings: BenchmarkSettings,
    extractor: FeatureExtractor | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    trainer: Callable[[TrainConfig], Path] = train,
) -> list[dict[str, Any]]:
    """Run every unfinished cell of the matrix and return all rows (finished earlier ones included).

    ``extractor`` replaces the Inception network (tests inject a tiny one); ``on_cell`` is called with each new row.
    """
    settings.validate()
    output_dir = Path(settings.output_dir)
    state = PartialState(cpu=not torch.cuda.is_available())
    previous = load_results(output_dir)
    _check_comparable(previous, settings)
    records = {(row["variant"], row["technique"]): row for row in previous["rows"]}
    hardware = hardware_description()
    if not settings.speed_only:
        extractor = extractor or default_feature_extractor(settings.quality, state.device)
        resolve_metrics(settings.quality, extractor.feature_dims)  # an impossible metric fails now, not in every cell
    for variant in settings.variants:
        if settings.speed_only:
            context = UntrainedContext(settings, variant, device=state.device)
        else:
            context = VariantContext(settings, variant, trainer, device=state.device)
        for name in settings.techniques:
            if records.get((variant, name), {}).get("status") == "ok":
                continue
            row = _run_cell(settings, context, name, extractor, state)
            row.update(device=str(state.device), hardware=hardware)
            state.wait_for_everyone()
            if state.is_main_process:
                records[(variant, name)] = row
                _write_results(output_dir, settings, list(records.values()))
                if on_cell is not None:
                    on_cell(row)
    return list(records.values())


def _run_cell(
    settings: BenchmarkSettings,
    context: VariantContext | UntrainedContext,
    name: str,
    extractor: FeatureExtractor | None,
    state: PartialState,
) -> dict[str, Any]:
    """Build one technique's pipeline and measure it; a failure is recorded in the row (and retried next run)."""
    technique = get_technique(name)
    start = time.perf_counter()
    row: dict[str, Any] = {"variant": context.variant, "technique": name, "description": technique.description}
    try:
        pipeline = technique.build(context).to(state.device)
        pipeline.set_progress_bar_config(disable=True)
        row["build_wall_s"] = time.perf_counter() - start  # training included, when the cell trains
        images = None
        if not settings.speed_only:
            phase = time.perf_counter()
            quality, images = evaluate_quality(
                pipeline, settings.quality, extractor, keep_images=settings.grid_size, state=state
            )
            row.update(quality, quality_wall_s=time.perf_counter() - phase)
        if state.is_main_process:
            phase = time.perf_counter()
            # the baseline is re-timed in every cell, interleaved with it: paired ratios survive a noisy machine
            reference = context.baseline()
            reference.set_progress_bar_config(disable=True)
            row.update(
                efficiency_metrics(pipeline, settings.speed, reference), speed_wall_s=time.perf_counter() - phase
            )
            row.update(context.trained.get(name, {}))
            if images is not None:
                grid = Path(settings.output_dir) / "samples" / f"{_slug(context.variant)}__{_slug(name)}.png"
                save_sample_grid(images, grid)
                row["sample_grid"] = str(grid.relative_to(settings.output_dir))
        row["status"] = "ok"
    except Exception as error:  # one broken cell must not end a long matrix: record it, go on, retry next run
        row.update(status="failed", error=f"{type(error).__name__}: {error}")
    row["cell_wall_s"] = time.perf_counter() - start
    return row


def _write_results(output_dir: Path, settings: BenchmarkSettings, rows: Sequence[dict[str, Any]]) -> None:
    payload = {"settings": settings.comparable(), "rows": list(rows)}
    write_json_atomic(output_dir / RESULTS_FILE, payload)
    write_csv_atomic(output_dir / "results.csv", [_flat(row) for row in rows])
