"""Progressive step distillation (Salimans & Ho 2022) with classifier-free guidance distilled in (Meng et al. 2023):
one round teaches a student, initialised from the teacher's weights, to reach in ONE unguided DDIM step what the
teacher reaches in TWO guided ones, so that it samples in ``student_steps`` steps at one forward per step.

The grid is diffusers' DDIM with ``timestep_spacing="trailing"`` (starts at t = T - 1, where the images come from):
the student steps ``t -> s = t - T / N`` exactly as its saved scheduler will sample, the teacher ``t -> t - T / 2N
-> s``, so a round's teacher at ``2N`` steps is the previous round's student at its own grid. With the teacher's two
steps giving ``z_s``, the student's one DDIM step ``z_s = a_s x + sigma_s (z_t - a_t x) / sigma_t`` reaches it exactly
when its predicted clean image is ``x~ = (z_s - (sigma_s / sigma_t) z_t) / (a_s - (sigma_s / sigma_t) a_t)`` (at the
last step, ``s`` < 0 and ``alpha_s`` = the scheduler's final alpha: ``x~ = z_s``). The loss is in that x-space with
truncated-SNR weighting, ``max(SNR_t, 1) * ||x^ - x~||^2`` (Salimans & Ho), whatever the student predicts: by default
``v`` (well conditioned at t = T - 1, where eps-prediction divides by ``a_t`` ~ 0.007), recorded as the saved
scheduler's ``prediction_type``. The variance channels of a learned-sigma DiT keep their shape (the student saves and
loads as the teacher does) and are left to the loss' side: DDIM does not read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDIMScheduler

from ..errors import DiTOptimumError
from ..models.transformer import DiTOptimumTransformer2DModel
from ..pipelines.dit import DiTOptimumPipeline
from ..utils import public_config
from .config import STUDENT_PREDICTION, TrainConfig
from .diffusion import clean_and_noise

# The teacher and student must agree on these (input space, classes, network size).
_SHARED_KEYS = ("sample_size", "in_channels", "out_channels", "num_embeds_ada_norm")


def student_scheduler(teacher_config: Mapping[str, Any], prediction_type: str = STUDENT_PREDICTION) -> DDIMScheduler:
    """The DDIM scheduler a student samples with: the teacher's noise schedule on the trailing grid, predicting
    ``prediction_type``, without clipping the predicted image (the target it learned may leave [-1, 1])."""
    config = public_config(teacher_config)
    config.update(timestep_spacing="trailing", prediction_type=prediction_type, clip_sample=False, thresholding=False)
    return DDIMScheduler.from_config(config)


def record_student_defaults(pipeline: DiTOptimumPipeline, student_steps: int) -> DiTOptimumPipeline:
    """Record on ``pipeline`` that it samples at ``student_steps`` steps without guidance (saved with it)."""
    pipeline.set_sampling_defaults(num_inference_steps=student_steps, guidance_scale=1.0)
    return pipeline


def _ddim_update(
    scheduler: DDIMScheduler, sample: torch.Tensor, output: torch.Tensor, t: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' deterministic DDIM step (eta 0) from ``t`` to ``s`` per sample (``s`` < 0: the final alpha), with
    the scheduler's prediction type and clipping; returns the next sample and the predicted clean image."""
    a_t, a_s = _alpha(scheduler, t, sample), _alpha(scheduler, s, sample)
    x0, eps = clean_and_noise(output, sample, a_t, scheduler.config.prediction_type)
    if scheduler.config.clip_sample:  # as diffusers: the image is clipped, the noise direction is not re-derived
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps, x0


