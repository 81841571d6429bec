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
from ..models.runtimes import runtime_declaration
from ..pipelines.dit import DiTOptimumPipeline
from .caching import enable_cache_recipe
from .pruning import prune
from .quantization import quantize
from .runtimes import FORWARD_PATHS, apply_path, fastest_path, with_runtime
from .solvers import SOLVERS, with_solver


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

    def trained_path(self, name: str) -> str:
        """Where the pipeline of technique ``name`` (``"baseline"`` or a training technique) is saved, trained first
        if need be: the teacher a technique trains from (``pretrained=``)."""


@dataclass(frozen=True)
class Technique:
    """A registered technique: how to apply it, its default options and a one-line description."""

    name: str
    apply: Callable[..., DiTOptimumPipeline]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    trains: bool = False
    # trained from scratch under the whole recipe (attention types, MoE, a distilled student): minutes per model,
    # against seconds for what starts from a trained model (a recovery, a step-distillation round)
    from_scratch: bool = False
    # built by judging quality (the optimizer's search): nothing to build in a cost-only (--speed-only) run
    needs_quality: bool = False
    # rebuild(context, row) -> pipeline: how a release rebuilds the measured pipeline from its row, where building it
    # again would not give the same one (a search, which a release on another machine would redo); None: ``build``
    rebuild: Callable[..., DiTOptimumPipeline] | None = None

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
    from_scratch: bool = False,
    needs_quality: bool = False,
    rebuild: Callable[..., DiTOptimumPipeline] | None = None,
) -> Technique:
    """Add a technique under ``name`` (names are unique); ``options`` are passed to ``apply`` as keywords. A stack
    (``apply=stacked``) whose parts do not compose is refused here, before anything is built."""
    if name in TECHNIQUES:
        raise DiTOptimumError(f"A technique named {name!r} is already registered.")
    if apply is stacked:
        check_stack(dict(options or {}))
    technique = Technique(
        name, apply, description, dict(options or {}), trains or from_scratch, from_scratch, needs_quality, rebuild
    )
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


def solver_sampling(context: TechniqueContext, solver: str, num_inference_steps: int) -> DiTOptimumPipeline:
    """The trained baseline sampling with another ODE solver at fewer steps (its scheduler replaced, built from the
    baseline's noise schedule; the step count recorded in the pipeline), no retraining."""
    return with_solver(context.baseline(), solver, num_inference_steps)


# The parts of a stack in the order they apply; what each forward-path part composes with is declared by it
# (a runtime: ``RuntimeDeclaration.composes_with``; the measured choice takes its candidates' rule).
STACK_ORDER: tuple[str, ...] = ("base", "solver", "quantization", "runtime", "fastest", "cache")


def check_stack(parts: Mapping[str, Any]) -> None:
    """Refuse a stack whose parts do not compose (a runtime runs the whole forward as one graph: no torch
    quantization or step cache with it; a measured choice among runtimes likewise), naming the parts."""
    unknown = set(parts) - set(STACK_ORDER)
    if unknown:
        raise DiTOptimumError(f"Unknown stack parts {sorted(unknown)}; allowed values: {', '.join(STACK_ORDER)}.")
    given = {name for name, value in parts.items() if value is not None}
    for name in given & {"solver", "quantization", "runtime", "fastest", "cache"}:
        if not isinstance(parts[name], Mapping):
            raise DiTOptimumError(f"Stack part `{name}`={parts[name]!r} must be a mapping of its options.")
    if "runtime" in given:
        declaration = runtime_declaration(parts["runtime"].get("backend"))
        refused = sorted(given - {"runtime", *declaration.composes_with})
        if refused:
            raise DiTOptimumError(
                f"The {declaration.backend} runtime does not compose with {', '.join(refused)} (it composes with "
                f"{', '.join(declaration.composes_with)}): its graph is the whole forward, with its own precision."
            )
    if "fastest" in given and given & {"quantization", "runtime"}:
        raise DiTOptimumError("`fastest` chooses the forward path itself: drop `quantization` / `runtime`.")


