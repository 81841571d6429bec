"""The trainer: DiT (any attention, MoE) and knowledge distillation, with accelerate, resumable, multi-process.

Read top to bottom: ``train`` checks the ``TrainConfig`` (``config.py``), locks the output folder, finds the
checkpoint to resume (``checkpoints.py``: foreign files and changed settings refused before reading any weights),
builds data, the model (fresh, or a pretrained one prepared by ``finetune.py``: LoRA, biases, full), the teacher
(``distillation.py``; or, with ``student_steps``, the pretrained pipeline whose two DDIM steps the student learns to
take in one, ``step_distillation.py``), optimizer, EMA and logging, then loops: sample a global batch (a permutation
fixed by seed and epoch, split across processes), noise it, take the DiT loss (or the step-distillation loss; + MoE
auxiliary loss, + distillation terms), step, update the EMA, log, and checkpoint atomically every
``checkpoint_every`` steps. The result is saved as a pipeline that ``DiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, SchedulerMixin
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..configs import dit_config
from ..data import TrainingData, load_training_data
from ..errors import DiTOptimumError
from ..files import check_save_target, check_writable, claim_files, folder_lock, record_written, write_json, write_text
from ..models.transformer import DiTOptimumTransformer2DModel, check_activation_memory
from ..pipelines.dit import DiTOptimumPipeline
from .checkpoints import (
    RunState,
    check_same_content,
    checkpoint_folders,
    data_fingerprint,
    load_checkpoint,
    model_fingerprint,
    remove_staging_folders,
    resume_point,
    run_record,
    save_checkpoint,
)
from .config import TrainConfig
from .data import load_vae
from .diffusion import PREDICTION_TYPES, GaussianDiffusion
from .distillation import Distillation
from .ema import EMA
from .finetune import BaseSampling, finish_lora, load_pretrained, prepare_finetune
from .step_distillation import StepDistillation, record_student_defaults

TRAIN_LOG_NAME = "train_log"  # accelerate's run name: the CSV tracker writes <name>.csv
TRAIN_LOG_FILE = f"{TRAIN_LOG_NAME}.csv"
TRAIN_CONFIG_FILE = f"{TRAIN_LOG_NAME}.config.json"
PIPELINE_FOLDER = "pipeline"  # the trained pipeline, saved at the end of the run


class CSVTracker(GeneralTracker):
    """accelerate tracker writing one CSV row per logged step (columns fixed by the first row).

    The run's settings go to ``train_log.config.json``, written by ``train`` with the history of resumes.
    """

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(logging_dir) / f"{run_name}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] | None = None

    @property
    def tracker(self):
        return self.path

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        row = {"step": step, **values}
        new = False
        if self.columns is None:
            # Continue a resumed run's file with its columns; otherwise this row fixes them.
            header = self.path.read_text().split("\n", 1)[0] if self.path.exists() else ""
            new = not header
            self.columns = header.split(",") if header else list(row)
        # appended in place (never through a link planted at the name), one row per logged step
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with open(descriptor, "a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def _truncate_log(path: Path, last_step: int) -> None:
    # On resume, drop rows logged after the checkpoint so the CSV has each step once; a fresh run starts empty.
    if not path.exists():
        return
    if last_step == 0:
        path.unlink()
        return
    with path.open() as stream:
        rows = list(csv.DictReader(stream))
        columns = rows[0].keys() if rows else None
    if columns is None:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(row for row in rows if int(row["step"]) <= last_step)
    write_text(path.parent, path.name, buffer.getvalue(), overwrite=True)  # the run's own log, resumed


def build_model(config: TrainConfig, data: TrainingData) -> DiTOptimumTransformer2DModel:
    """The student/base model: a preset sized to the data (side, channels, classes) plus overrides."""
    side, channels = data.samples.shape[-1], data.samples.shape[1]
    num_classes = max(data.num_classes, max(data.id2label, default=-1) + 1)
    return DiTOptimumTransformer2DModel(
        **dit_config(
            config.model, sample_size=side, in_channels=channels, num_classes=num_classes, **config.model_overrides
        )
    )


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    # Cached: every step of an epoch reuses it instead of drawing an O(N) permutation again.
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _global_batch_indices(num_samples: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of ``step``: a fresh permutation per epoch, fixed by (seed, epoch)."""
    batches_per_epoch = max(1, num_samples // batch_size)
    epoch, position = divmod(step, batches_per_epoch)
    permutation = _epoch_permutation(num_samples, seed, epoch)
    indices = permutation[position * batch_size : (position + 1) * batch_size]
    if len(indices) < batch_size:  # fewer samples than one batch: wrap around
        indices = permutation[torch.arange(position * batch_size, (position + 1) * batch_size) % num_samples]
    return indices


def _attention_kernels(config: TrainConfig, device: torch.device):
    """The attention kernels of the training step: on CPU with bf16 autocast the math kernel, whose backward is
    several times faster than the fused one at the short sequences of small images (benchmarks/train_speed.py);
    elsewhere PyTorch's own choice."""
    if device.type == "cpu" and config.mixed_precision == "bf16":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def train(config: TrainConfig) -> Path:
    """Train (or distill) and return the folder of the saved pipeline (``<output_dir>/pipeline``).

    Every option is checked first; the output folder is locked for the whole run, so a second run on it is refused.
    """
    config.validate()
    output_dir = check_writable(config.output_dir)  # a read-only, full or missing-parent folder fails now
    # accelerate keeps mixed precision in a process-wide singleton: reset it (not the process group) so that each
    # train() in a process may choose its own precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Without a GPU, accelerate only sets up multi-process (gloo) training when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with=[CSVTracker(TRAIN_LOG_NAME, output_dir)] + (["tensorboard"] if config.tensorboard else []),
        project_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        # before the lock is taken and any work done: a new run never replaces a user's files of these names, a
        # resumed one never writes through a link planted at them
        resuming = bool(checkpoint_folders(output_dir))
        claim_files(output_dir, (TRAIN_LOG_FILE, TRAIN_CONFIG_FILE), overwrite=resuming)
        if not resuming:  # the pipeline folder is written at the end: a user's folder there is refused now
            check_save_target(output_dir / PIPELINE_FOLDER, "model_index.json", parameter="output_dir")
    with folder_lock(output_dir, "training", enabled=accelerator.is_main_process):
        return _train(config, accelerator, output_dir)


def _train(config: TrainConfig, accelerator: Accelerator, output_dir: Path) -> Path:
    """The run, under the folder lock: resume point, data, models, optimizer, then the training loop."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise DiTOptimumError(
            f"`batch_size`={config.batch_size} must be divisible by the number of processes ({world})."
        )
    checkpoint, saved = resume_point(config, output_dir)
    prediction_type = _prediction_type(config)  # before any data is read: a conflict is refused first
    set_seed(config.seed)  # model initialisation; the training draws below are seeded per step
    data = load_training_data(config.data, config.image_size, config.channels, config.skip_corrupt)
    if config.max_samples is not None:
        data.samples, data.labels = data.samples[: config.max_samples], data.labels[: config.max_samples]
    inputs = {"data": data_fingerprint(data)}
    if saved is not None:
        check_same_content("data", config.data, saved["inputs"].get("data"), inputs["data"], checkpoint)
    base_sampling = None
    if config.pretrained is None:
        model, resized = build_model(config, data), False
    else:  # fine-tuning: the base, its class table resized to the data's classes when they differ
        model, resized, base_sampling = load_pretrained(config, data)
    inputs["pretrained"] = model_fingerprint(model) if config.pretrained else None
    if saved is not None:
        check_same_content(
            "pretrained", config.pretrained, saved["inputs"].get("pretrained"), inputs["pretrained"], checkpoint
        )
    prepare_finetune(model, config, resized)  # what trains: all, LoRA adapters, or biases (+ a resized table)
    # Refuse a batch whose activations cannot fit before allocating it (checkpointing keeps about one block's).
    check_activation_memory(model.config, config.batch_size // world, "batch_size", not config.gradient_checkpointing)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    distillation = Distillation(config, model) if config.teacher else None
    # step distillation: the `pretrained` pipeline is also the frozen teacher whose two steps the student learns
    step_distillation = StepDistillation(config, model) if config.student_steps else None
    teacher = distillation.teacher if distillation else step_distillation.teacher if step_distillation else None
    inputs["teacher"] = model_fingerprint(teacher)
    if saved is not None:
        teacher_name = config.teacher or (config.pretrained if step_distillation else None)
        check_same_content("teacher", teacher_name, saved["inputs"].get("teacher"), inputs["teacher"], checkpoint)
    projections = distillation.projections if distillation else nn.ModuleDict()

    # The trainer draws label dropout itself (seeded), so teacher and student see the same labels and a resumed
    # run repeats the same draws; the model's own random dropout is switched off.
    null_class = model.null_class_label
    class_dropout = model.config.class_dropout_prob
    model.conditioning_embedding.class_embedder.dropout_prob = 0.0
    trainable = [p for p in model.parameters() if p.requires_grad] + list(projections.parameters())
    # fused: one kernel per step for every parameter instead of a Python loop over them (measured faster on CPU)
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate_at(0), weight_decay=config.weight_decay, fused=True
    )
    if len(projections):
        model, projections, optimizer = accelerator.prepare(model, projections, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, config.ema_decay, config.ema_warmup)
    if config.compile:
        unwrapped.compile()  # after the EMA copy: the averaged model stays a plain module
    if distillation is not None:
        distillation.to(accelerator.device)
    if step_distillation is not None:
        step_distillation.to(accelerator.device)
    diffusion = GaussianDiffusion()

    settings = config.settings()
    run = RunState(
        model=unwrapped,
        projections=accelerator.unwrap_model(projections),
        optimizer=optimizer,
        ema=ema,
        scaler=accelerator.scaler,
        settings=settings,
        record=run_record(settings, saved),
        inputs=inputs,
    )
    start_step = 0
    if checkpoint is not None:
        load_checkpoint(checkpoint, saved, run, accelerator)
        start_step = saved["step"]
    if accelerator.is_main_process:
        remove_staging_folders(output_dir)
        _truncate_log(output_dir / TRAIN_LOG_FILE, start_step)
        write_json(output_dir, TRAIN_CONFIG_FILE, run.record, overwrite=True)  # claimed above, or the run's own
        record_written(output_dir, [TRAIN_LOG_FILE])  # the tracker appends to it
    accelerator.init_trackers(TRAIN_LOG_NAME, config=_hyperparameters(settings))

    samples, labels = data.samples, data.labels
    progress = tqdm(
        range(start_step, config.steps),
        initial=start_step,
        total=config.steps,
        disable=not accelerator.is_main_process,
        desc="train",
    )
    window_start, window_steps = time.perf_counter(), 0
    has_moe = unwrapped.config.moe_num_experts > 0
    # The first step whose loss was not finite (0: none), kept on the device and read on the steps that log or
    # checkpoint (every step on CPU in one process, where reading it costs nothing): a diverged run stops there,
    # before its weights are logged, checkpointed or saved.
    first_bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)
    check_every_step = accelerator.device.type == "cpu" and world == 1
    model.train()
    with _attention_kernels(config, accelerator.device):
        for step in progress:
            # Every process draws the same global batch, timesteps, noise and label drops (seeded by seed and step)
            # and takes its slice: any process count sees the same samples, a resumed run repeats the same draws.
            indices = _global_batch_indices(len(samples), step, config.batch_size, config.seed)
            generator = torch.Generator().manual_seed(config.seed * 7_919 + step * 131)
            t = torch.randint(0, diffusion.num_timesteps, (len(indices),), generator=generator)
            if step_distillation is not None:  # the student's grid points, each equally often
                t = step_distillation.student_timesteps(t, diffusion.num_timesteps)
            noise = torch.randn((len(indices), *samples.shape[1:]), generator=generator)
            dropped = torch.rand(len(indices), generator=generator) < class_dropout
            y = labels[indices]
            if null_class is not None:
                y = torch.where(dropped, torch.full_like(y, null_class), y)
            local = slice(rank, None, world)
            x0, y, t, noise = (v[local].to(accelerator.device) for v in (samples[indices], y, t, noise))
            x_t = diffusion.q_sample(x0, t, noise)

            with accelerator.autocast():
                output = model(x_t, t, y).sample
                terms = diffusion.losses(output.float(), x0, x_t, t, noise, prediction_type)
                loss = terms["loss"].mean()
                extra: dict[str, torch.Tensor] = {}
                if step_distillation is not None:  # the teacher's two-step target replaces the diffusion loss
                    loss, extra = step_distillation.loss(output, x_t, t, y)
                if has_moe:
                    loss = loss + unwrapped.moe_aux_loss()
                if distillation is not None:
                    loss, extra = distillation.loss(loss, output, x_t, t, y, projections)

            bad = ~torch.isfinite(loss.detach()) & (first_bad_step == 0)
            first_bad_step = torch.where(bad, torch.full_like(first_bad_step, step + 1), first_bad_step)
            reported = (step + 1) % config.log_every == 0 or (step + 1) % config.checkpoint_every == 0
            if check_every_step or reported or step + 1 == config.steps:
                _stop_if_diverged(accelerator, first_bad_step, config, output_dir)

            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate_at(step)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            done = step + 1
            logging = done % config.log_every == 0 or done == config.steps
            if config.max_grad_norm is not None or logging:  # the norm is a host sync: only when clipped or logged
                grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
            optimizer.step()
            ema.update(unwrapped)
            window_steps += 1

            if logging:
                elapsed = time.perf_counter() - window_start
                logs = {name: value.item() for name, value in extra.items()}
                logs.update(
                    mse=terms["mse"].mean().item(),
                    vb=terms["vb"].mean().item(),
                    loss=accelerator.reduce(loss.detach(), reduction="mean").item(),
                    grad_norm=float(grad_norm),
                    lr=optimizer.param_groups[0]["lr"],
                    steps_per_s=window_steps / elapsed,
                )
                for block, stats in unwrapped.routing_statistics().items():
                    logs[f"{block}/max_over_mean_load"] = stats["max_over_mean_load"]
                    logs[f"{block}/dropped_fraction"] = stats["dropped_fraction"]
                    logs[f"{block}/load_entropy"] = stats["load_entropy"]
                accelerator.log(logs, step=done)
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
                window_start, window_steps = time.perf_counter(), 0
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(accelerator, output_dir, done, config.keep_checkpoints, run)

    accelerator.wait_for_everyone()
    pipeline_dir = output_dir / PIPELINE_FOLDER
    if accelerator.is_main_process:
        final = ema.model
        final.conditioning_embedding.class_embedder.dropout_prob = class_dropout
        if config.finetune == "lora":  # the adapter on its own in <output_dir>/lora, merged into the pipeline
            final = finish_lora(final, output_dir)
        _save_pipeline(final, data, pipeline_dir, prediction_type, step_distillation, base_sampling)
    accelerator.end_training()
    return pipeline_dir


def _stop_if_diverged(
    accelerator: Accelerator, first_bad_step: torch.Tensor, config: TrainConfig, output_dir: Path
) -> None:
    """Raise if any process saw a non-finite loss: the run stops before that step's update, so the checkpoints
    already written (all from finite steps) stay as they are and no NaN pipeline is saved."""
    steps = accelerator.gather(first_bad_step[None]) if accelerator.num_processes > 1 else first_bad_step[None]
    steps = steps[steps > 0]
    if not steps.numel():
        return
    step = int(steps.min())
    model = "the model config (--model-config: an extreme value such as a large `focusing_factor` or `mlp_ratio`)"
    if config.pretrained:
        model += f", the pretrained weights {config.pretrained!r}"
    if step == 1:  # the first forward, before any update: the learning rate played no part yet
        causes = (
            "The loss was already not finite before the first update, so the learning rate is not the cause. "
            f"Likely causes: {model}; NaN/inf values in the data; fp16 overflow (--mixed-precision bf16)."
        )
    else:
        causes = (
            f"Likely causes: the learning rate `learning_rate` (--lr)={config.learning_rate:g} is too high for this "
            "model and data (try 10x lower, --warmup-steps, or --max-grad-norm 1); "
            f"{model}; NaN/inf values in the data; fp16 overflow (--mixed-precision bf16)."
        )
    raise DiTOptimumError(
        f"Training diverged: the loss is not finite (NaN or inf) at step {step}. Stopped without saving the "
        f"pipeline; the checkpoints in {str(output_dir / 'checkpoints')!r} (if any) are from earlier, finite steps and "
        f"are kept. {causes}"
    )


def _prediction_type(config: TrainConfig) -> str:
    """What the trained network predicts (its saved scheduler's ``prediction_type``): a step-distilled student its
    ``student_prediction``; a fine-tune or a distilled student its ``pretrained`` or ``teacher`` model's, since its
    outputs continue or match theirs; a new network ``prediction_type``, by default DiT's noise."""
    if config.student_steps:
        return config.student_prediction
    kinds = {}
    for name in ("pretrained", "teacher"):
        source = getattr(config, name)
        if source is None:
            continue
        try:
            scheduler = DDIMScheduler.load_config(source, subfolder="scheduler")
        except (OSError, ValueError):
            continue  # not a readable pipeline: its loader refuses it below, naming what is wrong
        if not isinstance(scheduler, dict):
            continue  # likewise
        kind = scheduler.get("prediction_type", _unstated_prediction(scheduler.get("_class_name")))
        if kind not in PREDICTION_TYPES:
            what = f"predicts {kind!r}" if kind is not None else f"samples with {scheduler.get('_class_name')!r}"
            raise DiTOptimumError(
                f"`{name}`={str(source)!r} {what} (scheduler/scheduler_config.json); the trainer trains networks "
                f"that predict {' or '.join(PREDICTION_TYPES)} with DDPM's noise schedule."
            )
        kinds[name] = kind
    if config.prediction_type is not None:
        kinds["prediction_type"] = config.prediction_type
    if len(set(kinds.values())) > 1:
        named = ", ".join(f"`{name}` {kind}" for name, kind in kinds.items())
        raise DiTOptimumError(
            f"The network's parametrisation differs between {named}: a fine-tune or distilled student keeps its "
            "pretrained or teacher model's (leave `prediction_type` unset)."
        )
    return next(iter(kinds.values()), PREDICTION_TYPES[0])


def _unstated_prediction(class_name: Any) -> Any:
    """What a scheduler config without ``prediction_type`` means: its class's default (DDIM's: the noise), or None
    for a class that has no such setting (flow matching), which the trainer does not train."""
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else DDIMScheduler
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        cls = DDIMScheduler
    parameter = inspect.signature(cls.__init__).parameters.get("prediction_type")
    return None if parameter is None else parameter.default


def _hyperparameters(settings: dict[str, Any]) -> dict[str, Any]:
    # Trackers (TensorBoard) take scalars: lists and dicts as JSON text.
    scalar = (bool, int, float, str)
    return {name: value if isinstance(value, scalar) else json.dumps(value) for name, value in settings.items()}


def _save_pipeline(
    model: DiTOptimumTransformer2DModel,
    data: TrainingData,
    pipeline_dir: Path,
    prediction_type: str,
    step_distillation: StepDistillation | None = None,
    base_sampling: BaseSampling | None = None,
) -> None:
    vae = load_vae(data.vae) if data.vae else None
    # a step-distilled student samples with the DDIM config it was trained for, at its steps, unguided; a fine-tune
    # as its base does (scheduler and recorded steps and guidance: a fine-tuned student keeps its grid)
    if step_distillation is not None:
        scheduler = step_distillation.scheduler
    elif base_sampling is not None:
        scheduler = base_sampling.scheduler
    else:
        scheduler = DDIMScheduler(prediction_type=prediction_type)
    pipeline = DiTOptimumPipeline(
        transformer=model.eval(), vae=vae, scheduler=scheduler, id2label=data.id2label or None
    )
    if step_distillation is not None:
        record_student_defaults(pipeline, step_distillation.steps)
    elif base_sampling is not None:
        pipeline.set_sampling_defaults(**base_sampling.defaults)
    pipeline.save_pretrained(pipeline_dir)
    statistics = model.routing_statistics()
    if statistics:
        write_json(pipeline_dir, "routing_statistics.json", statistics)


def final_loss(output_dir: str | Path, window: int = 5) -> float:
    """Mean logged loss over the last ``window`` log rows of a run."""
    with (Path(output_dir) / TRAIN_LOG_FILE).open() as stream:
        rows = list(csv.DictReader(stream))
    values = [float(row["loss"]) for row in rows[-window:]]
    return sum(values) / len(values) if values else math.nan
