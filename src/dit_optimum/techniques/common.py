"""What every technique shares: take a pipeline or a bare transformer, give back the same kind."""

from __future__ import annotations

import copy

from ..errors import DiTOptimumError
from ..models.transformer import DiTOptimumTransformer2DModel, is_quantized
from ..pipelines.dit import DiTOptimumPipeline


def unwrap(pipe_or_model, *, float_only: bool = True) -> DiTOptimumTransformer2DModel:
    """The transformer of a pipeline (or the model itself); refuses other types and, by default, quantized models."""
    model = pipe_or_model.transformer if isinstance(pipe_or_model, DiTOptimumPipeline) else pipe_or_model
    if not isinstance(model, DiTOptimumTransformer2DModel):
        raise DiTOptimumError(
            "`pipe_or_model` must be a DiTOptimumPipeline or DiTOptimumTransformer2DModel, "
            f"got {type(pipe_or_model).__name__}."
        )
    if float_only and is_quantized(model):
        raise DiTOptimumError("`pipe_or_model` is already quantized: apply this technique to its float original.")
    return model


def rewrap(pipe_or_model, model: DiTOptimumTransformer2DModel):
    """A new pipeline around ``model`` sharing the original's VAE, labels and recorded sampling defaults (steps,
    guidance) with a copy of its scheduler (a scheduler keeps per-call state, and the two pipelines' calls do not
    wait for each other), or ``model`` itself."""
    if not isinstance(pipe_or_model, DiTOptimumPipeline):
        return model
    return DiTOptimumPipeline(
        transformer=model,
        vae=pipe_or_model.vae,
        scheduler=copy.deepcopy(pipe_or_model.scheduler),
        id2label=pipe_or_model.config.get("id2label"),
        **pipe_or_model.sampling_defaults,
    )
