"""Fewer sampling steps with a better ODE solver: the trained pipeline's DDIM scheduler replaced by one of
diffusers' multistep / ODE schedulers, built from the same noise schedule, and the step count recorded in the
pipeline (``set_sampling_defaults``), so that it is saved and reloaded with it.

One table, ``SOLVERS``, declares the solvers: diffusers' scheduler class, the options chosen for few steps (checked
by class accuracy on a trained DiT-XS/4, see ``SOLVERS``' comment) and the transformer evaluations each step costs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers

from ..errors import DiTOptimumError
from ..pipelines.dit import DiTOptimumPipeline
from ..utils import public_config


@dataclass(frozen=True)
class Solver:
    """A sampler: diffusers' scheduler class name, the options it is built with (on top of the pipeline's noise
    schedule) and the transformer evaluations per step (Heun's second-order correction costs two, except on the
    last step)."""

    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    evaluations_per_step: int = 1

    def evaluations(self, num_inference_steps: int) -> int:
        """Transformer calls of one sampling run at ``num_inference_steps`` (guidance batched into one call)."""
        return self.evaluations_per_step * num_inference_steps - (self.evaluations_per_step - 1)


# Options for 3-5 steps on a model trained with the 1000-step DDPM schedule. "trailing" spacing starts at the last
# training timestep (pure noise; "leading", DDIM's default, starts 1000 / steps earlier and leaves noise in
# few-step samples); the last step goes to sigma 0 and is first order (lower_order_final) where the class offers it;
# the baseline's x0 clipping is kept (`solver_scheduler`). Checked on the default cell (DiT-XS/4 on digits, 1,600
# steps; class accuracy / FD_domain, N=300, 2026-12): DDIM-10 0.967 / 133; at 5 steps DPM-Solver++ 2M 0.983 / 158,
# 3M 0.980 / 163, UniPC 0.983 / 156, DEIS 0.980 / 153, Euler 0.983 / 162 (DDIM-5 0.980 / 159); at 3 steps DPM-Solver++
# 2M 0.987 / 203, UniPC 0.987 / 203, Heun (5 evaluations) 0.943 / 211 (DDIM-3 0.987 / 204). "linspace" was no better
# (Euler-5 0.987 / 184) and broke Heun-3 (0.153); without the clipping a half-trained model lost class accuracy at
# 3 steps (DPM-Solver++ 2M 0.727 against 0.920 with it). DPM-Solver++ 2M with steps uniform in log-SNR
# (`use_lu_lambdas`, Lu et al.'s choice) at 5 steps: 0.957 / 135, the baseline's FD (at 4 steps 0.937 / 207, at 3
# 0.967 / 182); the same for 3M was worse (0.927 / 208), Karras sigmas too (2M-5 0.953 / 215); DDIM at 50 steps gives
# 0.893 / 180: the DDIM-10 baseline is not a converged ODE solution that a better solver approaches.
_FEW_STEPS = {"timestep_spacing": "trailing"}
_MULTISTEP = {**_FEW_STEPS, "lower_order_final": True, "final_sigmas_type": "zero"}
SOLVERS: dict[str, Solver] = {
    "dpmpp-2m": Solver(
        "DPMSolverMultistepScheduler",
        {**_MULTISTEP, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_lu_lambdas": True},
        "DPM-Solver++ 2M (second-order multistep, data prediction, steps uniform in log-SNR)",
    ),
    "dpmpp-3m": Solver(
        "DPMSolverMultistepScheduler",
        {**_MULTISTEP, "algorithm_type": "dpmsolver++", "solver_order": 3},
        "DPM-Solver++ 3M (third-order multistep, data prediction)",
    ),
    "unipc": Solver(
        "UniPCMultistepScheduler",
        {**_MULTISTEP, "solver_order": 2, "predict_x0": True, "solver_type": "bh2"},
        "UniPC (second-order predictor-corrector, bh2)",
    ),
    "deis": Solver(
        "DEISMultistepScheduler",
        {**_FEW_STEPS, "lower_order_final": True, "solver_order": 2, "algorithm_type": "deis"},
        "DEIS (second-order multistep exponential integrator)",
    ),
    "euler": Solver(
        "EulerDiscreteScheduler",
        {**_FEW_STEPS, "final_sigmas_type": "zero"},
        "Euler (first-order ODE steps in sigma)",
    ),
    "heun": Solver(
        "HeunDiscreteScheduler",
        dict(_FEW_STEPS),
        "Heun (second-order ODE steps in sigma; 2 network evaluations per step, 1 on the last)",
        evaluations_per_step=2,
    ),
}


# The noise schedule and what the network predicts belong to the trained model: a solver option may not change them.
MODEL_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)


def get_solver(name: str) -> Solver:
    """The solver declared as ``name``; an unknown name raises, listing the allowed ones."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise DiTOptimumError(f"Unknown solver {name!r}; allowed values: {', '.join(SOLVERS)}.")
    return SOLVERS[name]