def fastest_candidates(with_cache: bool) -> list[str]:
    """The forward paths a measured choice may pick in a stack: with a step cache, only torch paths (a runtime's
    graph holds the whole forward)."""
    from .runtimes import available_paths

    return available_paths("quantization") if with_cache else available_paths()


def stacked(
    context: TechniqueContext,
    base: str,
    quantization: Mapping[str, Any] | None = None,
    cache: Mapping[str, Any] | None = None,
    solver: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
    fastest: Mapping[str, Any] | None = None,
) -> DiTOptimumPipeline:
    """Techniques applied in turn (``STACK_ORDER``): the pipeline of technique ``base`` (trained once, then loaded),
    sampling with ``solver`` (``{"solver": name, "num_inference_steps": n}``, ``with_solver``), quantized with
    ``quantization`` (``quantize`` options) or run by ``runtime`` (``with_runtime`` options) or by the forward path
    that ``fastest`` (``{"batch_size": n}``) measures as fastest on this machine, then sampling with ``cache``
    (calibrated on the quantized model, at the pipeline's recorded steps where it has them). The step-cache
    techniques are the baseline with a cache; the combined recipes stack more."""
    check_stack({"base": base, "solver": solver, "quantization": quantization, "runtime": runtime,
                 "fastest": fastest, "cache": cache})  # fmt: skip
    pipeline = get_technique(base).build(context)
    if solver is not None:
        pipeline = with_solver(pipeline, **solver)
    if quantization is not None:
        pipeline = quantize(pipeline, **quantization)  # it samples as its base did (`rewrap` keeps the defaults)
    if runtime is not None:
        pipeline = with_runtime(pipeline, **runtime)
    if fastest is not None:
        choice = fastest_path(pipeline, candidates=fastest_candidates(cache is not None), **fastest)
        print(f"  {choice.summary()}", flush=True)
        pipeline = apply_path(pipeline, choice.name)
        pipeline.forward_path_choice = choice.to_dict()  # the benchmark row records it (why this path)
    if cache is not None:
        steps = pipeline.sampling_defaults.get("num_inference_steps")
        if steps is not None and "num_inference_steps" in cache:  # calibrated at the steps it will sample with
            cache = {**cache, "num_inference_steps": steps}
        pipeline = enable_cache_recipe(pipeline, cache)
    return pipeline


register_technique("baseline", baseline, "trained baseline (SDPA attention, dense MLP, fp32)")
for _attention in ATTENTION_TYPES[1:]:
    register_technique(
        f"attention-{_attention}",
        train_with_overrides,
        f"{_attention} attention, trained from scratch with the baseline's recipe",
        {"run_name": f"attention-{_attention}", "attention_type": _attention},
        from_scratch=True,
    )
