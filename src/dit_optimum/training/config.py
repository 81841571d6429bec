"""What a training run can set (``TrainConfig``, fast-DiT defaults) and the checks every setting passes before
anything is read or written."""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from accelerate.utils import is_tensorboard_available

from ..configs import dit_config, parse_preset_name
from ..errors import DiTOptimumError
from ..files import path_overlap
from ..models.resources import check_resources
from ..models.transformer import DiTOptimumTransformer2DModel
from ..utils import check_number, check_positive_integers, is_integer
from .diffusion import PREDICTION_TYPES

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
# What a fine-tune of a `pretrained` pipeline trains: every weight, LoRA adapters, or biases (and affine norms) only.
FINETUNE_MODES = ("full", "lora", "bias_norm")
# What a step-distilled student predicts by default (its saved DDIM scheduler's `prediction_type`): v is well
# conditioned at the first step, where noise prediction divides by a tiny alpha.
STUDENT_PREDICTION = "v_prediction"
# The trainer's noise schedule length (GaussianDiffusion): a step-distillation grid halves it evenly.
TRAIN_TIMESTEPS = 1000
# Model config keys the trainer sets from the data, with the option that sets them.
DERIVED_MODEL_KEYS = {
    "sample_size": "--image-size (the side of the data)",
    "in_channels": "--channels (the channels of the data)",
    "out_channels": "the data's channels (twice: DiT learns the variance)",
    "num_embeds_ada_norm": "the data's classes",
}
MODEL_KEYS = tuple(inspect.signature(DiTOptimumTransformer2DModel.__init__).parameters)[1:]
MAX_SEED = 2**32 - 1  # numpy's seeding limit (accelerate's set_seed seeds numpy too)
# AdamW moves each weight by about the learning rate per step: above 1 a run can only diverge.
MAX_LEARNING_RATE = 1.0


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    modes: tuple[str, ...] | None = None,
    required: bool = False,
    cli_default: Any = None,
) -> Any:
    """A ``TrainConfig`` field and its command-line option, declared once: ``default`` (a callable: a factory),
    ``help``, the ``flag`` (default ``--field-name``; ``--no-...`` inverts a boolean), the script ``modes`` that offer
    it (None: all), whether those scripts require it, and a script default other than the field's."""
    metadata = {"help": help, "flag": flag, "modes": modes, "required": required, "cli_default": cli_default}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def _json_default(value: Any) -> Any:
    # Paths and NumPy numbers, as JSON; anything else is not a setting.
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults follow fast-DiT: AdamW 1e-4, no weight decay, EMA 0.9999, label dropout 0.1.

    ``ema_warmup`` (on by default, unlike fast-DiT) ramps the EMA decay up so that short runs sample well;
    ``warmup_steps`` ramps the learning rate linearly from 0; ``lr_schedule="cosine"`` then decays it to 0 at
    ``steps`` (the small-data recipe uses it; a resume may then not change ``steps``); ``compile`` runs the
    model's forward through ``torch.compile``. ``mixed_precision="bf16"`` trains with bf16 autocast (on CPU with
    the math attention kernel, faster than the fused one at the short sequences of small images).
    """

    output_dir: str = option(None, "where checkpoints, logs and the pipeline go", required=True)
    model: str = option("DiT-XS/2", "preset, e.g. DiT-S/2 (a fine-tune takes its base's)")
    model_overrides: dict[str, Any] = option(
        dict, 'JSON object of model config keys, e.g. {"num_layers": 2}', flag="--model-config"
    )
    prediction_type: str | None = option(
        None,
        f"what the network learns to predict: {' | '.join(PREDICTION_TYPES)} (saved as its scheduler's); default: "
        "the pretrained or teacher model's, else epsilon (DiT's)",
        modes=("base", "moe", "distill", "lora"),
    )
    data: str = option("digits", "digits | imagefolder dir | latents dir | datasets id")
    image_size: int = option(16, "training image side (pixels; ignored for latents)")
    channels: int = option(1, "1 or 3 for pixel data, 4 for latents")
    skip_corrupt: bool = option(False, "skip unreadable images (counted) instead of failing")
    max_samples: int | None = option(None, "train on the first N samples only")
    steps: int = option(1000, "optimizer steps")
    batch_size: int = option(32, "global batch, split across processes")
    learning_rate: float = option(1e-4, "AdamW learning rate", flag="--lr")
    warmup_steps: int = option(0, "linear learning-rate warm-up from 0")
    lr_schedule: str = option("constant", "constant | cosine (decays to 0 at --steps)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    ema_decay: float = option(0.9999, "decay of the EMA the pipeline is saved from")
    ema_warmup: bool = option(True, "constant EMA decay from step 0 (as fast-DiT)", flag="--no-ema-warmup")
    max_grad_norm: float | None = option(None, "clip the gradient norm (none: no clipping)")
    mixed_precision: str = option("no", "no | bf16 | fp16 autocast")
    gradient_checkpointing: bool = option(False, "recompute block activations in the backward pass")
    compile: bool = option(False, "run the model's forward through torch.compile")
    checkpoint_every: int = option(500, "steps between checkpoints")
    keep_checkpoints: int = option(2, "checkpoints kept")
    resume: bool = option(False, "continue from the last checkpoint in --output-dir")
    log_every: int = option(10, "steps between log rows")
    seed: int = option(0, "seed of initialisation, data order, noise and label drops")
    tensorboard: bool = option(False, "also log to TensorBoard")
    teacher: str | None = option(None, "teacher pipeline folder", modes=("distill",), required=True)
    alpha: float = option(0.5, "weight of the diffusion loss (1 - alpha: teacher)", modes=("distill",))
    feature_blocks: list[int] = option(list, "student blocks for the feature loss, e.g. 0,3", modes=("distill",))
    feature_weight: float = option(1.0, "weight of the feature loss", modes=("distill",))
    pretrained: str | None = option(
        None, "the pipeline to adapt, or to step-distill (folder or Hub id)", modes=("lora", "steps"), required=True
    )
    finetune: str = option("full", "what trains: full | lora | bias_norm", modes=("lora",), cli_default="lora")
    lora_rank: int = option(8, "LoRA rank", modes=("lora",))
    lora_alpha: float | None = option(None, "LoRA scale alpha / rank (default: rank)", modes=("lora",))
    lora_targets: list[str] = option(lambda: ["attention"], "comma-separated: attention, mlp, adaln", modes=("lora",))
    student_steps: int | None = option(
        None,
        "step distillation: the student's DDIM steps; the `pretrained` teacher takes twice as many",
        modes=("steps",),
        required=True,
    )
    teacher_guidance_scale: float = option(
        1.0, "guidance of the teacher's steps, learned by the unguided student (1: none)", modes=("steps",)
    )
    student_prediction: str = option(
        STUDENT_PREDICTION, f"what the student predicts: {' | '.join(PREDICTION_TYPES)}", modes=("steps",)
    )

    def validate(self) -> None:
        """Refuse any setting that cannot work, naming it and what is allowed; ``train`` calls this before anything
        else (model config values are checked when the model is built)."""
        self._validate_names()
        self._validate_integers()
        self._validate_numbers()
        self._validate_model()
        self._validate_distillation()
        self._validate_finetune()
        self._validate_step_distillation()
        self._validate_resources()

    def _validate_names(self) -> None:
        names = ("output_dir", "data") if self.teacher is None else ("output_dir", "data", "teacher")
        for name in names:
            value = getattr(self, name)
            if not (isinstance(value, (str, os.PathLike)) and str(value)):
                raise DiTOptimumError(f"`{name}`={value!r} must be a non-empty path or name.")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise DiTOptimumError(f"`output_dir`={str(self.output_dir)!r} is a file: choose a folder.")
        for name in ("pretrained", "teacher"):  # a run writes checkpoints and a pipeline: never into its source
            source = getattr(self, name)
            if isinstance(source, (str, os.PathLike)) and path_overlap(self.output_dir, source) in ("same", "inside"):
                raise DiTOptimumError(
                    f"`output_dir`={str(self.output_dir)!r} is inside `{name}`={str(source)!r}: the run would "
                    "write its checkpoints and pipeline into the model it reads; choose a folder outside it."
                )
        for name in ("skip_corrupt", "ema_warmup", "gradient_checkpointing", "compile", "resume", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise DiTOptimumError(f"`{name}`={getattr(self, name)!r} must be True or False.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DiTOptimumError(
                f"Unknown `mixed_precision`={self.mixed_precision!r}; allowed values: {', '.join(MIXED_PRECISION)}."
            )
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise DiTOptimumError(
                f"Unknown `prediction_type`={self.prediction_type!r}; allowed values: {', '.join(PREDICTION_TYPES)}."
            )
        if self.tensorboard and not is_tensorboard_available():
            raise DiTOptimumError("`tensorboard`=True needs the `tensorboard` package: pip install tensorboard.")

    def _validate_integers(self) -> None:
        check_positive_integers(
            steps=self.steps,
            batch_size=self.batch_size,
            checkpoint_every=self.checkpoint_every,
            log_every=self.log_every,
            image_size=self.image_size,
            keep_checkpoints=self.keep_checkpoints,
        )
        if self.max_samples is not None:
            check_positive_integers(max_samples=self.max_samples)
        if not is_integer(self.warmup_steps) or self.warmup_steps < 0:
            raise DiTOptimumError(f"`warmup_steps`={self.warmup_steps!r} must be an integer >= 0 (0: no warm-up).")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DiTOptimumError(
                f"Unknown `lr_schedule`={self.lr_schedule!r}; allowed values: {', '.join(LR_SCHEDULES)}."
            )
        if not is_integer(self.channels) or self.channels not in (1, 3, 4):
            raise DiTOptimumError(f"`channels`={self.channels!r} must be 1, 3 (pixels) or 4 (latents).")
        if not is_integer(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise DiTOptimumError(f"`seed`={self.seed!r} must be an integer in 0..{MAX_SEED}.")

    def _validate_numbers(self) -> None:
        try:
            check_number("learning_rate", self.learning_rate, 0, MAX_LEARNING_RATE, include_minimum=False)
        except DiTOptimumError:
            raise DiTOptimumError(
                f"`learning_rate` (--lr)={self.learning_rate!r} must be a finite number in (0, {MAX_LEARNING_RATE:g}] "
                "(AdamW moves each weight by about the learning rate per step: more only diverges)."
            ) from None
        check_number("weight_decay", self.weight_decay, 0)
        check_number("ema_decay", self.ema_decay, 0, 1, include_maximum=False)
        if self.max_grad_norm is not None:  # None: no clipping; 0 or less would not clip, or train uphill
            check_number("max_grad_norm", self.max_grad_norm, 0, include_minimum=False)
        check_number("alpha", self.alpha, 0, 1)
        check_number("feature_weight", self.feature_weight, 0)

    def _validate_model(self) -> None:
        parse_preset_name(self.model)
        overrides = self.model_overrides
        if not isinstance(overrides, dict):
            raise DiTOptimumError(
                f"`model_overrides`={overrides!r} (--model-config) must be a dict of model config keys."
            )
        for key in overrides:
            if key in DERIVED_MODEL_KEYS:
                raise DiTOptimumError(
                    f"`model_overrides` (--model-config) key {key!r} is set by the trainer from "
                    f"{DERIVED_MODEL_KEYS[key]}: remove it."
                )
            if key not in MODEL_KEYS:
                allowed = ", ".join(k for k in MODEL_KEYS if k not in DERIVED_MODEL_KEYS)
                raise DiTOptimumError(
                    f"`model_overrides` (--model-config) key {key!r} is not a model config key; allowed keys: "
                    f"{allowed}."
                )
        try:
            json.dumps(overrides, default=_json_default)
        except (TypeError, ValueError) as error:
            raise DiTOptimumError(
                f"`model_overrides`={overrides!r} (--model-config) must hold JSON values (numbers, strings, lists, "
                f"null): {error}."
            ) from None

    def _validate_distillation(self) -> None:
        blocks = self.feature_blocks
        if not isinstance(blocks, list) or not all(is_integer(block) and block >= 0 for block in blocks):
            raise DiTOptimumError(f"`feature_blocks`={blocks!r} must be a list of block indices (integers >= 0).")
        if len(set(blocks)) != len(blocks):
            raise DiTOptimumError(f"`feature_blocks`={blocks!r} names a block twice.")
        if blocks and self.teacher is None:
            raise DiTOptimumError("`feature_blocks` needs a `teacher` to distill from.")
        layers = dit_config(self.model, **self.model_overrides)["num_layers"]
        if is_integer(layers) and any(block >= layers for block in blocks):  # other layer counts: the model refuses
            raise DiTOptimumError(
                f"`feature_blocks`={blocks!r} names a block the student does not have; allowed values: 0..{layers - 1}."
            )

    def _validate_finetune(self) -> None:
        from ..models.lora import LORA_TARGETS

        if self.finetune not in FINETUNE_MODES:
            raise DiTOptimumError(f"Unknown `finetune`={self.finetune!r}; allowed values: {', '.join(FINETUNE_MODES)}.")
        if self.pretrained is None:
            if self.finetune != "full":
                raise DiTOptimumError(f"`finetune`={self.finetune!r} needs a `pretrained` pipeline to adapt.")
            return
        if not (isinstance(self.pretrained, (str, os.PathLike)) and str(self.pretrained)):
            raise DiTOptimumError(f"`pretrained`={self.pretrained!r} must be a pipeline folder or Hub id.")
        if self.model_overrides:
            raise DiTOptimumError(
                "`model_overrides` (--model-config) cannot change a `pretrained` model: its config is the pipeline's."
            )
        if not is_integer(self.lora_rank) or self.lora_rank < 1:
            raise DiTOptimumError(f"`lora_rank`={self.lora_rank!r} must be an integer >= 1.")
        if self.lora_alpha is not None:
            check_number("lora_alpha", self.lora_alpha, 0, include_minimum=False)
        targets = self.lora_targets
        if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
            raise DiTOptimumError(f"`lora_targets`={targets!r} must be a non-empty list of: {', '.join(LORA_TARGETS)}.")

    def _validate_step_distillation(self) -> None:
        from ..pipelines.dit import MAX_GUIDANCE_SCALE

        steps = self.student_steps
        if steps is None:
            if self.teacher_guidance_scale != 1:
                raise DiTOptimumError(
                    f"`teacher_guidance_scale`={self.teacher_guidance_scale!r} is a step-distillation setting: set "
                    "`student_steps` too, or leave it at 1."
                )
            return
        allowed = [n for n in range(1, TRAIN_TIMESTEPS // 2 + 1) if TRAIN_TIMESTEPS % (2 * n) == 0]
        if not is_integer(steps) or steps not in allowed:
            raise DiTOptimumError(
                f"`student_steps`={steps!r} must be an integer >= 1 whose double divides the {TRAIN_TIMESTEPS} "
                f"training timesteps (each student step is two teacher steps on one grid); allowed values: "
                f"{', '.join(map(str, allowed))} (None: ordinary training)."
            )
        if self.pretrained is None:
            raise DiTOptimumError(
                "`student_steps` needs `pretrained` (--pretrained): the teacher pipeline the student starts from."
            )
        if self.teacher is not None:
            raise DiTOptimumError(
                "`student_steps` and `teacher` cannot be combined: step distillation's teacher is `pretrained`."
            )
        if self.finetune != "full":
            raise DiTOptimumError(
                f"`student_steps` trains every weight of the student: `finetune`={self.finetune!r} is not allowed "
                "with it; allowed values: full."
            )
        check_number("teacher_guidance_scale", self.teacher_guidance_scale, 1, MAX_GUIDANCE_SCALE)
        if self.prediction_type is not None:
            raise DiTOptimumError(
                "`prediction_type` is a new network's; a step-distilled student's is `student_prediction`."
            )
        if self.student_prediction not in PREDICTION_TYPES:
            raise DiTOptimumError(
                f"Unknown `student_prediction`={self.student_prediction!r}; allowed values: "
                f"{', '.join(PREDICTION_TYPES)}."
            )

    def _validate_resources(self) -> None:
        """The image side, bounded by this machine before any data is read (``check_resources``, as the Python API
        and the benchmark bound theirs): one training batch of the model at that side must fit in memory. The
        model is the preset with its overrides, or a local ``pretrained`` pipeline's transformer config; latents
        data ignores ``image_size``. The LoRA rank is bounded by the model's width when the adapter is added."""
        from ..data import LATENTS_METADATA

        if os.path.isfile(os.path.join(str(self.data), LATENTS_METADATA)):
            return
        try:
            if self.pretrained is None:
                config = dit_config(
                    self.model, sample_size=self.image_size, in_channels=self.channels, **self.model_overrides
                )
            else:
                path = os.path.join(str(self.pretrained), "transformer", "config.json")
                with open(path) as stream:
                    config = json.load(stream)
            check_resources(
                {**config, "sample_size": self.image_size},
                parameter="image_size (--image-size)",
                image_size=self.image_size,
                images=self.batch_size,
                training=not self.gradient_checkpointing,
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as error:
            if isinstance(error, DiTOptimumError):
                raise
            # an unreadable pretrained config or a malformed override: reported where the model is built

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based): linear warm-up over ``warmup_steps``, then constant or a cosine
        decay to 0 at ``steps``. A function of the step alone: a resumed run continues the same schedule without any
        scheduler state."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.learning_rate

    def settings(self) -> dict[str, Any]:
        """The config as JSON values (the preset name canonical): what checkpoints store and a resume compares."""
        values = asdict(self)
        values["model"] = "DiT-{}/{}".format(*parse_preset_name(self.model))
        return json.loads(json.dumps(values, default=_json_default))
