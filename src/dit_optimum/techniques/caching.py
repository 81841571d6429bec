"""Step caching for DiT pipelines: diffusers' cache hooks set up for class-conditional DiT sampling, their
calibrations, and a calibrated per-step block reuse schedule (Learning-to-Cache style) that is saved with the model.

``enable_step_cache(pipe, method, **options)`` is the one entry point; ``CACHE_METHODS`` declares each method's
options and defaults once. Methods:

- ``first-block``: FirstBlockCache: later blocks reuse their residual when block 0's output barely moved.
- ``pab``: Pyramid Attention Broadcast: attention outputs reused every ``skip_range`` steps inside a timestep range.
- ``faster``: FasterCache: attention reuse with frequency-weighted extrapolation, and the unconditional half of the
  guided batch skipped on some steps (class labels are the conditional input); it assumes a guided batch, so a
  pipeline with it on refuses unguided calls (``guidance_scale`` <= 1).
- ``taylorseer``: TaylorSeer: attention and MLP outputs predicted by a Taylor expansion between full steps.
- ``magcache``: MagCache: skips while the accumulated residual-magnitude error stays small; its ratios are
  calibrated on one sampling run of this model.
- ``block-schedule``: which block reuses its last residual at which step, chosen from one calibration run so that
  the blocks whose residual changes least between steps are reused (an offline form of Learning-to-Cache's learned
  router); the schedule is written into the transformer's config, so ``save_pretrained`` keeps it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DiTOptimumError
from ..models.block_cache import BlockCacheSchedule
from ..models.resources import check_resources
from ..pipelines.dit import DiTOptimumPipeline

# method -> {option: default}; an option with default None must be given.
CACHE_METHODS: dict[str, dict[str, Any]] = {
    "first-block": {"threshold": 0.3},
    "pab": {"skip_range": 2, "timestep_range": (100, 800)},
    "faster": {"skip_range": 2, "timestep_range": (-1, 681), "unconditional_skip_range": 5},
    "taylorseer": {"cache_interval": 2, "warmup_steps": 2, "max_order": 1},
    "magcache": {"threshold": 0.06, "max_skip_steps": 2, "retention_ratio": 0.2, "num_inference_steps": None},
    "block-schedule": {"reuse_fraction": 0.4, "max_consecutive": 1, "num_inference_steps": None},
}
# what calibrating methods sample with (also options of those methods)
CALIBRATION_DEFAULTS: dict[str, Any] = {"guidance_scale": 2.0, "calibration_images": 8, "seed": 0}
_CALIBRATED = ("magcache", "block-schedule")
# the methods a saved pipeline carries (written into the transformer's config); the others are enabled at run time
SAVED_CACHE_METHODS = ("block-schedule",)
_TAYLORSEER_MODULES = [r"transformer_blocks\.\d+\.(attn1|ff)"]  # DiT names its attention attn1: match it


def resolve_cache_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's full options (defaults filled in); unknown methods or options raise naming the allowed ones."""
    if method not in CACHE_METHODS:
        raise DiTOptimumError(f"Unknown cache `method`={method!r}; allowed values: {', '.join(CACHE_METHODS)}.")
    allowed = {**CACHE_METHODS[method], **(CALIBRATION_DEFAULTS if method in _CALIBRATED else {})}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DiTOptimumError(
            f"Unknown option(s) {unknown} for cache method {method!r}; allowed: {', '.join(sorted(allowed))}."
        )
    resolved = {**allowed, **options}
    missing = [name for name, value in resolved.items() if value is None]
    if missing:
        raise DiTOptimumError(f"Cache method {method!r} needs {', '.join(f'`{m}`' for m in missing)}.")
    for name, value in resolved.items():
        if name == "timestep_range":
            numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
            if not numbers or value[0] >= value[1]:
                raise DiTOptimumError(f"`timestep_range`={value!r} must be two numbers (low, high) with low < high.")
        elif not _is_number(value):
            raise DiTOptimumError(f"`{name}`={value!r} for cache method {method!r} must be a finite number.")
    _check_ranges(method, resolved)
    return resolved


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_ranges(method: str, options: dict[str, Any]) -> None:
    integers = ("skip_range", "unconditional_skip_range", "cache_interval", "max_order", "max_skip_steps",
                "num_inference_steps", "calibration_images", "max_consecutive")  # fmt: skip
    for name in integers:
        if name in options and (not isinstance(options[name], int) or options[name] < 1):
            raise DiTOptimumError(f"`{name}`={options[name]!r} for cache method {method!r} must be an integer >= 1.")
    fractions = ("reuse_fraction", "retention_ratio")
    for name in fractions:
        if name in options and not 0 <= options[name] < 1:
            raise DiTOptimumError(f"`{name}`={options[name]!r} for cache method {method!r} must be in [0, 1).")
    for name in ("threshold", "warmup_steps", "seed"):
        if name in options and options[name] < 0:
            raise DiTOptimumError(f"`{name}`={options[name]!r} for cache method {method!r} must be >= 0.")
    if "guidance_scale" in options and options["guidance_scale"] < 1:
        raise DiTOptimumError(f"`guidance_scale`={options['guidance_scale']!r} must be >= 1.")
    if "seed" in options:
        check_resources(seed=options["seed"], parameter="seed")