register_technique(
    "moe",
    train_with_overrides,
    "mixture of experts: 4 experts, top-2, expert width = MLP / 2 (dense-equal active compute), balance loss",
    {"run_name": "moe", "moe_num_experts": 4, "moe_top_k": 2},
    from_scratch=True,
)
register_technique(
    "distill",
    distill_student,
    "half-depth student distilled from the baseline (output + last-block feature loss, alpha 0.5)",
    {"run_name": "distill"},
    from_scratch=True,
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
# The structured pruning fractions registered per part (each with and without recovery); blocks can go furthest.
PRUNING_FRACTIONS: dict[str, tuple[float, ...]] = {"heads": (0.5,), "mlp": (0.5,), "depth": (0.5, 0.75)}
for _part, _fractions in PRUNING_FRACTIONS.items():
    for _fraction in _fractions:
        _percent = round(100 * _fraction)
        register_technique(
            f"prune-{_part}-{_percent}",
            pruned,
            f"structured pruning of {_percent}% of the {_part} (L1 importance, per layer, no fine-tuning)",
            {_part: _fraction},
        )
        register_technique(
            f"prune-{_part}-{_percent}-recover",
            pruned_and_recovered,
            f"{_percent}% of the {_part} pruned, then fine-tuned (recovery steps) with distillation from the unpruned "
            "baseline",
            {"run_name": f"prune-{_part}-{_percent}-recover", _part: _fraction},
            trains=True,
        )

# Fewer steps with a better solver: the baseline (trained for DDIM, sampled by the benchmark at 10 steps) with its
# scheduler replaced; solvers.SOLVERS declares each solver's scheduler and options. 3-5 steps.
SOLVER_TECHNIQUES: dict[str, tuple[str, int]] = {
    "solver-dpmpp-2m-5": ("dpmpp-2m", 5),
    "solver-dpmpp-2m-3": ("dpmpp-2m", 3),
    "solver-dpmpp-3m-5": ("dpmpp-3m", 5),
    "solver-unipc-5": ("unipc", 5),
    "solver-unipc-3": ("unipc", 3),
    "solver-deis-5": ("deis", 5),
    "solver-euler-5": ("euler", 5),
    "solver-heun-3": ("heun", 3),
}
for _name, (_solver, _steps) in SOLVER_TECHNIQUES.items():
    _declared = SOLVERS[_solver]
    _calls = _declared.evaluations(_steps)
    register_technique(
        _name,
        solver_sampling,
        f"{_declared.description}: diffusers {_declared.scheduler}, {_steps} steps"
        + (f" ({_calls} network evaluations)" if _calls != _steps else ""),
        {"solver": _solver, "num_inference_steps": _steps},
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
    "int8+solver-dpmpp-2m-5": (
        {"base": "baseline", "solver": {"name": "dpmpp-2m", "num_inference_steps": 5}, "quantization": _INT8},
        "baseline sampled with DPM-Solver++ 2M at 5 steps, int8 weight-only",
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


# --- step distillation (issue 19): progressive distillation with the guidance distilled in -----------------------
# One round's trainer settings (the recipe's others stay), chosen on the default cell (DiT-XS/4 digits, N=300): a
# v-prediction student at 4 steps reached class accuracy 0.96 after 150 steps and 0.963 after 300 (baseline at 10
# guided steps 0.97 [0.947, 0.987]); an eps-prediction one 0.61 after 80 (v: 0.91). The first round's teacher is
# guided at the benchmark's baseline guidance.
STEP_DISTILLATION_ROUND: dict[str, Any] = {"steps": 300, "learning_rate": 5e-4}
BASELINE_GUIDANCE_SCALE = 2.0


def step_distilled(
    context: TechniqueContext,
    run_name: str,
    student_steps: int,
    teacher: str | None = None,
    teacher_guidance_scale: float = 1.0,
    **options: Any,
) -> DiTOptimumPipeline:
    """A student, initialised from ``teacher`` (a training technique's name; None: the baseline), trained to reach in
    one unguided DDIM step what the teacher reaches in two (guided at ``teacher_guidance_scale``): it samples at
    ``student_steps`` steps, one forward each, as its saved scheduler and sampling defaults say. Rounds chain: a
    student of ``2 N`` steps is the teacher of ``N`` (trained once, then loaded). ``options``: trainer settings
    replacing ``STEP_DISTILLATION_ROUND``'s."""
    return context.train(
        run_name,
        {},
        pretrained=context.trained_path(teacher or "baseline"),
        student_steps=student_steps,
        teacher_guidance_scale=teacher_guidance_scale,
        **{**STEP_DISTILLATION_ROUND, **options},
    )


# The progressive-distillation chains: each base's students at these steps, each round halving its teacher's (the
# first round's teacher is the base at 8 guided steps). Registered as `<base>+distill-steps-<n>` ("distill-steps-<n>"
# for the baseline's).
STUDENT_STEPS: tuple[int, ...] = (4, 2, 1)
STUDENT_BASES: dict[str, str] = {
    "baseline": "the baseline",
    "prune-depth-50-recover": "half the blocks pruned and recovered",
    "prune-depth-75-recover": "three quarters of the blocks pruned and recovered",
}


def student_name(base: str, steps: int) -> str:
    """The registered name of ``base``'s step-distilled student at ``steps`` steps."""
    return f"distill-steps-{steps}" if base == "baseline" else f"{base}+distill-steps-{steps}"


for _base, _what in STUDENT_BASES.items():
    for _index, _steps in enumerate(STUDENT_STEPS):
        _first = _index == 0
        _teacher = _base if _first else student_name(_base, STUDENT_STEPS[_index - 1])
        register_technique(
            student_name(_base, _steps),
            step_distilled,
            f"{_what}, progressively distilled to {_steps} unguided DDIM step{'s' if _steps > 1 else ''} "
            + (
                f"(from its {2 * _steps} guided ones, guidance {BASELINE_GUIDANCE_SCALE})"
                if _first
                else f"(from its {STUDENT_STEPS[_index - 1]}-step student)"
            ),
            {
                "run_name": student_name(_base, _steps),
                "student_steps": _steps,
                **({} if _teacher == "baseline" else {"teacher": _teacher}),
                **({"teacher_guidance_scale": BASELINE_GUIDANCE_SCALE} if _first else {}),
            },
            trains=True,
        )
_STEP_STACKS: dict[str, tuple[str, str]] = {
    "distill-steps-4+int8": ("distill-steps-4", "4-step distilled student, int8 weight-only"),
    "distill-steps-2+int8": ("distill-steps-2", "2-step distilled student, int8 weight-only"),
    "prune-depth-50-recover+distill-steps-4+int8": (
        "prune-depth-50-recover+distill-steps-4",
        "half the blocks pruned and recovered, distilled to 4 unguided steps, int8 weight-only",
    ),
    "prune-depth-50-recover+distill-steps-2+int8": (
        "prune-depth-50-recover+distill-steps-2",
        "half the blocks pruned and recovered, distilled to 2 unguided steps, int8 weight-only",
    ),
}
for _name, (_base, _description) in _STEP_STACKS.items():
    register_technique(_name, stacked, _description, {"base": _base, "quantization": _INT8}, trains=True)
# Whether a step cache still pays over a few steps (measured in BENCHMARKS.md, "Fewer sampling steps").
register_technique(
    "distill-steps-4+cache-taylorseer",
    stacked,
    "4-step distilled student sampling with the TaylorSeer step cache",
    {"base": "distill-steps-4", "cache": _TAYLORSEER},
    trains=True,
)


# --- exported CPU runtimes (issue 20): the transformer's whole forward as one OpenVINO / ONNX Runtime graph ---------
# Each runtime composes with a trained base and a solver, not with torch quantization or a step cache
# (RuntimeDeclaration.composes_with); the names match FORWARD_PATHS.
for _name, (_part, _options) in FORWARD_PATHS.items():
    if _part == "runtime":
        register_technique(
            _name,
            stacked,
            f"the baseline run by {_options['backend']} at {_options['precision']} (exported graph, saved beside the "
            "weights)",
            {"base": "baseline", "runtime": _options},
        )
# The forward path measured fastest on the machine the benchmark runs on (torch precisions and the runtimes), on the
# step-reduced stacks: the best stack is the best of each CPU, not of the one a table was written on.
FASTEST = {"batch_size": 16}  # the benchmark's sampling batch (SpeedSettings.batch_size); the students are unguided
for _base in ("distill-steps-2", "prune-depth-50-recover+distill-steps-4", "prune-depth-50-recover+distill-steps-2"):
    register_technique(
        f"{_base}+fastest",
        stacked,
        f"{TECHNIQUES[_base].description}; the forward path measured fastest on this machine",
        {"base": _base, "fastest": FASTEST},
        trains=True,
    )
