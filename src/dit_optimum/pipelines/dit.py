"""DiTOptimumPipeline: class-conditional DiT sampling for any class count, in latent or pixel space."""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..errors import DiTOptimumError, ModelFileError, keeping_type
from ..models.autoencoder import IdentityAutoencoder
from ..models.lora import check_no_lora_layers
from ..models.resources import check_resources
from ..models.transformer import DiTOptimumTransformer2DModel, check_finite_weights
from ..schemas import (
    CLASS_NAME,
    ID2LABEL,
    MODEL_INDEX,
    FileContentError,
    SchemaError,
    check_component_folder,
    file_error,
    read_json_file,
    validate,
)
from ..utils import check_source, check_variant, first_line, is_integer, pop_unsupported_save_options
from ..utils import save_directory as save_directory_into
from .lora import DiTLoraLoaderMixin

OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")
# Saved folders name diffusers' own class so that plain `DiffusionPipeline.from_pretrained` resolves them.
SAVED_PIPELINE_CLASS = "DiTPipeline"
# One re-entrant lock per transformer (or transformer-less pipeline), kept outside the object so that it still
# deep-copies and pickles.
_CALL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CALL_LOCKS_GUARD = threading.Lock()
# The largest guidance scale an option may ask for before any pipeline is built: float16's largest number (a larger
# scale is inf in a half-precision pipeline's guided noise, so every image would be NaN). A pipeline call allows up
# to its own dtype's largest number.
MAX_GUIDANCE_SCALE = float(torch.finfo(torch.float16).max)
# What a call samples with when neither it nor the pipeline's recorded defaults say: diffusers' DiTPipeline defaults.
DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 4.0
# The config keys `set_sampling_defaults` records (written to model_index.json only when recorded).
SAMPLING_DEFAULT_KEYS = ("num_inference_steps", "guidance_scale")


# The largest `num_train_timesteps` a scheduler config may give: diffusers builds its tables of that length when it
# builds the scheduler (10**8 is gigabytes), and DiT checkpoints train with 1000.
MAX_TRAIN_TIMESTEPS = 100_000
# A VAE's `scaling_factor` (latents are divided by it before decoding; published VAEs use 0.13-1.6) and the largest
# `shift_factor` magnitude.
VAE_SCALING_RANGE = (1e-4, 1e4)
MAX_VAE_SHIFT = 1e4

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_SPACINGS = ("leading", "linspace", "trailing")
_FINAL_SIGMAS = ("zero", "sigma_min")
_FLAGS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "lower_order_final",
          "euler_at_final", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting")  # fmt: skip
_OPTIONAL_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# The values diffusers' schedulers that DiT samples with accept for their choice keys, by class (another class's
# choice keys are its own business; its numbers are still checked below).
_SCHEDULER_CHOICES: dict[str, dict[str, tuple[Any, ...]]] = {
    "DDIMScheduler": {"beta_schedule": _BETA_SCHEDULES, "prediction_type": _PREDICTIONS, "timestep_spacing": _SPACINGS},
    "DDPMScheduler": {
        "beta_schedule": (*_BETA_SCHEDULES, "laplace", "sigmoid"),
        "prediction_type": _PREDICTIONS,
        "timestep_spacing": _SPACINGS,
        "variance_type": (
            "fixed_small",
            "fixed_small_log",
            "fixed_large",
            "fixed_large_log",
            "learned",
            "learned_range",
        ),
    },
    "DPMSolverMultistepScheduler": {
        "beta_schedule": _BETA_SCHEDULES,
        "prediction_type": (*_PREDICTIONS, "flow_prediction"),
        "timestep_spacing": _SPACINGS,
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis"),
        "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
        "final_sigmas_type": _FINAL_SIGMAS,
        "variance_type": (None, "learned", "learned_range"),
        "time_shift_type": ("exponential",),
    },
    "EulerDiscreteScheduler": {
        "beta_schedule": _BETA_SCHEDULES,
        "prediction_type": (*_PREDICTIONS, "original_sample"),
        "timestep_spacing": _SPACINGS,
        "interpolation_type": ("linear", "log_linear"),
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": _FINAL_SIGMAS,
    },
    # the few-step solvers (techniques.solvers); solver/algorithm names diffusers maps to its own are accepted
    "UniPCMultistepScheduler": {
        "beta_schedule": _BETA_SCHEDULES,
        "prediction_type": (*_PREDICTIONS, "flow_prediction"),
        "timestep_spacing": _SPACINGS,
        "solver_type": ("bh1", "bh2", "midpoint", "heun", "logrho"),
        "final_sigmas_type": _FINAL_SIGMAS,
        "time_shift_type": ("exponential", "linear"),
    },
    "DEISMultistepScheduler": {
        "beta_schedule": _BETA_SCHEDULES,
        "prediction_type": (*_PREDICTIONS, "flow_prediction"),
        "timestep_spacing": _SPACINGS,
        "algorithm_type": ("deis", "dpmsolver", "dpmsolver++"),
        "solver_type": ("logrho", "midpoint", "heun", "bh1", "bh2"),
        "time_shift_type": ("exponential",),
    },
    "HeunDiscreteScheduler": {
        "beta_schedule": (*_BETA_SCHEDULES, "exp"),
        "prediction_type": _PREDICTIONS,
        "timestep_spacing": _SPACINGS,
    },
}


