"""The technique registry: name -> function that makes a cheaper pipeline, so the benchmark never special-cases one.

A technique is ``apply(context, **options) -> pipeline``. The context gives it the trained baseline of the current
model variant, or trains a model under the benchmark's recipe (same data, steps and seed as the baseline), so that
post-training techniques (quantization, pruning) and training-time ones (attention types, MoE, distillation) share
one signature. Adding a technique is one function and one ``register_technique`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import DiTOptimumError
from ..models.attention import ATTENTION_TYPES
from ..pipelines.dit import DiTOptimumPipeline
from .caching import enable_cache_recipe
from .pruning import prune
from .quantization import quantize


class TechniqueContext(Protocol):
    """What a technique may ask for while the benchmark builds one cell."""

    def baseline(self) -> DiTOptimumPipeline:
        """A fresh copy of the variant's trained (or loaded) baseline pipeline."""

    def baseline_config(self) -> Mapping[str, Any]:
        """The baseline transformer's config."""

    def train(
        self, name: str, model_overrides: Mapping[str, Any] | None = None, *, distill: bool = False, **options: Any
    ) -> DiTOptimumPipeline:
        """Train (or load, once trained) the variant with ``model_overrides`` under the benchmark's recipe.

        ``distill=True`` distills from the baseline; ``options`` are further trainer settings.
        """

    def finetune(self, name: str, pipeline: DiTOptimumPipeline, *, distill: bool = True) -> DiTOptimumPipeline:
        """Fine-tune ``pipeline`` (e.g. a pruned baseline) on the variant's data for the recipe's recovery steps,
        distilling from the baseline when ``distill``; trained once, then loaded."""


@dataclass(frozen=True)
class Technique:
    """A registered technique: how to apply it, its default options and a one-line description."""

    name: str
    apply: Callable[..., DiTOptimumPipeline]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    trains: bool = False

    def build(self, context: TechniqueContext) -> DiTOptimumPipeline:
        return self.apply(context, **self.options)


TECHNIQUES: dict[str, Technique] = {}


def register_technique(
    name: str,
    apply: Callable[..., DiTOptimumPipeline],
    description: str,
    options: Mapping[str, Any] | None = None,
    *,
    trains: bool = False,
) -> Technique:
    """Add a technique under ``name`` (names are unique); ``options`` are passed to ``apply`` as keywords."""
    if name in TECHNIQUES:
        raise DiTOptimumError(f"A technique named {name!r} is already registered.")
    technique = Technique(name, apply, description, dict(options or {}), trains)
    TECHNIQUES[name] = technique
    return technique


def get_technique(name: str) -> Technique:
    """The technique registered as ``name``; an unknown name raises, listing the allowed ones."""
    if name not in TECHNIQUES:
        raise DiTOptimumError(f"Unknown technique {name!r}; allowed values: {', '.join(TECHNIQUES)}.")
    return TECHNIQUES[name]


# --- the techniques -------------------------------------------------------------------------------------------


def baseline(context: TechniqueContext) -> DiTOptimumPipeline:
    """The reference every other technique is compared with: the variant trained with the benchmark's recipe."""
    return context.baseline()


def train_with_overrides(context: TechniqueContext, run_name: str, **model_overrides: Any) -> DiTOptimumPipeline:
    """A model of the variant trained from scratch with changed config (attention type, MoE, ...)."""
    return context.train(run_name, model_overrides)


def distill_student(context: TechniqueContext, run_name: str, depth_fraction: float = 0.5) -> DiTOptimumPipeline:
    """A student with ``depth_fraction`` of the baseline's blocks, distilled from the baseline (output + feature)."""
    layers = max(1, round(context.baseline_config()["num_layers"] * depth_fraction))
    return context.train(run_name, {"num_layers": layers}, distill=True, feature_blocks=[layers - 1])


def quantized(context: TechniqueContext, **options: Any) -> DiTOptimumPipeline:
    """The trained baseline with its linear layers quantized (or cast) after training, no retraining."""
    return quantize(context.baseline(), **options)