def cache_config(pipeline: DiTOptimumPipeline, method: str, **options: Any) -> Any:
    """The diffusers cache config (or ``BlockCacheSchedule``) of ``method`` for this pipeline; calibrating methods
    run their calibration here (one sampling run with the cache off)."""
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    o = resolve_cache_options(method, options)

    timestep = PipelineTimestep(pipeline)

    if method == "first-block":
        return FirstBlockCacheConfig(threshold=o["threshold"])
    if method == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=o["skip_range"],
            spatial_attention_timestep_skip_range=tuple(o["timestep_range"]),
            current_timestep_callback=timestep,
        )
    if method == "faster":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=o["skip_range"],
            spatial_attention_timestep_skip_range=tuple(o["timestep_range"]),
            unconditional_batch_skip_range=o["unconditional_skip_range"],
            current_timestep_callback=timestep,
            tensor_format="BCHW",
            is_guidance_distilled=False,
            # the guided batch is [conditional; unconditional] along these inputs of the DiT's forward
            _unconditional_conditional_input_kwargs_identifiers=("hidden_states", "timestep", "class_labels"),
        )
    if method == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=o["cache_interval"],
            disable_cache_before_step=o["warmup_steps"],
            max_order=o["max_order"],
            taylor_factors_dtype=torch.float32,
            cache_identifiers=_TAYLORSEER_MODULES,
        )
    calibration = {name: o[name] for name in CALIBRATION_DEFAULTS}
    # the calibration run samples this many images in one call: bounded as the pipeline bounds its class labels
    check_resources(
        pipeline.transformer.config,
        parameter="calibration_images",
        images=calibration["calibration_images"],
        guided=calibration["guidance_scale"] > 1,
    )
    if method == "magcache":
        ratios = calibrate_mag_ratios(pipeline, o["num_inference_steps"], **calibration)
        return MagCacheConfig(
            threshold=o["threshold"],
            max_skip_steps=o["max_skip_steps"],
            retention_ratio=o["retention_ratio"],
            num_inference_steps=o["num_inference_steps"],
            mag_ratios=ratios,
        )
    return calibrate_block_schedule(
        pipeline, o["num_inference_steps"], o["reuse_fraction"], o["max_consecutive"], **calibration
    )


class PipelineTimestep:
    """The callback PAB and FasterCache ask for the current timestep: the pipeline's, or inf outside sampling (timing,
    FLOP counting), where no timestep is in any skip range and so every block is computed. An object holding the
    pipeline (not a closure), so that ``copy.deepcopy`` of the pipeline gives its copy a callback reading the copy."""

    def __init__(self, pipeline: DiTOptimumPipeline):
        self.pipeline = pipeline

    def __call__(self) -> float | torch.Tensor:
        current = self.pipeline.current_timestep
        return math.inf if current is None else current


def enable_step_cache(pipeline: DiTOptimumPipeline, method: str, **options: Any) -> DiTOptimumPipeline:
    """Enable step caching ``method`` (see ``CACHE_METHODS``) on the pipeline's transformer; returns the pipeline."""
    if not isinstance(pipeline, DiTOptimumPipeline):
        raise DiTOptimumError(
            "`pipeline` must be a DiTOptimumPipeline: it sets the cache context of each denoising step "
            "(load releases with DiTOptimumPipeline.from_pretrained)."
        )
    with pipeline.call_lock:  # after a call another thread is running (its cache hooks keep per-call state)
        config = cache_config(pipeline, method, **options)
        pipeline.transformer.enable_cache(config)
    return pipeline


