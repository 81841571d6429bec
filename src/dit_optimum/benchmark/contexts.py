"""Technique contexts: what a technique may ask for while one cell is built. ``VariantContext`` trains (or loads)
the variant's models under the benchmark's recipe; ``UntrainedContext`` builds untrained models for cost-only runs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from ..configs import dit_config
from ..errors import DiTOptimumError
from ..models.transformer import DiTOptimumTransformer2DModel
from ..pipelines.dit import DiTOptimumPipeline
from ..techniques.registry import get_technique
from ..training.config import STUDENT_PREDICTION, TrainConfig
from ..training.step_distillation import record_student_defaults, student_scheduler
from ..training.trainer import final_loss, train
from .settings import BenchmarkSettings


def slug(text: str) -> str:
    """``text`` as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


# What makes a model the variant it is reported as: its width, depth and patch.
_ARCHITECTURE_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size")


def check_pretrained_matches(pipeline: DiTOptimumPipeline, variant: str, settings: BenchmarkSettings) -> None:
    """A ``--pretrained`` baseline must be the preset it is reported under and draw images of the run's size (its
    class count may differ); otherwise its row would carry another model's numbers under the preset's name."""
    config = pipeline.transformer.config
    expected = dit_config(variant)
    differing = [key for key in _ARCHITECTURE_KEYS if config.get(key) != expected.get(key)]
    scale = 1 if pipeline.is_pixel_space else 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    if config.get("sample_size") * scale != settings.image_size:
        differing.append(f"image size {config.get('sample_size') * scale} (expected {settings.image_size})")
    if differing:
        found = ", ".join(
            key if key.startswith("image") else f"{key}={config.get(key)!r} (expected {expected.get(key)!r})"
            for key in differing
        )
        raise DiTOptimumError(
            f"`pretrained` for {variant} is not a {variant} at image size {settings.image_size}: {found}. Give a "
            "pipeline of that preset, or name the variant it is."
        )


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
        self.root = Path(settings.output_dir) / "models" / slug(variant)
        self.trainer = trainer
        self.trained: dict[str, dict[str, Any]] = {}

    def baseline_path(self) -> str:
        if self.variant in self.settings.pretrained:
            return self.settings.pretrained[self.variant]
        return str(self._train("baseline", {}, distill=False))

    def baseline(self) -> DiTOptimumPipeline:
        pipeline = DiTOptimumPipeline.from_pretrained(self.baseline_path())
        if self.variant in self.settings.pretrained:
            check_pretrained_matches(pipeline, self.variant, self.settings)
        return pipeline.to(self.device)

    def baseline_config(self) -> Mapping[str, Any]:
        return DiTOptimumTransformer2DModel.load_config(self.baseline_path(), subfolder="transformer")

    def train(
        self, name: str, model_overrides: Mapping[str, Any] | None = None, *, distill: bool = False, **options: Any
    ) -> DiTOptimumPipeline:
        pipeline = DiTOptimumPipeline.from_pretrained(self._train(name, model_overrides or {}, distill, **options))
        return pipeline.to(self.device)

    def finetune(self, name: str, pipeline: DiTOptimumPipeline, *, distill: bool = True) -> DiTOptimumPipeline:
        start = self.root / f"{slug(name)}-start"
        if not (start / "model_index.json").is_file():  # the model to fine-tune, saved once (deterministic)
            pipeline.save_pretrained(start, overwrite=True)
        steps = self.settings.training.recovery_steps
        trained = self._train(name, {}, distill, pretrained=str(start), steps=steps)
        return DiTOptimumPipeline.from_pretrained(trained).to(self.device)

    def trained_path(self, name: str) -> str:
        if name == "baseline":
            return self.baseline_path()
        technique = get_technique(name)
        folder = self.root / slug(technique.options.get("run_name", name)) / "pipeline"
        if not (folder / "model_index.json").is_file():
            technique.build(self)  # trains it (once: later builds load it)
        if not (folder / "model_index.json").is_file():
            raise DiTOptimumError(
                f"Technique {name!r} saves no trained pipeline of its own to train from: name the baseline or a "
                "training technique (trains=True, with a `run_name`)."
            )
        return str(folder)

    def _train(self, name: str, model_overrides: Mapping[str, Any], distill: bool, **options: Any) -> Path:
        folder = self.root / slug(name)
        pipeline = folder / "pipeline"
        if not (pipeline / "model_index.json").is_file():
            settings = self.settings
            config = settings.training.train_config(
                str(folder),
                self.variant,
                settings.data,
                settings.image_size,
                settings.channels,
                model_overrides=dict(model_overrides),
                teacher=self.baseline_path() if distill else None,
                **options,
            )
            start = time.perf_counter()
            pipeline = self.trainer(config)
            self.trained[name] = {"train_wall_s": time.perf_counter() - start}
        record = self.trained.setdefault(name, {})
        record.update(train_steps=options.get("steps", self.settings.training.steps))
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
            transformer=DiTOptimumTransformer2DModel(**config).eval(),
            vae=self.vae,
            scheduler=DDIMScheduler(),
        ).to(self.device)

    def baseline(self) -> DiTOptimumPipeline:
        return self._pipeline({})

    def baseline_config(self) -> Mapping[str, Any]:
        return self.baseline().transformer.config

    def train(
        self, name: str, model_overrides: Mapping[str, Any] | None = None, *, distill: bool = False, **options: Any
    ) -> DiTOptimumPipeline:
        steps = options.get("student_steps")
        if steps is None:
            return self._pipeline(model_overrides or {})
        # a step-distilled student: its teacher's network (a pruned one stays pruned) with its own grid, steps and
        # no guidance make its cost columns
        prediction = options.get("student_prediction", STUDENT_PREDICTION)
        teacher = options.get("pretrained", "baseline")
        pipeline = self.baseline() if teacher == "baseline" else get_technique(teacher).build(self)
        pipeline.scheduler = student_scheduler(DDIMScheduler().config, prediction)
        return record_student_defaults(pipeline, steps)

    def trained_path(self, name: str) -> str:
        return name  # nothing is trained here: the technique's name, which `train` builds untrained as `pretrained`

    def finetune(self, name: str, pipeline: DiTOptimumPipeline, *, distill: bool = True) -> DiTOptimumPipeline:
        return pipeline  # cost columns do not depend on the weights