def pruned_and_recovered(context: TechniqueContext, run_name: str, **options: Any) -> DiTOptimumPipeline:
    """The pruned baseline fine-tuned briefly (all weights, the recipe's recovery steps) with distillation from the
    unpruned baseline: how much of what pruning lost comes back."""
    return context.finetune(run_name, prune(context.baseline(), **options), distill=True)


def pruned(context: TechniqueContext, **options: Any) -> DiTOptimumPipeline:
    """The trained baseline with whole heads, MLP units or blocks removed (really smaller), no fine-tuning."""
    return prune(context.baseline(), **options)


def sampling_cache(name: str) -> dict[str, Any] | None:
    """The step cache a technique samples with (``{"method": ..., **options}`` for ``enable_cache_recipe``), or None.
    Only a ``block-schedule`` cache is saved with the weights; whoever loads another cached release enables its
    cache again (its card says how)."""
    technique = TECHNIQUES.get(name)
    return dict(technique.options["cache"]) if technique is not None and "cache" in technique.options else None


def stacked(
    context: TechniqueContext,
    base: str,
    quantization: Mapping[str, Any] | None = None,
    cache: Mapping[str, Any] | None = None,
) -> DiTOptimumPipeline:
    """Techniques applied in turn: the pipeline of technique ``base`` (trained once, then loaded), quantized with
    ``quantization`` (``quantize`` options), then sampling with ``cache`` (calibrated on the quantized model). The
    step-cache techniques are the baseline with a cache; the combined recipes stack more."""
    pipeline = get_technique(base).build(context)
    if quantization is not None:
        pipeline = quantize(pipeline, **quantization)
    if cache is not None:
        pipeline = enable_cache_recipe(pipeline, cache)
    return pipeline


register_technique("baseline", baseline, "trained baseline (SDPA attention, dense MLP, fp32)")
for _attention in ATTENTION_TYPES[1:]:
    register_technique(
        f"attention-{_attention}",
        train_with_overrides,
        f"{_attention} attention, trained from scratch with the baseline's recipe",
        {"run_name": f"attention-{_attention}", "attention_type": _attention},
        trains=True,
    )
register_technique(
    "moe",
    train_with_overrides,
    "mixture of experts: 4 experts, top-2, expert width = MLP / 2 (dense-equal active compute), balance loss",
    {"run_name": "moe", "moe_num_experts": 4, "moe_top_k": 2},
    trains=True,
)
register_technique(
    "distill",
    distill_student,
    "half-depth student distilled from the baseline (output + last-block feature loss, alpha 0.5)",
    {"run_name": "distill"},
    trains=True,
)
register_technique("bf16", quantized, "bfloat16 weights and compute", {"backend": "torch", "weights": "bf16"})
register_technique(
    "int8", quantized, "torchao int8 weight-only (bf16 compute)", {"backend": "torchao", "weights": "int8"}
)
register_technique(
    "int8-dynamic",
    quantized,
    "torchao int8 weights + dynamic int8 activations (fp32 rest)",
    {"backend": "torchao", "weights": "int8", "activations": "int8", "dtype": "float32"},
)
register_technique("int4", quantized, "torchao int4 weight-only (CUDA only)", {"backend": "torchao", "weights": "int4"})
register_technique(
    "float8-dynamic",
    quantized,
    "torchao float8 weights + dynamic float8 activations (CUDA compute capability 8.9+)",
    {"backend": "torchao", "weights": "float8", "activations": "float8"},
)
register_technique(
    "quanto-int8", quantized, "optimum-quanto int8 weight-only", {"backend": "quanto", "weights": "int8"}
)
register_technique(
    "quanto-int4", quantized, "optimum-quanto int4 weight-only", {"backend": "quanto", "weights": "int4"}
)
register_technique(
    "quanto-w8a8",
    quantized,
    "optimum-quanto int8 weights + static int8 activations (calibrated on sampling runs)",
    {"backend": "quanto", "weights": "int8", "activations": "int8"},
)
# Step caches, tuned for the benchmark's 10-step DDIM sampling (calibrating methods calibrate at that step count).
CACHE_STEPS = 10
_CACHES: dict[str, tuple[dict[str, Any], str]] = {
    "cache-first-block-0.3": ({"method": "first-block", "threshold": 0.3}, "diffusers FirstBlockCache, threshold 0.3"),
    "cache-first-block-0.5": ({"method": "first-block", "threshold": 0.5}, "diffusers FirstBlockCache, threshold 0.5"),
    "cache-pab": ({"method": "pab"}, "diffusers Pyramid Attention Broadcast: attention reused every other step"),
    "cache-faster": ({"method": "faster"}, "diffusers FasterCache: attention reuse + unconditional-batch skipping"),
    "cache-taylorseer": (
        {"method": "taylorseer", "cache_interval": 3},
        "diffusers TaylorSeer: attention and MLP outputs Taylor-predicted on 2 of every 3 steps",
    ),
    "cache-magcache": (
        {"method": "magcache", "num_inference_steps": CACHE_STEPS},
        "diffusers MagCache, magnitude ratios calibrated on this model",
    ),
    "cache-block-schedule": (
        {"method": "block-schedule", "num_inference_steps": CACHE_STEPS},
        "per-step block reuse schedule (Learning-to-Cache style), calibrated; 40% of block steps reused",
    ),
}
for _name, (_cache, _description) in _CACHES.items():
    register_technique(_name, stacked, _description, {"base": "baseline", "cache": _cache})
