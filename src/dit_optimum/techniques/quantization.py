"""Quantization and half precision behind one function: ``quantize(pipe_or_model, backend, weights, activations)``.

Backends and what they support (weights, activations):

- ``torch``: ``bf16`` / ``fp16`` casts (no activations option). Serializable.
- ``torchao``: ``int8`` weights (weight-only, or with ``activations="int8"``: dynamic per-token activations),
  ``float8`` (weight-only, or with ``float8`` dynamic activations; needs a CUDA GPU of compute capability 8.9+),
  ``int4`` weight-only (CUDA only). Loaded through diffusers' ``TorchAoConfig``, which runs the non-quantized
  layers in bfloat16: serializable, and a plain ``from_pretrained`` of the saved folder is bit-identical.
- ``quanto``: ``int8`` / ``int4`` / ``float8`` weight-only through diffusers' ``QuantoConfig``: serializable;
  with ``activations`` (``int8`` / ``float8``, static scales from a calibration pass over real sampling steps):
  native optimum-quanto, runs but cannot be saved as a diffusers pipeline.

Kept in float by default (``DEFAULT_KEEP_FLOAT``): the patch embedding, the timestep/class embedding and the
final layer; they are under 3% of DiT-S/2's weights and sit at the input and output, where errors propagate
furthest. The adaLN modulation linears are quantized: they are a third of the weights (see BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..errors import DiTOptimumError
from ..models.resources import check_resources
from ..models.transformer import UNSERIALIZABLE_ATTRIBUTE, DiTOptimumTransformer2DModel
from ..pipelines.dit import MAX_GUIDANCE_SCALE, DiTOptimumPipeline
from ..utils import check_number, is_integer
from .common import rewrap, unwrap

BACKENDS: tuple[str, ...] = ("torch", "torchao", "quanto")
WEIGHT_DTYPES: tuple[str, ...] = ("int8", "int4", "float8", "bf16", "fp16")
ACTIVATION_DTYPES: tuple[str | None, ...] = (None, "int8", "float8")
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ("pos_embed", "conditioning_embedding", "proj_out_1", "proj_out_2")

# (backend, weights, activations) -> (serializable, needs CUDA compute capability or None)
SUPPORTED: dict[tuple[str, str, str | None], tuple[bool, tuple[int, int] | None]] = {
    ("torch", "bf16", None): (True, None),
    ("torch", "fp16", None): (True, None),
    ("torchao", "int8", None): (True, None),
    ("torchao", "int8", "int8"): (True, None),
    ("torchao", "int4", None): (True, (8, 0)),
    ("torchao", "float8", None): (True, (8, 9)),
    ("torchao", "float8", "float8"): (True, (8, 9)),
    ("quanto", "int8", None): (True, None),
    ("quanto", "int4", None): (True, None),
    ("quanto", "float8", None): (True, None),
    ("quanto", "int8", "int8"): (False, None),
    ("quanto", "float8", "float8"): (False, None),
    ("quanto", "int8", "float8"): (False, None),
}


@dataclass(frozen=True)
class CalibrationSettings:
    """How static activation scales are calibrated: full sampling runs over random classes (seeded).

    Each run samples ``batch_size`` images for ``num_inference_steps`` steps, so the observers see the whole
    timestep range and many classes, with guidance as at inference.
    """

    num_batches: int = 4
    batch_size: int = 4
    num_inference_steps: int = 10
    guidance_scale: float = 4.0
    seed: int = 0


# The observers' scales settle within a few runs (momentum 0.9): more runs only add time.
MAX_CALIBRATION_BATCHES = 1000


def check_calibration(
    calibration: CalibrationSettings,
    config: Mapping,
    max_steps: int,
    guided: bool = True,
) -> CalibrationSettings:
    """``calibration`` if it is a ``CalibrationSettings`` whose runs this machine can do, before any work: its batch
    (doubled with guidance) and seed through the package's resource check, the runs and steps bounded (``max_steps``:
    the scheduler's training timesteps), guidance a finite number in [1, float16's largest]. Each refusal names the
    field and the allowed values."""
    if not isinstance(calibration, CalibrationSettings):
        names = ", ".join(field.name for field in fields(CalibrationSettings))
        kind = "a dict" if isinstance(calibration, Mapping) else type(calibration).__name__
        raise DiTOptimumError(
            f"`calibration` must be a CalibrationSettings (dit_optimum.CalibrationSettings({names})) or None, "
            f"got {kind}: {calibration!r:.200}."
        )
    if not is_integer(calibration.num_batches) or not 1 <= calibration.num_batches <= MAX_CALIBRATION_BATCHES:
        raise DiTOptimumError(
            f"`calibration.num_batches`={calibration.num_batches!r} must be an integer in "
            f"1..{MAX_CALIBRATION_BATCHES} (sampling runs; the activation scales settle within a few)."
        )
    steps = calibration.num_inference_steps
    if not is_integer(steps) or not 1 <= steps <= max_steps:
        raise DiTOptimumError(
            f"`calibration.num_inference_steps`={steps!r} must be an integer in 1..{max_steps} (the scheduler's "
            "training timesteps)."
        )
    check_number("calibration.guidance_scale", calibration.guidance_scale, 1, MAX_GUIDANCE_SCALE)
    check_resources(seed=calibration.seed, parameter="calibration.seed")
    check_resources(
        config,
        images=calibration.batch_size,
        guided=guided and calibration.guidance_scale > 1,
        parameter="calibration.batch_size",
    )
    return calibration


def supported_options() -> list[str]:
    """Human-readable list of valid (backend, weights, activations) combinations."""
    return [f"backend={b!r}, weights={w!r}, activations={a!r}" for b, w, a in SUPPORTED]


def _check_options(backend: str, weights: str, activations: str | None, device: torch.device) -> None:
    if backend not in BACKENDS:
        raise DiTOptimumError(f"Unknown `backend`={backend!r}; allowed values: {', '.join(BACKENDS)}.")
    if weights not in WEIGHT_DTYPES:
        raise DiTOptimumError(f"Unknown `weights`={weights!r}; allowed values: {', '.join(WEIGHT_DTYPES)}.")
    if activations not in ACTIVATION_DTYPES:
        raise DiTOptimumError(f"Unknown `activations`={activations!r}; allowed values: None, 'int8', 'float8'.")
    key = (backend, weights, activations)
    if key not in SUPPORTED:
        raise DiTOptimumError(
            f"Unsupported combination backend={backend!r}, weights={weights!r}, activations={activations!r}; "
            f"supported: {'; '.join(supported_options())}."
        )
    capability = SUPPORTED[key][1]
    if capability is not None and (device.type != "cuda" or torch.cuda.get_device_capability(device) < capability):
        raise DiTOptimumError(
            f"backend={backend!r} with weights={weights!r}, activations={activations!r} needs a CUDA GPU of compute "
            f"capability {capability[0]}.{capability[1]}+; on this device use backend='quanto' with "
            f"weights={weights!r} (or weights='int8')."
        )


FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _float_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    # Accept the dtype's name ("bfloat16", "torch.float16") as the CLI and JSON configs give it.
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise DiTOptimumError(f"Unknown `dtype`={dtype!r}; allowed values: {', '.join(FLOAT_DTYPES)} (or None).")
    return FLOAT_DTYPES[name]


def _check_keep_float(model: nn.Module, keep_float: Sequence[str]) -> None:
    # A prefix that matches no module would silently quantize what the user meant to keep.
    if isinstance(keep_float, str):
        raise DiTOptimumError(f"`keep_float`={keep_float!r} must be a list of module-name prefixes, not a string.")
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in keep_float if not any(n == p or n.startswith(f"{p}.") for n in names)]
    if unmatched:
        top_level = sorted({name.split(".")[0] for name in names})
        raise DiTOptimumError(
            f"`keep_float` entries {unmatched} match no module of the model; module names start with: "
            f"{', '.join(top_level)} (e.g. 'transformer_blocks.0.attn1')."
        )


def _reload_with_quantization_config(
    model: DiTOptimumTransformer2DModel, quantization_config, torch_dtype: torch.dtype
) -> DiTOptimumTransformer2DModel:
    # diffusers' quantizers (and dtype casts) apply at load time; doing the same here makes the result identical to
    # what a plain `from_pretrained` of the saved folder rebuilds.
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = DiTOptimumTransformer2DModel.from_pretrained(
            folder, quantization_config=quantization_config, torch_dtype=torch_dtype
        )
    processors = model.attn_processors
    loaded.set_attn_processor(processors)
    return loaded.to(model.device).eval()


def _quanto_local_names(model: nn.Module, keep_float: Sequence[str]) -> list[str]:
    # diffusers' quanto integration skips Linear layers by their local name: translate full-name prefixes and make
    # sure no layer that should be quantized shares such a name.
    keep, quantize = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            local = name.rsplit(".", 1)[-1]
            (keep if any(name == p or name.startswith(p + ".") for p in keep_float) else quantize).add(local)
    clash = keep & quantize
    if clash:
        raise DiTOptimumError(
            "`keep_float` cannot be expressed for backend='quanto' weight-only: "
            f"layer names {sorted(clash)} occur both inside and outside the kept modules; "
            "use backend='torchao' for this selection."
        )
    return sorted(keep)


def _torchao_config(weights: str, activations: str | None):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    return {
        ("int8", None): Int8WeightOnlyConfig,
        ("int8", "int8"): Int8DynamicActivationInt8WeightConfig,
        ("int4", None): Int4WeightOnlyConfig,
        ("float8", None): Float8WeightOnlyConfig,
        ("float8", "float8"): Float8DynamicActivationFloat8WeightConfig,
    }[(weights, activations)]()


def calibrate(pipeline: DiTOptimumPipeline, settings: CalibrationSettings) -> None:
    """Run full sampling passes (latent output, no decoding) so that activation observers see real inputs."""
    generator = torch.Generator().manual_seed(settings.seed)
    num_classes = pipeline.transformer.config.num_embeds_ada_norm
    guidance = settings.guidance_scale if pipeline.transformer.null_class_label is not None else 1.0
    for _ in range(settings.num_batches):
        labels = torch.randint(0, num_classes, (settings.batch_size,), generator=generator).tolist()
        pipeline(
            labels,
            guidance_scale=guidance,
            num_inference_steps=settings.num_inference_steps,
            generator=generator,
            output_type="latent",
        )


def _quanto_static(
    model: DiTOptimumTransformer2DModel,
    pipeline: DiTOptimumPipeline,
    weights: str,
    activations: str,
    keep_float: Sequence[str],
    calibration: CalibrationSettings,
) -> DiTOptimumTransformer2DModel:
    from optimum.quanto import Calibration, freeze, qfloat8, qint8
    from optimum.quanto import quantize as quanto_quantize

    dtypes = {"int8": qint8, "float8": qfloat8}
    exclude = [pattern for prefix in keep_float for pattern in (prefix, f"{prefix}.*")]
    quanto_quantize(model, weights=dtypes[weights], activations=dtypes[activations], exclude=exclude)
    with Calibration(momentum=0.9):
        calibrate(pipeline, calibration)
    freeze(model)
    setattr(
        model,
        UNSERIALIZABLE_ATTRIBUTE,
        "optimum-quanto activation quantization (static, calibrated scales) cannot be saved as a diffusers "
        "pipeline; for a saveable int8 model with quantized activations use backend='torchao', weights='int8', "
        "activations='int8' (dynamic scales), or quanto weight-only (activations=None).",
    )
    return model


def quantize(
    pipe_or_model: DiTOptimumPipeline | DiTOptimumTransformer2DModel,
    backend: str = "torchao",
    weights: str = "int8",
    activations: str | None = None,
    calibration: CalibrationSettings | None = None,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
    dtype: torch.dtype | None = None,
    compile: bool = False,
) -> DiTOptimumPipeline | DiTOptimumTransformer2DModel:
    """Quantize (or cast to half precision) the transformer of a pipeline, or a bare transformer.

    Returns a new pipeline (sharing VAE and scheduler) or a new model; the input is left unchanged.
    ``keep_float`` lists module-name prefixes left in float; ``calibration`` sets the sampling passes used for
    static activation scales (quanto with activations); ``dtype`` is the floating dtype of the non-quantized
    layers and activations (default: bfloat16 for torchao, which a plain ``from_pretrained`` reproduces; the
    model's dtype for quanto; reload a torchao model saved with another dtype with ``torch_dtype=<that dtype>``).
    ``compile`` wraps the forward in ``torch.compile`` with weight freezing (``compile_for_inference``; the module
    stays saveable). Unsupported combinations
    raise ``ValueError`` listing the supported ones.
    """
    is_pipeline = isinstance(pipe_or_model, DiTOptimumPipeline)
    model = unwrap(pipe_or_model)
    if getattr(model, "runtime", None) is not None:
        raise DiTOptimumError(
            f"This model runs with {model.runtime.describe()}, which chooses its own precision: quantize before "
            "`enable_runtime`, or call `disable_runtime()` first."
        )
    if hasattr(model, "check_unfused"):
        model.check_unfused("quantizing")  # the fused copy would stay in float beside the quantized weights
    _check_options(backend, weights, activations, model.device)
    dtype = _float_dtype(dtype)
    _check_keep_float(model, keep_float)
    if dtype is not None and (backend == "torch" or not dtype.is_floating_point):
        raise DiTOptimumError(
            f"`dtype`={dtype} must be a floating dtype, and backend='torch' takes its dtype from `weights`."
        )
    if calibration is not None and not (backend == "quanto" and activations is not None):
        raise DiTOptimumError(
            "`calibration` only applies to backend='quanto' with activations (torchao scales are dynamic)."
        )
    if backend == "quanto" and activations is not None:
        from diffusers import DDIMScheduler

        # a bare model is calibrated through a pipeline with the default scheduler (DDIM, as DiTOptimumPipeline's)
        scheduler = pipe_or_model.scheduler if is_pipeline else DDIMScheduler()
        calibration = check_calibration(
            CalibrationSettings() if calibration is None else calibration,
            model.config,
            scheduler.config.num_train_timesteps,
            guided=model.null_class_label is not None,
        )

    if backend == "torch":
        # Loaded the way diffusers reloads it (e.g. the positional table stays float32), so reloads are identical.
        quantized = _reload_with_quantization_config(
            model, None, {"bf16": torch.bfloat16, "fp16": torch.float16}[weights]
        )
    elif backend == "torchao":
        from diffusers import TorchAoConfig

        config = TorchAoConfig(_torchao_config(weights, activations), modules_to_not_convert=list(keep_float))
        # diffusers loads torchao models with bfloat16 for the non-quantized layers; quantizing the same way keeps
        # a plain `from_pretrained` of the saved folder bit-identical (and bf16 is the fast path on CPU and GPU).
        quantized = _reload_with_quantization_config(model, config, dtype or torch.bfloat16)
    elif activations is None:
        from diffusers import QuantoConfig

        config = QuantoConfig(weights_dtype=weights, modules_to_not_convert=_quanto_local_names(model, keep_float))
        quantized = _reload_with_quantization_config(model, config, dtype or model.dtype)
    else:
        quantized = copy.deepcopy(model).to(dtype or model.dtype).eval()
        calibration_pipe = (
            rewrap(pipe_or_model, quantized) if is_pipeline else DiTOptimumPipeline(transformer=quantized)
        )
        calibration_pipe.set_progress_bar_config(disable=True)
        quantized = _quanto_static(quantized, calibration_pipe, weights, activations, keep_float, calibration)
    quantized.eval()
    if compile:
        compile_for_inference(quantized)
    return rewrap(pipe_or_model, quantized)


def compile_for_inference(model: nn.Module) -> nn.Module:
    """``torch.compile`` the module's forward in place for inference: one specialised graph per input shape
    (dynamic-shape kernels ran up to 2x slower on CPU, benchmarks/compression.py) and inductor weight freezing
    (weights become constants, so bf16 linears get prepacked oneDNN kernels and int8 dynamic quantization fuses;
    benchmarks/fast_paths.py). Gradients and later weight changes are not seen by the compiled graph."""
    model.compile(dynamic=False, options={"freezing": True})
    return model


def recommended_quantization(device: torch.device | str = "cpu") -> dict[str, object]:
    """``quantize`` options for the fastest saveable forward on this machine, by what its matmul units have
    (measured with benchmarks/fast_paths.py, DiT-S/2 at 256 tokens, batch 8; BENCHMARKS.md "Fast paths"):

    - CUDA, or a CPU with AMX bf16 tiles (Intel Xeon 4th gen+): bf16 + compile (on the AMX Xeon bf16 + compile was
      the fastest, 2.31x; torchao w8a8 + compile reached 1.53x);
    - a CPU with AVX-512 VNNI but no AMX (e.g. AMD EPYC Zen 4): torchao int8 weights + dynamic int8 activations in
      fp32, compiled (3.05x there, against 2.71x for bf16 + compile);
    - anything else: torchao int8 weight-only, eager (no compile step; 2.4x on the AMD EPYC).
    """
    from ..evaluation.hardware import cpu_features

    if torch.device(device).type == "cuda":
        return {"backend": "torch", "weights": "bf16", "compile": True}
    features = cpu_features()
    if features["amx_bf16"]:
        return {"backend": "torch", "weights": "bf16", "compile": True}
    if features["avx512_vnni"]:
        return {"backend": "torchao", "weights": "int8", "activations": "int8", "dtype": "float32", "compile": True}
    return {"backend": "torchao", "weights": "int8"}