def _alpha(scheduler: DDIMScheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alpha_cumprod`` at each timestep of ``t`` (the scheduler's final one below 0), shaped to ``like``."""
    table = scheduler.alphas_cumprod.to(like.device, torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=like.device)
    t = t.to(like.device)
    values = torch.where(t >= 0, table[t.clamp(min=0)], final)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class StepDistillation:
    """One round: the frozen teacher (the ``pretrained`` pipeline, guided at ``teacher_guidance_scale``), the
    student's grid and scheduler, and ``loss``, which replaces the diffusion loss of the trainer's step."""

    def __init__(self, config: TrainConfig, student: DiTOptimumTransformer2DModel):
        try:
            pipeline = DiTOptimumPipeline.from_pretrained(config.pretrained)
        except DiTOptimumError as error:
            raise DiTOptimumError(f"`pretrained`={str(config.pretrained)!r} cannot be loaded: {error}") from error
        teacher = pipeline.transformer
        for key in _SHARED_KEYS:
            if teacher.config[key] != student.config[key]:
                raise DiTOptimumError(
                    f"`student_steps`: the student's `{key}`={student.config[key]} differs from the teacher "
                    f"(`pretrained`)'s {teacher.config[key]}: step distillation keeps the teacher's input space and "
                    "classes (train on data of the teacher's classes and size)."
                )
        self.guidance_scale = float(config.teacher_guidance_scale)
        if self.guidance_scale > 1 and teacher.null_class_label is None:
            raise DiTOptimumError(
                f"`teacher_guidance_scale`={self.guidance_scale:g} needs a teacher with a null class, but "
                f"`pretrained`={str(config.pretrained)!r} has class_dropout_prob=0; use teacher_guidance_scale=1."
            )
        self.teacher = teacher.float().eval().requires_grad_(False)
        self.teacher_scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        if self.teacher_scheduler.config.thresholding:
            raise DiTOptimumError(
                f"`pretrained`={str(config.pretrained)!r} samples with dynamic thresholding, which step distillation "
                "does not reproduce: save the teacher with `thresholding=False`."
            )
        self.scheduler = student_scheduler(pipeline.scheduler.config, config.student_prediction)
        self.steps = config.student_steps
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        if self.num_train_timesteps % (2 * self.steps):
            raise DiTOptimumError(
                f"`student_steps`={self.steps} does not halve the teacher's grid: 2 x student_steps must divide its "
                f"scheduler's num_train_timesteps={self.num_train_timesteps}."
            )
        self.stride = self.num_train_timesteps // self.steps  # what diffusers' DDIM step subtracts at N steps
        self.scheduler.set_timesteps(self.steps)
        self.grid = self.scheduler.timesteps.long().clone()  # the trailing grid, T - 1 first
        self.channels = student.config.in_channels

    def to(self, device: torch.device) -> StepDistillation:
        self.teacher.to(device)
        return self

    def student_timesteps(self, t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """The grid timesteps of uniformly drawn ``t`` in ``[0, num_timesteps)``: each grid point equally often."""
        return self.grid[(t * self.steps) // num_timesteps]

    def _teacher_output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale == 1:
            return self.teacher(x, t, y).sample[:, : self.channels].float()
        null = torch.full_like(y, self.teacher.null_class_label)
        output = self.teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).sample[:, : self.channels]
        cond, uncond = output.float().chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The clean image whose one student DDIM step from ``t`` lands where the teacher's two steps do."""
        x_t = x_t.float()
        middle, s = t - self.stride // 2, t - self.stride
        z_mid, _ = _ddim_update(self.teacher_scheduler, x_t, self._teacher_output(x_t, t, y), t, middle)
        z_s, _ = _ddim_update(self.teacher_scheduler, z_mid, self._teacher_output(z_mid, middle, y), middle, s)
        a_t, a_s = _alpha(self.scheduler, t, x_t), _alpha(self.scheduler, s, x_t)
        ratio = ((1 - a_s) / (1 - a_t)).sqrt()
        return (z_s - ratio * x_t) / (a_s.sqrt() - ratio * a_t.sqrt())

    def predicted_image(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The student's clean image at ``t`` from its prediction channels, as its scheduler reads them (unclipped)."""
        _, x0 = _ddim_update(self.scheduler, x_t.float(), output[:, : self.channels].float(), t, t - self.stride)
        return x0

    def loss(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mean(max(SNR_t, 1) * ||x^ - x~||^2)`` and the logged unweighted image error ``x0_mse``."""
        target = self.target(x_t, t, y)
        error = (self.predicted_image(output, x_t, t) - target).pow(2).mean(dim=tuple(range(1, x_t.ndim)))
        a_t = _alpha(self.scheduler, t, error)
        weight = (a_t / (1 - a_t)).clamp(min=1.0)
        return (weight * error).mean(), {"x0_mse": error.mean().detach()}