def _is_finite(value: Any) -> bool:
    """A finite real number, not a boolean (an integer too large for a float is not finite here)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _valid_steps(value: Any, max_steps: int) -> bool:
    """An integer step count in 1..``max_steps`` (the scheduler's ``num_train_timesteps``)."""
    return is_integer(value) and 1 <= value <= max_steps


def _valid_guidance(value: Any, largest: float) -> bool:
    """A finite guidance scale in [1, ``largest``] (1 disables guidance), not a boolean."""
    try:
        return _is_finite(value) and 1 <= float(value) <= largest
    except (TypeError, ValueError):  # a Real that is not convertible to a float
        return False


def _is_faster_cache(model: Any) -> bool:
    """Whether ``model`` has diffusers' FasterCache on (it assumes guided batches)."""
    return type(getattr(model, "_cache_config", None)).__name__ == "FasterCacheConfig"


def _copied_cache_config(config: Any, memo: dict) -> Any:
    """A deep copy of a cache config for a deep-copied pipeline: callbacks diffusers filled in when the cache was
    applied (FasterCache's weight callbacks, closures over the original config and so the original pipeline's
    timestep) are emptied, so that applying the copy fills in its own."""
    copied = copy.deepcopy(config, memo)
    for name, value in list(vars(copied).items()):
        if callable(value) and ".<locals>." in getattr(value, "__qualname__", "") and "apply_" in value.__qualname__:
            setattr(copied, name, None)
    return copied


def _shown(value: Any) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):  # never read its values (a meta tensor has none)
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _train_steps(config: Mapping[str, Any]) -> int:
    return config.get("num_train_timesteps", 1000)


def _betas_ok(value: Any, config: Mapping[str, Any]) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return False  # no values to read
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        value = value.tolist()
    return (
        isinstance(value, (list, tuple))
        and len(value) == _train_steps(config)
        and all(_is_finite(beta) and 0 <= beta < 1 for beta in value)
    )


def _beta_bound_ok(value: Any, config: Mapping[str, Any]) -> bool:
    # unused (may be null) when the config gives its betas
    return (value is None and config.get("trained_betas") is not None) or (_is_finite(value) and 0 <= value < 1)


def _positive(value: Any, config: Mapping[str, Any]) -> bool:
    return _is_finite(value) and value > 0


def _flag(value: Any, config: Mapping[str, Any]) -> bool:
    return isinstance(value, bool)


# key -> (accepts(value, config), its allowed values in words (a function of the config where they depend on it)),
# in the order checked: `num_train_timesteps` first, as other keys' bounds depend on it.
_SCHEDULER_KEYS: dict[str, tuple[Any, Any]] = {
    "num_train_timesteps": (
        lambda v, c: is_integer(v) and 1 <= v <= MAX_TRAIN_TIMESTEPS,
        f"an integer in 1..{MAX_TRAIN_TIMESTEPS} (it must be >= 1; diffusers builds tables of that length)",
    ),
    "trained_betas": (
        _betas_ok,
        lambda c: f"null or a flat list of {_train_steps(c)} (`num_train_timesteps`) finite numbers in [0, 1)",
    ),
    "beta_start": (_beta_bound_ok, "a finite number in [0, 1)"),
    "beta_end": (_beta_bound_ok, "a finite number in [0, 1)"),
    "steps_offset": (
        lambda v, c: is_integer(v) and 0 <= v < _train_steps(c),
        lambda c: f"an integer in 0..{_train_steps(c) - 1} (below `num_train_timesteps`)",
    ),
    "clip_sample_range": (_positive, "a finite number > 0 (samples are clipped to [-range, range])"),
    "dynamic_thresholding_ratio": (
        lambda v, c: _is_finite(v) and 0 <= v <= 1,
        "a finite number in [0, 1] (a quantile)",
    ),
    "sample_max_value": (_positive, "a finite number > 0"),
    "solver_order": (lambda v, c: is_integer(v) and 1 <= v <= 3, "1, 2 or 3"),
    "flow_shift": (_positive, "a finite number > 0"),
    "lambda_min_clipped": (
        lambda v, c: isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v) and v < math.inf,
        "a number below inf (-inf disables clipping)",
    ),
    "sigma_min": (lambda v, c: v is None or _positive(v, c), "null or a finite number > 0"),
    "sigma_max": (lambda v, c: v is None or _positive(v, c), "null or a finite number > 0"),
    **dict.fromkeys(_FLAGS, (_flag, "true or false")),
    **dict.fromkeys(_OPTIONAL_FLAGS, (lambda v, c: v is None or isinstance(v, bool), "true, false or null")),
}


def scheduler_config_problem(config: Mapping[str, Any], class_name: str | None = None) -> str | None:
    """What is wrong with a scheduler config, as "`key`=value; allowed values: ...", or None: every key the DDIM,
    DDPM, DPM-Solver, UniPC, DEIS, Euler and Heun schedulers read (their choice keys by ``class_name``, default the
    config's ``_class_name``) that would fail, allocate without bound or sample NaN or constant images."""
    for key, (accepts, allowed) in _SCHEDULER_KEYS.items():
        if key in config and not accepts(config[key], config):
            allowed = allowed(config) if callable(allowed) else allowed
            return f"`{key}`={_shown(config[key])}; allowed values: {allowed}"
    choices = _SCHEDULER_CHOICES.get(class_name or config.get("_class_name"), {})
    for key, allowed in choices.items():
        if key in config and (not isinstance(config[key], (str, type(None))) or config[key] not in allowed):
            shown = ", ".join("null" if value is None else value for value in allowed)
            return f"`{key}`={_shown(config[key])}; allowed values: {shown}"
    return None


def check_scheduler_config(config: Mapping[str, Any], where: str, class_name: str | None = None) -> None:
    """Refuse a scheduler config that cannot sample (``scheduler_config_problem``); the error names ``where``, the
    key and its allowed values."""
    problem = scheduler_config_problem(config, class_name)
    if problem:
        raise DiTOptimumError(f"The scheduler config ({where}) has {problem}.")


def _scheduler_problem(scheduler: Any) -> str | None:
    problem = scheduler_config_problem(scheduler.config, type(scheduler).__name__)
    if problem:
        return problem
    for key in ("betas", "alphas_cumprod"):
        table = getattr(scheduler, key, None)
        if torch.is_tensor(table) and table.numel() and not bool(torch.isfinite(table).all()):
            return f"non-finite `{key}` (check its config's betas)"
    table = getattr(scheduler, "betas", None)
    if torch.is_tensor(table) and table.numel() and not bool((table > 0).any()):
        return "`betas` that are all 0 (the schedule adds no noise: check its config's betas)"
    return None