def _check_options(cls: type, options: dict[str, Any]) -> None:
    """Refuse options the scheduler class does not take (diffusers would drop them silently) and options that would
    change the model's noise schedule or prediction type (the images would be wrong, not merely different)."""
    accepted = [key for key in inspect.signature(cls.__init__).parameters if key != "self"]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise DiTOptimumError(
            f"{cls.__name__} takes no option {', '.join(map(repr, unknown))}; allowed values: "
            f"{', '.join(key for key in accepted if key not in MODEL_SCHEDULE_KEYS)}."
        )
    fixed = [key for key in options if key in MODEL_SCHEDULE_KEYS]
    if fixed:
        raise DiTOptimumError(
            f"Solver option(s) {', '.join(map(repr, fixed))} would change the trained model's noise schedule or "
            "prediction type; they come from the pipeline's scheduler config: save the model with them instead."
        )


def solver_scheduler(config: Any, name: str, **options: Any):
    """Solver ``name``'s diffusers scheduler with the noise schedule of scheduler ``config`` (e.g. the trained
    pipeline's DDIM config: betas, training steps, prediction type), the solver's options and ``options`` on top."""
    solver = get_solver(name)
    schedule = public_config(config)
    cls = getattr(diffusers, solver.scheduler)
    clipping = {}
    if schedule.get("clip_sample") and "thresholding" in inspect.signature(cls.__init__).parameters:
        # the x0 clipping the schedule samples with (DDIM's clip_sample: pixel-space data in [-1, 1]), as
        # thresholding bounded by the clipping range (its quantile is clamped to [1, range]: for range 1, clipping)
        clipping = {"thresholding": True, "sample_max_value": float(schedule.get("clip_sample_range", 1.0))}
    _check_options(cls, options)
    try:
        return cls.from_config(schedule, **{**clipping, **solver.options, **options})
    except (ValueError, TypeError, KeyError, NotImplementedError) as error:  # a value diffusers' scheduler refuses
        raise DiTOptimumError(f"Solver {name!r} cannot be built with options {options!r}: {error}") from error


def with_solver(
    pipeline: DiTOptimumPipeline,
    name: str,
    num_inference_steps: int,
    guidance_scale: float | None = None,
    **options: Any,
) -> DiTOptimumPipeline:
    """A pipeline sampling ``pipeline``'s model (shared, not copied) with solver ``name`` at ``num_inference_steps``
    (recorded as its sampling default, with ``guidance_scale`` when given): it saves and reloads with that scheduler
    and step count. ``options`` change the solver's scheduler options."""
    if not isinstance(pipeline, DiTOptimumPipeline):
        raise DiTOptimumError(f"`pipeline` must be a DiTOptimumPipeline, got {type(pipeline).__name__}.")
    if num_inference_steps is None:  # None would leave the step count unrecorded (a call would then take 50)
        raise DiTOptimumError(
            "`num_inference_steps`=None; allowed values: an integer in 1..the scheduler's num_train_timesteps."
        )
    scheduler = solver_scheduler(pipeline.scheduler.config, name, **options)
    solved = DiTOptimumPipeline(
        transformer=pipeline.transformer,
        vae=pipeline.vae,
        scheduler=scheduler,
        id2label=pipeline.config.get("id2label"),
    )
    recorded = {**pipeline.sampling_defaults, "num_inference_steps": num_inference_steps}
    if guidance_scale is not None:
        recorded["guidance_scale"] = guidance_scale
    solved.set_sampling_defaults(**recorded)
    return solved


def scales_initial_noise(scheduler: str) -> bool:
    """Whether diffusers' scheduler class ``scheduler`` (a name) starts sampling from noise scaled by its
    ``init_noise_sigma`` (sigma-parameterised schedulers: Euler, Heun). ``DiTOptimumPipeline`` scales it; diffusers'
    stock ``DiTPipeline`` does not, and samples such a scheduler from the wrong noise. False for unknown names."""
    cls = getattr(diffusers, scheduler, None) if scheduler.isidentifier() and scheduler.endswith("Scheduler") else None
    if not isinstance(cls, type) or not hasattr(cls, "set_timesteps"):
        return False
    try:
        instance = cls()
        instance.set_timesteps(2)
        return float(getattr(instance, "init_noise_sigma", 1.0)) != 1
    except Exception:  # a class that cannot be built with its defaults: not one DiT samples with
        return False