def disable_step_cache(pipeline: DiTOptimumPipeline) -> DiTOptimumPipeline:
    """Remove the pipeline's step cache (``transformer.disable_cache()``), after any call another thread is running;
    returns the pipeline."""
    lock = getattr(pipeline, "call_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        pipeline.transformer.disable_cache()
    return pipeline


def enable_cache_recipe(pipeline: DiTOptimumPipeline, recipe: Mapping[str, Any]) -> DiTOptimumPipeline:
    """``enable_step_cache`` from a recipe ``{"method": ..., **options}``: how techniques and releases record a
    cache."""
    options = dict(recipe)
    return enable_step_cache(pipeline, options.pop("method"), **options)


def _uncached_transformer(pipeline: DiTOptimumPipeline):
    if pipeline.transformer.is_cache_enabled:
        raise DiTOptimumError("Calibrating needs the cache off: call `transformer.disable_cache()` first.")
    return pipeline.transformer


def _calibration_run(pipeline: DiTOptimumPipeline, steps: int, guidance_scale: float, images: int, seed: int) -> None:
    classes = [index % pipeline.transformer.num_classes for index in range(images)]
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    pipeline(classes, guidance_scale=guidance_scale, num_inference_steps=steps, generator=generator, output_type="pt")


def calibrate_mag_ratios(
    pipeline: DiTOptimumPipeline,
    num_inference_steps: int,
    guidance_scale: float = CALIBRATION_DEFAULTS["guidance_scale"],
    calibration_images: int = CALIBRATION_DEFAULTS["calibration_images"],
    seed: int = CALIBRATION_DEFAULTS["seed"],
) -> list[float]:
    """MagCache's per-step residual magnitude ratios for this model, from diffusers' own calibration mode (one
    sampling run, nothing skipped); diffusers prints and logs them, and this reads them from its log."""
    from diffusers import MagCacheConfig

    model = _uncached_transformer(pipeline)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # read here, not printed through diffusers' handler
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # diffusers also prints the ratios
            _calibration_run(pipeline, num_inference_steps, guidance_scale, calibration_images, seed)
    finally:
        model.disable_cache()
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    prefix = "MagCache Calibration Results: "
    found = [record.getMessage()[len(prefix) :] for record in records if record.getMessage().startswith(prefix)]
    if not found:
        raise DiTOptimumError("MagCache calibration reported no ratios (the diffusers version may have changed).")
    return [float(value) for value in ast.literal_eval(found[-1])]


def calibrate_block_schedule(
    pipeline: DiTOptimumPipeline,
    num_inference_steps: int,
    reuse_fraction: float = CACHE_METHODS["block-schedule"]["reuse_fraction"],
    max_consecutive: int = CACHE_METHODS["block-schedule"]["max_consecutive"],
    guidance_scale: float = CALIBRATION_DEFAULTS["guidance_scale"],
    calibration_images: int = CALIBRATION_DEFAULTS["calibration_images"],
    seed: int = CALIBRATION_DEFAULTS["seed"],
) -> BlockCacheSchedule:
    """Pick ``reuse_fraction`` of the (step, block) computations after the first step to reuse: those whose
    residual changes least from the step before in one uncached calibration run, never more than
    ``max_consecutive`` steps in a row for one block (a reused residual gets staler each step)."""
    model = _uncached_transformer(pipeline)
    blocks = model.transformer_blocks
    residuals: list[list[torch.Tensor]] = [[] for _ in blocks]
    outputs: list[list[float]] = [[] for _ in blocks]

    def record(index: int, inputs: tuple, output: torch.Tensor) -> None:
        residuals[index].append((output - inputs[0]).float())
        outputs[index].append(output.float().norm().item())

    handles = [
        block.register_forward_hook(lambda _module, inputs, output, index=index: record(index, inputs, output))
        for index, block in enumerate(blocks)
    ]
    try:
        _calibration_run(pipeline, num_inference_steps, guidance_scale, calibration_images, seed)
    finally:
        for handle in handles:
            handle.remove()
    # change[s][b]: how far block b's output would move if step s reused step s - 1's residual, relative to the
    # output's size (a residual that changes a lot but is small next to the hidden state is cheap to reuse)
    change = [
        [(residuals[b][s] - residuals[b][s - 1]).norm().item() / max(outputs[b][s], 1e-12) for b in range(len(blocks))]
        for s in range(1, num_inference_steps)
    ]
    candidates = sorted((change[s - 1][b], s, b) for s in range(1, num_inference_steps) for b in range(len(blocks)))
    budget = round(reuse_fraction * len(candidates))
    reused: set[tuple[int, int]] = set()
    for _score, step, block in candidates:
        if len(reused) >= budget:
            break
        run = 1
        for direction in (-1, 1):
            neighbour = step + direction
            while (neighbour, block) in reused:
                run, neighbour = run + 1, neighbour + direction
        if run <= max_consecutive:
            reused.add((step, block))
    rows = [sorted(b for s, b in reused if s == step) for step in range(num_inference_steps)]
    return BlockCacheSchedule.from_dict({"num_inference_steps": num_inference_steps, "reuse": rows}, len(blocks))