def check_scheduler(scheduler: Any, where: str = "scheduler") -> None:
    """``check_scheduler_config`` on a built scheduler, its ``betas`` / ``alphas_cumprod`` tables finite and its
    betas not all 0."""
    problem = _scheduler_problem(scheduler)
    if problem:
        raise DiTOptimumError(f"The scheduler ({where}) has {problem}.")


def _vae_problem(config: Mapping[str, Any], loaded: bool = True) -> str | None:
    # `loaded`: a built VAE's config (its scaling_factor must be there); else a saved file (a missing key: default)
    low, high = VAE_SCALING_RANGE
    if loaded or "scaling_factor" in config:
        value = config.get("scaling_factor")
        if not (_is_finite(value) and low <= value <= high):
            return (
                f"`scaling_factor`={_shown(value)}; allowed values: a finite number in [{low:g}, {high:g}] "
                "(latents are divided by it before decoding)"
            )
    value = config.get("shift_factor")
    if value is not None and not (_is_finite(value) and abs(value) <= MAX_VAE_SHIFT):
        bound = f"{MAX_VAE_SHIFT:g}"
        return f"`shift_factor`={_shown(value)}; allowed values: null or a finite number in [-{bound}, {bound}]"
    if "norm_num_groups" in config:
        value, channels = config["norm_num_groups"], config.get("block_out_channels")
        channels = [c for c in channels if is_integer(c)] if isinstance(channels, (list, tuple)) else []
        if not (is_integer(value) and value >= 1 and all(c % value == 0 for c in channels)):
            return (
                f"`norm_num_groups`={_shown(value)}; allowed values: an integer >= 1 that divides every "
                f"`block_out_channels` entry ({channels})"
            )
    return None


def check_vae(vae: Any, where: str = "vae") -> None:
    """Refuse a VAE whose config would decode NaN or fail: ``scaling_factor`` finite in ``VAE_SCALING_RANGE``,
    ``shift_factor`` null or finite; the error names ``where``, the key and the allowed values."""
    config = getattr(vae, "config", None)
    problem = _vae_problem(config if isinstance(config, Mapping) else {})
    if problem:
        raise DiTOptimumError(f"The VAE ({where}) has {problem}.")


def _class_index(key: Any) -> int | None:
    """An ``id2label`` key's class index: an integer, an integral finite number or a string of digits; None for
    anything else (booleans, fractions, other strings)."""
    if isinstance(key, bool):
        return None
    if is_integer(key):
        return int(key)
    if isinstance(key, numbers.Real):
        return int(key) if _is_finite(key) and float(key).is_integer() else None
    if isinstance(key, str) and re.fullmatch(r"[0-9]+", key.strip(), flags=re.ASCII):
        try:
            return int(key.strip())
        except ValueError:  # more digits than Python converts
            return None
    return None


def _normalize_id2label(id2label: Mapping[Any, Any] | None, num_classes: int) -> dict[str, str] | None:
    if id2label is None:
        return None
    if not isinstance(id2label, Mapping):
        raise DiTOptimumError(
            f"`id2label` must be a mapping of class index to name (e.g. {{0: 'cat'}}), got {type(id2label).__name__}."
        )
    normalized: dict[str, str] = {}
    keys: dict[int, Any] = {}
    longest = CLASS_NAME.max_length  # what from_pretrained accepts: never save what would not load
    for key, value in id2label.items():
        index = _class_index(key)
        if index is None:
            raise DiTOptimumError(
                f"`id2label` key {_shown(key)} is not a class index; allowed values: integers or strings of digits "
                f"in 0..{num_classes - 1} (not booleans or fractions)."
            )
        if not 0 <= index < num_classes:
            raise DiTOptimumError(
                f"`id2label` key {index} is outside the model's classes; allowed values: 0..{num_classes - 1}."
            )
        if index in keys:
            raise DiTOptimumError(
                f"`id2label` names class {index} twice (keys {keys[index]!r} and {key!r}); give each class one key."
            )
        keys[index] = key
        if isinstance(value, str):
            name = value
        elif _is_finite(value):  # a number as a name (JSON files of class names may hold them)
            name = str(value)
        else:
            raise DiTOptimumError(
                f"`id2label` name of class {index} is {_shown(value)}; allowed values: a string (or a number)."
            )
        if len(name) > longest:
            raise DiTOptimumError(
                f"`id2label` name of class {index} is {len(name)} characters long; allowed values: names of at most "
                f"{longest} characters (what a saved pipeline's model_index.json may hold)."
            )
        normalized[str(index)] = name
    # DiTPipeline looks classes up by every comma-separated alias: an alias naming two classes would pick one.
    seen: dict[str, str] = {}
    for index, value in normalized.items():
        for alias in (part.strip() for part in value.split(",")):
            if alias in seen and seen[alias] != index:
                raise DiTOptimumError(
                    f"`id2label` has duplicate name {alias!r} (classes {seen[alias]} and {index}); "
                    "names must be unique."
                )
            seen[alias] = index
    normalized = dict(sorted(normalized.items(), key=lambda item: int(item[0])))
    validate(normalized, ID2LABEL, "`id2label`")  # exactly what from_pretrained reads back from model_index.json
    return normalized


def _saved_config(folder: Path, name: str, file: str) -> tuple[Path, dict[str, Any] | None, str | None]:
    # A readable local component config and the class model_index.json builds from it (None where unknown).
    path = folder / name / file
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
        entry = json.loads((folder / "model_index.json").read_text()).get(name)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return path, None, None  # diffusers reports an unreadable config naming the file
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
    return path, config if isinstance(config, dict) else None, class_name