for _part in ("heads", "mlp", "depth"):
    register_technique(
        f"prune-{_part}-50",
        pruned,
        f"structured pruning of 50% of the {_part} (L1 importance, per layer, no fine-tuning)",
        {_part: 0.5},
    )
    register_technique(
        f"prune-{_part}-50-recover",
        pruned_and_recovered,
        f"50% of the {_part} pruned, then fine-tuned (recovery steps) with distillation from the unpruned baseline",
        {"run_name": f"prune-{_part}-50-recover", _part: 0.5},
        trains=True,
    )

# Combined recipes: techniques that stack (their parts are the registered techniques above).
_INT8 = {"backend": "torchao", "weights": "int8"}
_BF16 = {"backend": "torch", "weights": "bf16"}
_TAYLORSEER = _CACHES["cache-taylorseer"][0]
_STACKS: dict[str, tuple[dict[str, Any], str]] = {
    "distill+int8": ({"base": "distill", "quantization": _INT8}, "half-depth distilled student, int8 weight-only"),
    "int8+cache-taylorseer": (
        {"base": "baseline", "quantization": _INT8, "cache": _TAYLORSEER},
        "baseline, int8 weight-only, TaylorSeer step cache",
    ),
    "int8+cache-block-schedule": (
        {"base": "baseline", "quantization": _INT8, "cache": _CACHES["cache-block-schedule"][0]},
        "baseline, int8 weight-only, calibrated block reuse schedule",
    ),
    "prune-depth-50-recover+int8": (
        {"base": "prune-depth-50-recover", "quantization": _INT8},
        "half the blocks pruned and recovered, int8 weight-only",
    ),
    "prune-depth-50-recover+bf16+cache-taylorseer": (
        {"base": "prune-depth-50-recover", "quantization": _BF16, "cache": _TAYLORSEER},
        "half the blocks pruned and recovered, bf16, TaylorSeer step cache",
    ),
    "prune-depth-50-recover+int8+cache-taylorseer": (
        {"base": "prune-depth-50-recover", "quantization": _INT8, "cache": _TAYLORSEER},
        "half the blocks pruned and recovered, int8 weight-only, TaylorSeer step cache",
    ),
}
for _name, (_options, _description) in _STACKS.items():
    register_technique(_name, stacked, _description, _options, trains=TECHNIQUES[_options["base"]].trains)