def _check_saved_scheduler(folder: Path) -> None:
    # Before diffusers builds it (a 0-step config fails there with an IndexError, 10**8 steps allocate gigabytes).
    path, config, class_name = _saved_config(folder, "scheduler", "scheduler_config.json")
    if config is not None:
        check_scheduler_config(config, str(path), class_name)


def _check_saved_vae(folder: Path) -> None:
    # Before diffusers builds it (norm_num_groups=0 fails there with a ZeroDivisionError); the keys it gives.
    path, config, _ = _saved_config(folder, "vae", "config.json")
    problem = None if config is None else _vae_problem(config, loaded=False)
    if problem:
        raise DiTOptimumError(f"The VAE config ({path}) has {problem}.")


def _check_model_index(folder: Path) -> None:
    # A local folder's index must be a JSON object naming components (diffusers fails on others with a TypeError),
    # each component's config a JSON object, and every file there a regular one (a FIFO would block the load).
    # A missing or damaged file is a ModelFileError (an OSError, as in diffusers), a bad value a ValueError.
    index = folder / "model_index.json"
    if not folder.is_dir():
        return
    if not index.exists():
        raise ModelFileError(f"{str(folder)!r} is not a saved pipeline: it has no model_index.json.")
    try:
        content = read_json_file(index, MODEL_INDEX)
    except SchemaError as error:
        raise file_error(error, f"{str(index)!r} does not describe a DiT pipeline ({error.problem}).") from None
    except FileContentError as error:
        raise file_error(error, f"{str(index)!r} is {error.problem}: the pipeline folder is damaged.") from None
    for name, entry in content.items():
        if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None:
            check_component_folder(folder / name)


# Options of a pipeline's `from_pretrained` that also apply to loading one of its components.
_COMPONENT_OPTIONS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "variant",
                      "use_safetensors", "low_cpu_mem_usage")  # fmt: skip


def _component_kwargs(kwargs: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The pipeline ``from_pretrained`` options for component ``name`` (``torch_dtype`` may be a dict by component,
    with a ``"default"``, as diffusers takes it)."""
    options = {key: kwargs[key] for key in _COMPONENT_OPTIONS if key in kwargs}
    dtype = kwargs.get("torch_dtype")
    if isinstance(dtype, Mapping):
        dtype = dtype.get(name, dtype.get("default"))
    if dtype is not None:
        options["torch_dtype"] = dtype
    return options


def _names_stock_transformer(source: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether the pipeline's ``model_index.json`` (a local folder's, or a Hub repository's) names diffusers'
    ``DiTTransformer2DModel`` as its transformer."""
    from ..models.stock import STOCK_TRANSFORMER

    if Path(source).is_dir():
        try:
            index = json.loads((Path(source) / "model_index.json").read_text())
        except (OSError, ValueError):
            return False  # diffusers names the problem
    else:
        hub = {key: kwargs[key] for key in _COMPONENT_OPTIONS[:6] if key in kwargs}
        try:
            index = DiTPipeline.load_config(source, **hub)
        except (OSError, ValueError):
            return False
    entry = index.get("transformer") if isinstance(index, Mapping) else None
    return isinstance(entry, (list, tuple)) and tuple(entry) == STOCK_TRANSFORMER


class DiTOptimumPipeline(DiTPipeline, DiTLoraLoaderMixin):
    """``DiTPipeline`` that works for any class count (null class from the model config) and in pixel space.

    ``vae=None`` means pixel space: an ``IdentityAutoencoder`` is stored so that the saved folder loads with plain
    ``DiffusionPipeline.from_pretrained`` (which returns diffusers' ``DiTPipeline`` running these components and
    giving the same images) or with ``DiTOptimumPipeline.from_pretrained`` (this class).
    """

    _optional_components = ["vae", "scheduler"]

    def __init__(
        self,
        transformer,
        vae=None,
        scheduler=None,
        id2label: dict[Any, str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ):
        vae = IdentityAutoencoder() if vae is None else vae
        scheduler = DDIMScheduler() if scheduler is None else scheduler
        id2label = _normalize_id2label(id2label, transformer.config.num_embeds_ada_norm)
        check_scheduler(scheduler)
        check_vae(vae)
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self.register_to_config(id2label=id2label)
        self.set_sampling_defaults(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    def set_sampling_defaults(
        self, num_inference_steps: int | None = None, guidance_scale: float | None = None
    ) -> None:
        """Record the steps and guidance this pipeline samples with when a call does not pass them (a solver at few
        steps, a step-distilled student): exactly these, None leaving that one unrecorded (the call then falls back
        to diffusers' ``DiTPipeline`` defaults, 50 steps and guidance 4.0). They are saved in ``model_index.json``
        and come back with ``from_pretrained``; plain diffusers' ``DiTPipeline`` ignores them (pass them there).
        ``num_inference_steps``: an integer in 1..the scheduler's ``num_train_timesteps``; ``guidance_scale``: a
        finite number in [1, ``MAX_GUIDANCE_SCALE``] (1 disables guidance; > 1 needs a model with a null class)."""
        max_steps = self.scheduler.config.num_train_timesteps
        if num_inference_steps is not None and not _valid_steps(num_inference_steps, max_steps):
            raise DiTOptimumError(
                f"`num_inference_steps`={_shown(num_inference_steps)} cannot be a sampling default; allowed values: "
                f"None (not recorded) or an integer in 1..{max_steps} (the scheduler's `num_train_timesteps`)."
            )
        if guidance_scale is not None:
            if not _valid_guidance(guidance_scale, MAX_GUIDANCE_SCALE):
                raise DiTOptimumError(
                    f"`guidance_scale`={_shown(guidance_scale)} cannot be a sampling default; allowed values: None "
                    f"(not recorded) or a finite number in [1, {MAX_GUIDANCE_SCALE:g}] (1 disables guidance)."
                )
            if guidance_scale > 1 and self.transformer.null_class_label is None:
                raise DiTOptimumError(
                    f"`guidance_scale`={guidance_scale!r} cannot be a sampling default: guidance > 1 needs a null "
                    "class, but the model has class_dropout_prob=0; allowed values: None or 1."
                )
        self.register_to_config(
            num_inference_steps=None if num_inference_steps is None else int(num_inference_steps),
            guidance_scale=None if guidance_scale is None else float(guidance_scale),
        )

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The recorded sampling defaults (``set_sampling_defaults``): only the keys recorded, e.g.
        ``{"num_inference_steps": 5, "guidance_scale": 2.0}``; ``{}`` when none are."""
        return {key: self.config[key] for key in SAMPLING_DEFAULT_KEYS if self.config.get(key) is not None}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DiTOptimumPipeline:
        """diffusers' loader (safetensors only); a missing, unreadable or inconsistent folder raises
        ``DiTOptimumError`` naming it and the file, never a raw traceback from deep inside. ``runtime=`` overrides the
        transformer's exported runtime (``None``: run it in torch; ``{"backend": ..., "precision": ...}``)."""
        source = check_source(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        _check_model_index(Path(source))
        _check_saved_scheduler(Path(source))
        _check_saved_vae(Path(source))
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        check_variant(kwargs.get("variant"))
        if "runtime" in kwargs and "transformer" not in kwargs:  # the transformer's runtime, overridden (None: torch)
            runtime = kwargs.pop("runtime")
            kwargs["transformer"] = DiTOptimumTransformer2DModel.from_pretrained(
                source, subfolder="transformer", runtime=runtime, **_component_kwargs(kwargs, "transformer")
            )
        if "transformer" not in kwargs and _names_stock_transformer(source, kwargs):
            # a stock-format folder: diffusers would build its own DiTTransformer2DModel; this package's model gives
            # back the saved class count (and loads any stock DiT checkpoint the same way)
            kwargs["transformer"] = DiTOptimumTransformer2DModel.from_pretrained(
                source, subfolder="transformer", **_component_kwargs(kwargs, "transformer")
            )
        try:
            pipeline = super().from_pretrained(source, **kwargs)
        except DiTOptimumError:
            raise
        except (OSError, ValueError, KeyError, TypeError, NotImplementedError, ArithmeticError) as error:
            # diffusers' exception type kept (an OSError stays one: its variant fallback and callers catch it)
            raise keeping_type(error, f"Could not load the pipeline from {source!r}: {first_line(error)}") from error
        for name, component in pipeline.components.items():  # our transformer checked its weights as it loaded
            if isinstance(component, torch.nn.Module) and not isinstance(
                component, (DiTOptimumTransformer2DModel, IdentityAutoencoder)
            ):
                check_finite_weights(component, str(Path(source) / name))
        return pipeline

    @property
    def call_lock(self) -> threading.RLock:
        """The lock each call holds: calls from several threads (a demo serving two requests) run one after the other,
        each giving the images it would give alone (the scheduler and cache hooks keep per-call state in the shared
        objects). One lock per transformer, made once: pipelines sharing a transformer (and its cache hooks) wait for
        each other too. Re-entrant: hold it around a call to time the call alone."""
        owner = self.__dict__.get("transformer")  # the transformer (the pipeline itself while it has none)
        key = owner if isinstance(owner, torch.nn.Module) else self
        with _CALL_LOCKS_GUARD:
            lock = _CALL_LOCKS.get(key)
            if lock is None:
                lock = _CALL_LOCKS[key] = threading.RLock()
            return lock

    def __deepcopy__(self, memo: dict) -> DiTOptimumPipeline:
        """A copy carrying the step cache: the cache is taken off for copying (diffusers' cache hooks do not copy)
        and put back on the original and, with the same config, on the copy (whose PAB / FasterCache timestep
        callback reads the copy). The copy has its own transformer, scheduler and so its own ``call_lock``."""
        with self.call_lock:
            model = self.__dict__.get("transformer")
            config = getattr(model, "_cache_config", None)
            if config is not None:
                model.disable_cache()
            try:
                result = type(self).__new__(type(self))
                memo[id(self)] = result
                result.__dict__.update(copy.deepcopy(self.__dict__, memo))
                if config is not None:
                    result.transformer.enable_cache(_copied_cache_config(config, memo))
            finally:
                if config is not None:
                    model.enable_cache(config)
            return result

    def to(self, *args: Any, **kwargs: Any) -> DiTOptimumPipeline:
        """diffusers' ``to`` (dtype and/or device), holding ``call_lock``: a conversion asked for while another
        thread samples waits for that call to finish instead of changing its weights mid-call."""
        with self.call_lock:
            return super().to(*args, **kwargs)

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep being denoised (None outside sampling), as diffusers' pipelines expose it."""
        return getattr(self, "_current_timestep", None)

    @property
    def is_pixel_space(self) -> bool:
        return isinstance(self.vae, IdentityAutoencoder)

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class indices for class names (any comma-separated alias in ``id2label`` works)."""
        labels = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise DiTOptimumError(
                f"Unknown class name(s) {unknown} in `class_labels`; allowed values: {sorted(self.labels)}."
            )
        return [self.labels[name] for name in labels]

    def _class_indices(
        self, class_labels: int | str | Sequence[int | str] | torch.Tensor, guided: bool = False
    ) -> list[int]:
        num_classes = self.transformer.config.num_embeds_ada_norm
        if isinstance(class_labels, torch.Tensor):
            problem = None
            if class_labels.device.type == "meta":
                problem = "is on the meta device (it holds no values)"
            elif class_labels.dtype == torch.bool or class_labels.is_floating_point() or class_labels.is_complex():
                problem = f"has dtype {class_labels.dtype}"
        elif isinstance(class_labels, np.ndarray):
            problem = f"has dtype {class_labels.dtype}" if class_labels.dtype.kind in "bfcmMV" else None
        else:
            problem = None
        if problem:
            raise DiTOptimumError(
                f"`class_labels` {problem}; allowed values: class indices in 0..{num_classes - 1} as an integer "
                "tensor or array (on any real device), or a list of indices or names from id2label."
            )
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            count = int(np.prod(class_labels.shape))
        elif isinstance(class_labels, (list, tuple)):
            count = len(class_labels)
        else:
            count = 1
        if not count:
            raise DiTOptimumError("`class_labels` is empty: give at least one class index or name.")
        # one image per label, all in one batch: bounded before the labels are even read
        check_resources(self.transformer.config, parameter="class_labels", images=count, guided=guided)
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            class_labels = class_labels.reshape(-1).tolist()
        elif not isinstance(class_labels, (list, tuple)):
            class_labels = [class_labels]  # one label (checked below like any entry)
        class_labels = list(class_labels)
        indices = []
        for label in class_labels:
            index = self.get_label_ids(label)[0] if isinstance(label, str) else label
            if not is_integer(index) or not 0 <= index < num_classes:
                raise DiTOptimumError(
                    f"`class_labels` entry {label!r} is not a class; "
                    f"allowed values: 0..{num_classes - 1} or a name from id2label."
                )
            indices.append(int(index))
        return indices

    def _check_sampling_arguments(
        self, guidance_scale: Any, num_inference_steps: Any, output_type: Any
    ) -> tuple[float, int]:
        """The call's ``guidance_scale`` as a float and ``num_inference_steps`` as an int, once each is checked (and
        the scheduler and VAE, which may have been replaced or reconfigured since construction)."""
        problem = _scheduler_problem(self.scheduler)
        if problem:
            raise DiTOptimumError(
                f"The scheduler ({type(self.scheduler).__name__}) cannot set {num_inference_steps!r} timesteps from "
                f"its config: it has {problem}."
            )
        check_vae(self.vae)
        dtype = self.transformer.dtype
        # the guided noise is uncond + scale * (cond - uncond) in the model's dtype: a scale beyond its largest
        # number is inf there, and every image NaN
        largest = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
        if not _valid_guidance(guidance_scale, largest):
            raise DiTOptimumError(
                f"`guidance_scale`={guidance_scale!r} must be a finite number in [1, {largest:g}] (1 disables "
                f"guidance; larger values overflow the model's {str(dtype).replace('torch.', '')})."
            )
        guidance_scale = float(guidance_scale)  # a Fraction or NumPy number multiplies tensors as a float
        if guidance_scale > 1 and self.transformer.null_class_label is None:
            raise DiTOptimumError(
                "`guidance_scale` > 1 needs a null class, but the model has class_dropout_prob=0; use guidance_scale=1."
            )
        max_steps = self.scheduler.config.num_train_timesteps
        if not _valid_steps(num_inference_steps, max_steps):
            raise DiTOptimumError(
                f"`num_inference_steps`={num_inference_steps!r} must be an integer in 1..{max_steps}."
            )
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise DiTOptimumError(f"Unknown `output_type`={output_type!r}; allowed values: {', '.join(OUTPUT_TYPES)}.")
        return guidance_scale, int(num_inference_steps)

    def _check_generator(self, generator: Any, batch_size: int, device: torch.device) -> Any:
        """``generator`` as ``randn_tensor`` takes it: None, one ``torch.Generator``, or a list of one per image; each
        on the CPU or on the pipeline's device type."""
        allowed = (
            f"None, a torch.Generator, or a list of {batch_size} torch.Generators (one per image), each on the cpu "
            f"or the pipeline's device ({device.type})"
        )
        generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        if isinstance(generator, (list, tuple)) and len(generators) != batch_size:
            raise DiTOptimumError(
                f"`generator` is a list of {len(generators)} generators for {batch_size} image(s); allowed values: "
                f"{allowed}."
            )
        for item in generators:
            if item is None and generator is None:
                continue
            if not isinstance(item, torch.Generator):
                what = " holds " if isinstance(generator, (list, tuple)) else "="
                raise DiTOptimumError(f"`generator`{what}{_shown(item)}; allowed values: {allowed}.")
            if item.device.type not in ("cpu", device.type):
                raise DiTOptimumError(f"`generator` is on the {item.device.type} device; allowed values: {allowed}.")
        return generators if isinstance(generator, (list, tuple)) else generator

    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per entry of ``class_labels`` (indices or names).

        ``num_inference_steps`` / ``guidance_scale`` None: the pipeline's recorded ``sampling_defaults``, else
        diffusers' ``DiTPipeline`` defaults (50 steps, guidance 4.0).
        ``guidance_scale`` > 1 enables classifier-free guidance; ``output_type`` is ``"pil"``, ``"np"`` (B, H, W, C
        in [0, 1]), ``"pt"`` (B, C, H, W in [0, 1]) or ``"latent"`` (the denoised latents, before decoding);
        ``generator`` is one ``torch.Generator`` or a list of one per image. Concurrent calls on one pipeline object
        run one at a time (``call_lock``); samples (latents, or decoded images) that come out NaN or inf raise
        ``DiTOptimumError`` naming the likely causes of this call instead of returning NaN images.
        """
        with self.call_lock:
            num_inference_steps, guidance_scale = self.resolved_sampling(num_inference_steps, guidance_scale)
            if _is_finite(guidance_scale) and guidance_scale <= 1 and _is_faster_cache(self.transformer):
                raise DiTOptimumError(
                    "FasterCache needs `guidance_scale` > 1: it takes part of the batch as the unconditional half of "
                    "a guided batch. Pass `guidance_scale` > 1, or disable the cache "
                    "(`disable_step_cache(pipe)`) for unguided sampling."
                )
            return self._sample(class_labels, guidance_scale, generator, num_inference_steps, output_type, return_dict)

    def resolved_sampling(self, num_inference_steps: Any = None, guidance_scale: Any = None) -> tuple[Any, Any]:
        """``(num_inference_steps, guidance_scale)`` a call samples with: the given ones, else the recorded
        ``sampling_defaults``, else diffusers' DiTPipeline defaults (50, 4.0). Not checked here: the call checks."""
        defaults = self.sampling_defaults
        if num_inference_steps is None:
            num_inference_steps = defaults.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS)
        if guidance_scale is None:
            guidance_scale = defaults.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
        return num_inference_steps, guidance_scale

    @torch.no_grad()
    def _sample(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        output_type: str,
        return_dict: bool,
    ) -> ImagePipelineOutput | tuple:
        guidance_scale, num_inference_steps = self._check_sampling_arguments(
            guidance_scale, num_inference_steps, output_type
        )
        labels = self._class_indices(class_labels, guided=guidance_scale > 1)
        device = self._execution_device
        batch_size = len(labels)
        generator = self._check_generator(generator, batch_size, device)
        latent_size = self.transformer.config.sample_size
        latent_channels = self.transformer.config.in_channels
        use_guidance = guidance_scale > 1

        latents = randn_tensor(
            (batch_size, latent_channels, latent_size, latent_size),
            generator=generator,
            device=device,
            dtype=self.transformer.dtype,
        )
        model_input = torch.cat([latents] * 2) if use_guidance else latents
        class_tensor = torch.tensor(labels, device=device)
        if use_guidance:
            class_null = torch.full_like(class_tensor, self.transformer.null_class_label)
            class_tensor = torch.cat([class_tensor, class_null], 0)

        try:
            self.scheduler.set_timesteps(num_inference_steps)
        except (ValueError, TypeError, KeyError) as error:  # a config value diffusers' scheduler cannot use
            raise DiTOptimumError(
                f"The scheduler ({type(self.scheduler).__name__}) cannot set {num_inference_steps} timesteps from its "
                f"config: {first_line(error)}"
            ) from error
        self._check_timesteps(num_inference_steps)
        # sigma-parameterised schedulers (Euler, Heun) start from noise of their largest sigma (known once the
        # timesteps are set); the others' 1 leaves the noise's bits as they are (the stock pipeline scales nothing)
        if float(getattr(self.scheduler, "init_noise_sigma", 1.0)) != 1:
            model_input = model_input * self.scheduler.init_noise_sigma
        steps = len(self.scheduler.timesteps)
        for index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            self._current_timestep = t
            if use_guidance:
                half = model_input[: len(model_input) // 2]
                model_input = torch.cat([half, half], dim=0)
            # the scaled input goes to the model, the unscaled one to `step` (the same tensor for DDIM / DPM-Solver;
            # Euler / Heun divide by sqrt(sigma^2 + 1), and their step expects the sample itself)
            scaled_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t[None].to(device) if torch.is_tensor(t) else torch.tensor([t], device=device)
            timesteps = timesteps.expand(model_input.shape[0])
            # one call per step (guidance batched): diffusers' cache hooks key their state by this context
            with self.transformer.cache_context("cond_uncond", step_index=index, num_inference_steps=steps, timestep=t):
                noise_pred = self.transformer(scaled_input, timestep=timesteps, class_labels=class_tensor).sample

            if use_guidance:
                eps, rest = noise_pred[:, :latent_channels], noise_pred[:, latent_channels:]
                cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
                half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                eps = torch.cat([half_eps, half_eps], dim=0)
                noise_pred = torch.cat([eps, rest], dim=1)

            if self.transformer.config.out_channels // 2 == latent_channels:
                model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
            else:
                model_output = noise_pred
            model_input = self.scheduler.step(model_output, t, model_input).prev_sample

        self._current_timestep = None
        latents = model_input.chunk(2, dim=0)[0] if use_guidance else model_input
        decoded = None
        if output_type != "latent":
            scaled = 1 / self.vae.config.scaling_factor * latents  # as the stock pipeline: same bits
            if not isinstance(self.vae, IdentityAutoencoder):  # a real VAE may run in another dtype than a
                scaled = scaled.to(self.vae.dtype)  # quantized / half-precision transformer
            decoded = self.vae.decode(scaled).sample
        self._check_finite_samples(latents, decoded, guidance_scale)
        if output_type == "latent":
            samples = latents
        else:
            samples = (decoded / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    samples = self.numpy_to_pil(samples)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

    def _check_timesteps(self, num_inference_steps: int) -> None:
        # The timesteps index the scheduler's tables: one outside them (a large `steps_offset` with as many steps as
        # training had) is an IndexError deep inside `step`. Float timesteps (Euler's) are not indices.
        timesteps, train_steps = self.scheduler.timesteps, self.scheduler.config.num_train_timesteps
        if not torch.is_tensor(timesteps) or timesteps.is_floating_point() or not timesteps.numel():
            return
        low, high = int(timesteps.min()), int(timesteps.max())
        if low < 0 or high >= train_steps:
            raise DiTOptimumError(
                f"The scheduler ({type(self.scheduler).__name__}) set timesteps {low}..{high} for "
                f"`num_inference_steps`={num_inference_steps}, outside its {train_steps} training steps (0.."
                f"{train_steps - 1}): lower its config's `steps_offset`="
                f"{self.scheduler.config.get('steps_offset', 0)!r} or `num_inference_steps`."
            )

    def _check_finite_samples(self, latents: torch.Tensor, decoded: torch.Tensor | None, guidance_scale: float) -> None:
        # What the call returns (the latents, and the decoded images before they are clamped to [0, 1]), checked
        # with one host sync after the loop: NaN images are an error, never a result.
        finite = torch.isfinite(latents).all()
        if decoded is not None:
            finite = finite & torch.isfinite(decoded).all().to(finite.device)
        if bool(finite):
            return
        guided = guidance_scale > 1
        bad_latents = int((~torch.isfinite(latents)).sum())
        if bad_latents:
            adapters = sorted(getattr(self.transformer, "peft_config", None) or {})
            causes = [f"`guidance_scale`={guidance_scale!r} too large (typical: 1-10)"] if guided else []
            if adapters:
                causes.append(
                    f"the attached LoRA adapter(s) {', '.join(map(repr, adapters))} (their weights or scales: try "
                    "`set_adapters(..., 0.0)` or `unload_lora_weights()`)"
                )
            causes += [
                "non-finite or diverged transformer weights (a training run that diverged)",
                "the scheduler's config (betas, num_train_timesteps, thresholding)",
            ]
            what = f"The samples are not finite ({bad_latents} of {latents.numel()} latent values are NaN or inf)"
        else:
            bad = int((~torch.isfinite(decoded)).sum())
            causes = [
                f"the VAE's `scaling_factor`={self.vae.config.scaling_factor!r} (latents are divided by it before "
                "decoding)",
                "non-finite VAE weights",
                f"the VAE's dtype ({str(self.vae.dtype).replace('torch.', '')}) overflowing (try float32)",
            ]
            if guided:
                causes.append(f"latents pushed out of the VAE's range by `guidance_scale`={guidance_scale!r}")
            what = (
                f"The decoded samples are not finite ({bad} of {decoded.numel()} values are NaN or inf) although the "
                "latents are: the VAE produced them"
            )
        listed = causes[0] if len(causes) == 1 else ", ".join(causes[:-1]) + f", or {causes[-1]}"
        raise DiTOptimumError(f"{what}. Likely causes: {listed}.")

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        overwrite: bool = False,
        stock_format: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Save so that plain ``DiffusionPipeline`` loads it; safetensors only.

        Where diffusers' own classes can represent the pipeline (``stock.stock_format_problem`` is None: SDPA
        attention, uniform blocks, a 4x MLP, no MoE, no saved cache schedule, a diffusers VAE, float weights or
        torchao / quanto weight-only quantization, a null class and at most 1000 classes), the folder holds
        ``DiTPipeline`` with ``DiTTransformer2DModel`` (``stock.to_stock_transformer``), the VAE and the scheduler:
        ``DiffusionPipeline.from_pretrained(path)`` loads it without this package and gives the same images. A model
        with fewer than 1000 classes is padded to 1000 there (an unknown class id in its padding samples
        unconditionally); ``DiTOptimumPipeline.from_pretrained`` gives back its own classes. Anything else keeps this
        package's format (components ``["dit_optimum", ...]``: ``import dit_optimum`` first). ``stock_format=True``
        refuses a pipeline that cannot be saved in the stock format (with the reason), ``False`` keeps the package
        format always. ``variant`` (``"fp16"``, ``"bf16"``) names the weights files as diffusers does
        (``diffusion_pytorch_model.<variant>.safetensors``; cast the pipeline to that dtype first).

        As diffusers does, the pipeline's files go into ``save_directory`` and other files there are left alone; each
        file is written whole (temp file, then rename). A folder that holds other files but no ``model_index.json``
        (or a file at that path) is refused unless ``overwrite=True``.
        """
        from ..models.stock import stock_format_problem, to_stock_transformer

        pop_unsupported_save_options(kwargs)
        check_variant(kwargs.get("variant"))
        if isinstance(self.transformer, torch.nn.Module):
            check_no_lora_layers(self.transformer, pipeline=True)  # before anything is written
        try:  # recorded defaults still valid for the scheduler and model now there (one may have been replaced)
            self.set_sampling_defaults(**self.sampling_defaults)
        except DiTOptimumError as error:
            raise DiTOptimumError(
                f"Not saved: the pipeline's recorded sampling defaults {self.sampling_defaults} no longer fit it "
                f"({error}); record new ones with `set_sampling_defaults(...)` first."
            ) from error
        if stock_format is not None and not isinstance(stock_format, bool):
            raise DiTOptimumError(
                f"`stock_format`={stock_format!r} is not allowed; allowed values: None (diffusers' own format where it "
                "can hold the pipeline), True (that format or an error), False (this package's format)."
            )
        problem = "the package format was asked for" if stock_format is False else stock_format_problem(self)
        if stock_format and problem:
            raise DiTOptimumError(f"This pipeline cannot be saved in diffusers' own format: {problem}.")
        stock = None
        if problem is None:
            if hasattr(self.transformer, "check_unfused"):
                self.transformer.check_unfused("saving")
            stock = DiTPipeline(
                transformer=to_stock_transformer(self.transformer), vae=self.vae, scheduler=self.scheduler
            )
            # recorded sampling defaults too (plain diffusers' DiTPipeline ignores them, with a logged notice)
            stock.register_to_config(id2label=self.config.get("id2label"), **self.sampling_defaults)
        sources = [getattr(self.config, "_name_or_path", None)]
        sources += [getattr(getattr(c, "config", None), "_name_or_path", None) for c in self.components.values()]
        with save_directory_into(save_directory, "model_index.json", overwrite, sources=sources) as staging:
            if stock is not None:  # diffusers' classes only: its own model_index.json
                stock.save_pretrained(staging, safe_serialization=True, **kwargs)
                return
            super().save_pretrained(staging, safe_serialization=True, **kwargs)
            index_path = staging / "model_index.json"
            index = json.loads(index_path.read_text())
            index["_class_name"] = SAVED_PIPELINE_CLASS
            for key in SAMPLING_DEFAULT_KEYS:  # written only when recorded: older readers see the same index
                if index.get(key, 0) is None:
                    del index[key]
            for name, value in index.items():
                # Components name our top-level package, which re-exports them and ModelMixin as diffusers requires.
                if isinstance(value, list) and len(value) == 2 and str(value[0]).startswith("dit_optimum."):
                    index[name] = ["dit_optimum", value[1]]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
