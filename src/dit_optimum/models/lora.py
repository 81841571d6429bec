"""LoRA targets of a DiT and the peft config that adapts them: named groups of the block's linear layers, checked
against the model before anything is added, so a typo or an empty selection is an error, not a silent no-op."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BadOptionError, DiTOptimumError, MissingPathError
from ..files import is_model_file_name
from ..utils import check_source, first_line

# Module-name suffixes inside a transformer block, by group (MoE experts are batched weights: not targetable).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    "mlp": ("ff.net.0.proj", "ff.net.2"),
    "adaln": ("norm1.linear",),
}
DEFAULT_TARGETS: tuple[str, ...] = ("attention",)
# The largest LoRA ``lora_alpha`` (the adapter's scale is alpha / rank): beyond it every output overflows.
MAX_LORA_ALPHA = 1e6


def lora_target_modules(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """The full names of ``model``'s linear layers in the ``targets`` groups; unknown groups, or groups that match
    nothing in this model (e.g. ``mlp`` on a model whose every block is MoE), raise naming ``targets``."""
    if isinstance(targets, str) or not targets:
        raise DiTOptimumError(f"`targets`={targets!r} must be a non-empty list; allowed: {', '.join(LORA_TARGETS)}.")
    unknown = [name for name in targets if name not in LORA_TARGETS]
    if unknown:
        raise DiTOptimumError(f"Unknown LoRA `targets` {unknown}; allowed values: {', '.join(LORA_TARGETS)}.")
    found = []
    for group in dict.fromkeys(targets):
        suffixes = LORA_TARGETS[group]
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("transformer_blocks.") and name.endswith(suffixes)
        ]
        if not names:
            raise DiTOptimumError(f"LoRA `targets` group {group!r} matches no layer of this model ({suffixes}).")
        found.extend(names)
    return found


def lora_config(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float | None = None,
    modules_to_save: Sequence[str] | None = None,
):
    """A peft ``LoraConfig`` for ``model``: rank ``rank`` on the ``targets`` groups, scale ``alpha / rank``
    (``alpha`` defaults to ``rank``), ``modules_to_save`` trained in full (e.g. a resized class embedding)."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DiTOptimumError(f"LoRA `rank`={rank!r} must be an integer >= 1.")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= MAX_LORA_ALPHA:
        raise DiTOptimumError(f"LoRA `alpha`={alpha!r} must be a finite number in (0, {MAX_LORA_ALPHA:g}].")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=True,  # B = 0: the adapter starts as the identity
        target_modules=lora_target_modules(model, targets),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )


# LoRA files: one validating reader for every load path (model-level ``load_lora_adapter``, pipeline-level
# ``lora_state_dict`` / ``load_lora_weights``, and state dicts passed in directly). A file must be a regular
# safetensors file of finite floating-point tensors whose keys (after the loader's prefix) name this model's layers,
# with the shapes of those layers; anything else is refused naming the file before the model changes.

LORA_FILE_OPTIONS: tuple[str, ...] = (
    "weight_name",
    "subfolder",
    "use_safetensors",
    "cache_dir",
    "force_download",
    "proxies",
    "local_files_only",
    "token",
    "revision",
)
_STATE_DICT_SOURCE = "The LoRA state dict passed in"
# peft's keys for an adapted layer `<module>.<part>` (no adapter name in saved files)
_ADAPTER_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?"
    r"|lora_embedding_[AB]|lokr_\w+)$"
)
_WRAPPER_NAME = re.compile(r"\.(?:base_layer|original_module)(?=\.|$)")
_SHOWN_KEYS = 4


def check_lora_file_name(weight_name: str | None, saving: bool = False) -> None:
    """LoRA weights load from and save to safetensors only: a ``weight_name`` of another format is refused before
    reading (or writing); a name to save under must be a plain file name, not a path."""
    if weight_name is None:
        return
    if not isinstance(weight_name, str) or not weight_name.endswith(".safetensors"):
        raise DiTOptimumError(
            f"`weight_name`={weight_name!r} is not a .safetensors file: LoRA weights load from safetensors only."
        )
    if saving and (os.path.basename(weight_name) != weight_name or weight_name.startswith(".")):
        raise DiTOptimumError(f"`weight_name`={weight_name!r} must be a plain file name (no folder, not hidden).")
    if saving and is_model_file_name(weight_name):  # it would replace a saved model's weights
        raise DiTOptimumError(
            f"`weight_name`={weight_name!r} is the name of a model's weights file; choose another name (default: "
            "pytorch_lora_weights.safetensors)."
        )


# Advice when a LoRA save meets a file of the same name that the package did not write.
LORA_SAVE_ADVICE = "pass another `weight_name`, or remove that file first"


def lora_file_path(
    pretrained_model_name_or_path: str | os.PathLike,
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_options: Any,
) -> str:
    """The LoRA file that diffusers' loaders would read: ``weight_name`` (or the folder's one ``.safetensors`` file,
    as diffusers guesses it) in a local folder, a local path itself, or a file fetched from a Hub repository."""
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE, _best_guess_weight_name
    from diffusers.utils import _get_model_file

    check_lora_file_name(weight_name)
    location = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(location):
        folder = os.path.join(location, subfolder) if subfolder else location
        guessed = weight_name is None
        if guessed:
            if not os.path.isdir(folder):
                raise MissingPathError(f"LoRA folder {folder!r} does not exist.")
            weight_name = _best_guess_weight_name(folder, file_extension=".safetensors") or LORA_WEIGHT_NAME_SAFE
        path = os.path.join(folder, weight_name)
        if not os.path.lexists(path):
            detail = ": the folder holds no .safetensors file (LoRA loads from safetensors only)" if guessed else ""
            raise MissingPathError(f"LoRA file {path!r} does not exist{detail}.")
        return path
    if os.path.lexists(location):
        return location  # a file, or a FIFO or device that read_lora_file refuses by name
    check_source(location, "pretrained_model_name_or_path_or_dict")  # a missing local path is not a Hub id
    try:
        weight_name = weight_name or _best_guess_weight_name(
            location, file_extension=".safetensors", local_files_only=hub_options.get("local_files_only")
        )
        return _get_model_file(
            location,
            weights_name=weight_name or LORA_WEIGHT_NAME_SAFE,
            subfolder=subfolder,
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            **hub_options,
        )
    except (OSError, ValueError) as error:  # offline, not found, no network: one line naming the repository
        if isinstance(error, DiTOptimumError):
            raise
        raise DiTOptimumError(f"Could not fetch a LoRA from {location!r}: {first_line(error)}") from error


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors and diffusers' adapter metadata of the safetensors file ``path``; a path that is not a regular
    file (a folder, FIFO, device), or a file safetensors cannot read (empty, truncated, random bytes), is refused
    naming it."""
    import safetensors
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode  # follows links (the Hub cache links into its blobs)
    except FileNotFoundError:
        raise MissingPathError(f"LoRA file {name!r} does not exist.") from None
    except OSError as error:
        raise DiTOptimumError(f"LoRA file {name!r} cannot be read: {error.strerror or error}.") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        raise DiTOptimumError(f"LoRA file {name!r} is {kind}, not a regular file: give a .safetensors file.")
    try:
        with safetensors.safe_open(name, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError) as error:
        raise DiTOptimumError(
            f"LoRA file {name!r} is not a readable safetensors LoRA file ({first_line(error)})."
        ) from None
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return tensors, None
    try:
        metadata = json.loads(raw)
    except RecursionError:  # nested thousands of levels deep: json's decoder gives up
        raise DiTOptimumError(
            f"LoRA file {name!r} has adapter metadata nested too deeply to read; LoRA metadata is a flat JSON object "
            "of peft `LoraConfig` options."
        ) from None
    except ValueError as error:  # not JSON, or an integer beyond Python's digit limit
        raise DiTOptimumError(
            f"LoRA file {name!r} has adapter metadata that is not valid JSON ({first_line(error)})."
        ) from None
    if not isinstance(metadata, dict):
        raise DiTOptimumError(f"LoRA file {name!r} has adapter metadata that is not a JSON object.")
    return tensors, metadata


def read_lora_weights(
    pretrained_model_name_or_path_or_dict: Any, **options: Any
) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """``(state_dict, metadata, source)`` of a LoRA file (found as diffusers finds it; ``options`` are the file
    options of ``LORA_FILE_OPTIONS``) or of a state dict passed in; ``source`` names it in error messages."""
    unknown = sorted(set(options) - set(LORA_FILE_OPTIONS))
    if unknown:
        raise TypeError(f"Unexpected LoRA file options {unknown}.")
    if options.pop("use_safetensors", None) is False:
        raise DiTOptimumError("`use_safetensors`=False is not supported: LoRA weights load from safetensors only.")
    check_lora_file_name(options.get("weight_name"))
    if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
        return dict(pretrained_model_name_or_path_or_dict), None, _STATE_DICT_SOURCE
    path = lora_file_path(pretrained_model_name_or_path_or_dict, **options)
    tensors, metadata = read_lora_file(path)
    return tensors, metadata, f"LoRA file {str(path)!r}"


def _is_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype.itemsize == 1:  # float8: no isfinite kernel on every device
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def check_finite_lora_tensors(state_dict: Mapping[str, Any], source: str) -> None:
    """Every value is a finite floating-point tensor, else an error naming ``source`` and the first bad key."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise DiTOptimumError(f"{source} holds no LoRA weights (no tensors).")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DiTOptimumError(f"{source} holds {key!r}: {type(value).__name__}; LoRA weights are tensors.")
        if not value.is_floating_point():
            raise DiTOptimumError(f"{source} holds {key!r} of dtype {value.dtype}; LoRA weights are floating point.")
        if not _is_finite(value):
            raise DiTOptimumError(
                f"{source} holds non-finite values (NaN or inf) in {key!r}; LoRA weights must be finite."
            )


# Adapter metadata: the keyword arguments diffusers passes to peft's ``LoraConfig``. Only options that mean the same at
# load time as at training time are read; the rest (initialisations that rewrite the base weights, layer replication,
# quantization-aware or other adapter variants) must be unset, so nothing unchecked reaches peft.
_METADATA_DEPTH = 8
_BIAS_VALUES = ("none", "all", "lora_only")
_INIT_VALUES = (True, False, "gaussian")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_alpha(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_LORA_ALPHA


def _is_text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_pattern(value: Any, valid: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(key, str) and valid(item) for key, item in value.items())


_METADATA_RULES: dict[str, tuple[Any, str]] = {
    "r": (lambda v: _is_int(v) and v >= 1, "an integer >= 1, the rank of the file's tensors"),
    "lora_alpha": (_is_alpha, f"a number in (0, {MAX_LORA_ALPHA:g}]"),
    "lora_dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "[0, 1)"),
    "rank_pattern": (
        lambda v: _is_pattern(v, lambda r: _is_int(r) and r >= 1),
        "an object mapping layer-name patterns to integer ranks >= 1",
    ),
    "alpha_pattern": (
        lambda v: _is_pattern(v, _is_alpha),
        f"an object mapping layer-name patterns to numbers in (0, {MAX_LORA_ALPHA:g}]",
    ),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _is_names(v), "null, a name or a list of names"),
    "modules_to_save": (lambda v: v is None or _is_names(v), "null or a list of layer names"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "ensure_weight_tying": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is False, "false (this model's layers are nn.Linear)"),
    "bias": (lambda v: v in _BIAS_VALUES, ", ".join(_BIAS_VALUES)),
    "init_lora_weights": (
        lambda v: any(v is item if isinstance(item, bool) else v == item for item in _INIT_VALUES),
        "true, false, 'gaussian' (the weights come from the file; other initialisations rewrite the base model)",
    ),
    "peft_type": (lambda v: v is None or v == "LORA", "'LORA'"),
    "task_type": (_is_text_or_none, "null or a string"),
    "peft_version": (_is_text_or_none, "null or a string"),
    "base_model_name_or_path": (_is_text_or_none, "null or a string"),
    "revision": (_is_text_or_none, "null or a string"),
    "megatron_core": (_is_text_or_none, "null or a string"),
    "auto_mapping": (lambda v: v is None or isinstance(v, Mapping), "null or an object"),
    "qalora_group_size": (lambda v: _is_int(v) and 1 <= v <= 2**31, "an integer in 1..2**31"),
}


def _lora_config_defaults() -> dict[str, Any]:
    """The options peft's ``LoraConfig`` takes, with their defaults (what a missing metadata key becomes)."""
    import dataclasses

    from peft import LoraConfig

    defaults = {}
    for field in dataclasses.fields(LoraConfig):
        if field.init:
            default = field.default
            if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            defaults[field.name] = default
    return defaults


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (Mapping, list)) and not value)


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's digit limit
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check_metadata(metadata: Any, prefix: str | None, source: str) -> dict | None:
    """The adapter metadata for the loader's ``prefix`` (diffusers' layout: ``<prefix>.r``, ...), checked against
    what peft's ``LoraConfig`` takes: known keys, values of the right type in finite ranges (``lora_alpha`` > 0,
    ``lora_dropout`` in [0, 1), integer ranks), unsupported options unset. Raises naming ``source`` and the key."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise DiTOptimumError(f"{source} has adapter metadata that is not a mapping.")

    def walk(value: Any, where: str, depth: int) -> None:
        if depth > _METADATA_DEPTH:
            raise DiTOptimumError(
                f"{source} has adapter metadata nested deeper than {_METADATA_DEPTH} levels at {where}; LoRA metadata "
                "is a flat object of peft `LoraConfig` options."
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise DiTOptimumError(f"{source} has a non-finite adapter metadata value {where}={value!r}.")
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{where}[{key!r}]", depth + 1)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]", depth + 1)

    for key, value in metadata.items():
        if not isinstance(key, str):
            raise DiTOptimumError(f"{source} has an adapter metadata key {key!r} that is not a string.")
        walk(value, key, 1)
    start = f"{prefix}." if prefix is not None else ""
    metadata = {key[len(start) :]: value for key, value in metadata.items() if key.startswith(start)}
    defaults = _lora_config_defaults()
    for key, value in metadata.items():
        shown = f"`{start}{key}`={_shown(value)}"
        if key not in defaults:  # diffusers' LoraConfig(**metadata) would raise a TypeError: so does this
            if prefix is None and "." in key and key.split(".", 1)[1] in defaults:
                raise BadOptionError(
                    f"{source}: the `LoraConfig` class could not be instantiated from its adapter metadata, whose keys "
                    f"carry a prefix such as {key.split('.', 1)[0] + '.'!r} (a pipeline-level file, as "
                    "`pipe.save_lora_weights` writes it): load it with `pipe.load_lora_weights(...)` or "
                    "`transformer.load_lora_adapter(...)` (default prefix 'transformer')."
                )
            raise BadOptionError(
                f"{source}: the `LoraConfig` class could not be instantiated from its adapter metadata: the key "
                f"`{start}{key}` is not an option of peft's LoraConfig; the options read: {', '.join(_METADATA_RULES)}."
            )
        rule = _METADATA_RULES.get(key)
        if rule is None:
            if not _is_unset(value):
                raise DiTOptimumError(
                    f"{source} has adapter metadata {shown}, which this package's LoRA loader does not support; "
                    "allowed: unset (null, false or empty)."
                )
            continue
        valid, allowed = rule
        if not valid(value):
            raise DiTOptimumError(f"{source} has adapter metadata {shown}; allowed: {allowed}.")
        if key in ("rank_pattern", "alpha_pattern"):
            for pattern in value:
                try:
                    re.compile(rf"(.*\.)?({pattern})$")  # as peft matches it
                except (re.error, RecursionError, OverflowError) as error:
                    raise DiTOptimumError(
                        f"{source} has adapter metadata `{start}{key}` key {_shown(pattern)} that is not a valid "
                        f"regular expression ({error}); keys are layer-name patterns such as 'attn1.to_q'."
                    ) from None
    return metadata


def _adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers LoRA can adapt, by their plain name (peft's wrappers, if an adapter is attached, see through)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) and ".lora_" not in f".{name}":
            if ".modules_to_save." in f".{name}.":
                continue
            layers[_WRAPPER_NAME.sub("", name)] = module
    return layers


def _expected_shape(layer: nn.Module, part: str, rank: int) -> tuple[int, ...] | None:
    if isinstance(layer, nn.Linear):
        shapes = {
            "lora_A.weight": (rank, layer.in_features),
            "lora_B.weight": (layer.out_features, rank),
            "lora_B.bias": (layer.out_features,),
            "lora_magnitude_vector": (layer.out_features,),  # DoRA
            "lora_magnitude_vector.weight": (layer.out_features,),
        }
    elif isinstance(layer, nn.Conv2d):
        shapes = {
            "lora_A.weight": (rank, layer.in_channels // layer.groups, *layer.kernel_size),
            "lora_B.weight": (layer.out_channels, rank, 1, 1),
            "lora_B.bias": (layer.out_channels,),
        }
    else:
        return None
    return shapes.get(part)


def check_lora_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str | None,
    source: str = _STATE_DICT_SOURCE,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Refuse, naming ``source``, a LoRA state dict that does not fit ``model``: non-finite or non-tensor values,
    keys outside ``prefix`` (as the loader strips it) or naming no layer of the model, shapes or ranks that do not
    match the layers (or the metadata's ``r`` / ``rank_pattern``), a layer without its lora_A / lora_B pair (peft
    would leave the missing one on the meta device), adapter metadata peft's ``LoraConfig`` would crash on or ignore
    (``_check_metadata``). Nothing is loaded: the model is untouched either way."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    check_finite_lora_tensors(state_dict, source)
    metadata = _check_metadata(metadata, prefix, source) or None  # none under `prefix`: the ranks of the tensors
    keys = list(state_dict)
    start = f"{prefix}." if prefix is not None else ""
    foreign = [key for key in keys if not key.startswith(start)]
    ours = [key for key in keys if key.startswith(start)]
    # diffusers converts other key styles (`.lora.down`, `to_q_lora.up`) when the first key is not peft's
    convert = bool(ours) and "lora_A" not in ours[0][len(start) :] and not any(".lokr_" in key for key in ours)
    layers = _adaptable_layers(model)
    saved_modules = tuple((metadata or {}).get("modules_to_save") or ())
    weights = {_WRAPPER_NAME.sub("", key): value for key, value in model.state_dict().items() if "lora_" not in key}
    unmatched, ranks, parts = [], {}, {}
    for key in ours:
        name = key[len(start) :]
        if convert:
            name = next(iter(convert_unet_state_dict_to_peft({name: None})))
        tensor = state_dict[key]
        match = _ADAPTER_KEY.match(name)
        if match is None:
            # a layer trained in full (peft's `modules_to_save`), when the metadata says so
            owner = name.rsplit(".", 1)[0]
            if name in weights and any(owner == m or owner.endswith(f".{m}") for m in saved_modules):
                if tuple(tensor.shape) != tuple(weights[name].shape):
                    raise DiTOptimumError(
                        f"{source}: {key!r} has shape {tuple(tensor.shape)}, but this model's {name!r} has shape "
                        f"{tuple(weights[name].shape)}."
                    )
                continue
            unmatched.append(key)
            continue
        module, part = match["module"], match["part"]
        layer = layers.get(module)
        if layer is None:
            unmatched.append(key)
            continue
        rank = tensor.shape[0] if part == "lora_A.weight" and tensor.ndim else None
        if part == "lora_B.weight" and tensor.ndim > 1:
            rank = tensor.shape[1]
        expected = _expected_shape(layer, part, rank if rank is not None else 0)
        if expected is not None and (tuple(tensor.shape) != expected or rank == 0):
            raise DiTOptimumError(
                f"{source}: {key!r} has shape {tuple(tensor.shape)}, but this model's layer {module!r} "
                f"({_describe(layer)}) takes {_shape_text(expected, part)}."
            )
        if rank is not None:
            ranks.setdefault(module, {})[key] = rank
        parts.setdefault(module, set()).add(part.removesuffix(".weight"))
    if foreign or unmatched:
        bad = foreign + unmatched
        example = f"{start}{_example_layer(layers)}.lora_A.weight"
        if len(bad) == len(keys):
            prefixes = sorted({key.split(".", 1)[0] + "." for key in keys})
            hint = " Is it a LoRA for another model?"
            unprefixed = [_ADAPTER_KEY.match(key) for key in keys]
            if prefix is not None and any(match and match["module"] in layers for match in unprefixed):
                hint = (
                    f" Its keys lack the {start!r} prefix (a model-level file, as `save_lora_adapter` writes it): "
                    "load it with `transformer.load_lora_adapter(..., prefix=None)`."
                )
            elif prefix is None and any(
                (match := _ADAPTER_KEY.match(key.split(".", 1)[-1])) and match["module"] in layers for key in keys
            ):
                hint = (
                    f" Its keys carry a prefix such as {prefixes[0]!r} (a pipeline-level file, as "
                    "`pipe.save_lora_weights` writes it): load it with `pipe.load_lora_weights(...)` or "
                    "`transformer.load_lora_adapter(...)` (default prefix 'transformer')."
                )
            raise DiTOptimumError(
                f"{source} holds no LoRA weights for this model: its keys start with "
                f"{', '.join(repr(p) for p in prefixes[:_SHOWN_KEYS])} (e.g. {keys[0]!r}), while this model's LoRA "
                f"keys look like {example!r}.{hint}"
            )
        raise DiTOptimumError(
            f"{source}: {len(bad)} of {len(keys)} keys name no layer of this model, e.g. "
            f"{', '.join(repr(key) for key in bad[:_SHOWN_KEYS])}; this model's LoRA keys look like {example!r}."
        )
    _check_complete_layers(parts, metadata, source, start)
    expected_ranks = _metadata_ranks(metadata, list(parts), source, start)
    for module, found in ranks.items():
        values = set(found.values())
        expected_rank, said = expected_ranks.get(module, (None, ""))
        if len(values) > 1 or (expected_rank is not None and values != {expected_rank}):
            shown = ", ".join(f"{key!r}: rank {rank}" for key, rank in found.items())
            wanted = f" (the metadata's {said} says rank {_shown(expected_rank)})" if expected_rank is not None else ""
            raise DiTOptimumError(f"{source}: the LoRA ranks of layer {module!r} do not match: {shown}{wanted}.")


# The parts every adapted layer needs, by the family of its first part (peft leaves a missing one on the meta device)
_PAIRS = {
    "lora_A": ("lora_A", "lora_B"),
    "lora_B": ("lora_A", "lora_B"),
    "lora_embedding_A": ("lora_embedding_A", "lora_embedding_B"),
    "lora_embedding_B": ("lora_embedding_A", "lora_embedding_B"),
}
# Parts that one layer has only if every layer has them, as the config's flag says (missing ones stay on meta)
_ALL_OR_NONE = {"lora_B.bias": "lora_bias", "lora_magnitude_vector": "use_dora"}


def _check_complete_layers(parts: Mapping[str, set], metadata: Mapping | None, source: str, start: str) -> None:
    """Every adapted layer has its lora_A and lora_B pair; a bias (``lora_bias``) or DoRA magnitude (``use_dora``)
    is on every layer or none, as the metadata says."""
    for module, found in parts.items():
        needed = {name for part in found for name in _PAIRS.get(part.split(".")[0], ())}
        if any(part in _ALL_OR_NONE for part in found):
            needed |= {"lora_A", "lora_B"}
        missing = sorted(needed - found)
        if missing:
            raise DiTOptimumError(
                f"{source}: layer {module!r} has {', '.join(sorted(found))} but no {' or '.join(missing)} weight; "
                "every adapted layer needs both its lora_A and lora_B weights (an incomplete file?)."
            )
    paired = [module for module, found in parts.items() if "lora_A" in found]
    both = [module for module in paired if set(_ALL_OR_NONE) <= parts[module]]
    if both or (metadata is not None and metadata.get("use_dora") and metadata.get("lora_bias")):
        where = (
            f"layer {both[0]!r} has" if both else f"its adapter metadata `{start}use_dora` and `{start}lora_bias` say"
        )
        raise DiTOptimumError(
            f"{source}: {where} both a DoRA magnitude and a lora_B bias; peft supports one or the other, not both."
        )
    for part, flag in _ALL_OR_NONE.items():
        having = [module for module in paired if part in parts[module]]
        if having and len(having) != len(paired):
            lacking = next(module for module in paired if part not in parts[module])
            raise DiTOptimumError(
                f"{source}: {len(having)} of {len(paired)} adapted layers have a {part!r} tensor but layer "
                f"{lacking!r} does not; a LoRA has it on every layer or none."
            )
        if metadata is not None and paired and bool(metadata.get(flag, False)) != bool(having):
            said = "true" if metadata.get(flag, False) else "false (or unset)"
            has = "has" if having else "has no"
            raise DiTOptimumError(
                f"{source}: its adapter metadata `{start}{flag}` is {said}, but the file {has} {part!r} tensors; "
                f"allowed: `{start}{flag}`={'true' if having else 'false'} for this file."
            )


def _metadata_ranks(
    metadata: Mapping | None, modules: Sequence[str], source: str, start: str
) -> dict[str, tuple[int, str]]:
    """The rank peft will give each adapted layer from the metadata (``rank_pattern``, else ``r``, else peft's
    default), with the key that says it; the rank and alpha patterns must each match an adapted layer."""
    if metadata is None:
        return {}  # diffusers reads the ranks from the tensors
    from peft.utils.other import get_pattern_key

    for name in ("rank_pattern", "alpha_pattern"):
        for pattern in metadata.get(name) or {}:
            if not any(re.match(rf"(.*\.)?({pattern})$", module) for module in modules):
                raise DiTOptimumError(
                    f"{source} has adapter metadata `{start}{name}` key {_shown(pattern)} that matches no layer of "
                    f"the file; keys are patterns of the adapted layers' names, e.g. "
                    f"{_shown(min(modules, default='attn1.to_q'))}."
                )
    default = metadata.get("r", _lora_config_defaults()["r"])
    ranks = {}
    pattern = metadata.get("rank_pattern") or {}
    for module in modules:
        key = get_pattern_key(list(pattern), module)
        if key in pattern:
            ranks[module] = (pattern[key], f"`{start}rank_pattern`[{key!r}]")
        else:
            ranks[module] = (default, f"`{start}r`")
    return ranks


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features} -> {layer.out_features}"
    if isinstance(layer, nn.Conv2d):
        return f"Conv2d {layer.in_channels} -> {layer.out_channels}, kernel {tuple(layer.kernel_size)}"
    return type(layer).__name__


def _shape_text(expected: tuple[int, ...], part: str) -> str:
    if part == "lora_A.weight":
        return f"(rank, {', '.join(str(size) for size in expected[1:])})"
    if part == "lora_B.weight":
        return f"({expected[0]}, rank{''.join(f', {size}' for size in expected[2:])})"
    return str(expected)


def _example_layer(layers: Mapping[str, nn.Module]) -> str:
    for name in layers:
        if name.startswith("transformer_blocks.0.") and name.endswith("attn1.to_q"):
            return name
    return next(iter(layers), "transformer_blocks.0.attn1.to_q")


def load_checked_lora(
    model: nn.Module,
    pretrained_model_name_or_path_or_dict: Any,
    prefix: str | None,
    metadata: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """Read (``read_lora_weights``) and check (``check_lora_state_dict``) a LoRA for ``model``: the one reader of
    both the model-level and the pipeline-level loaders. Returns ``(state_dict, metadata, source)``; ``metadata``
    given by the caller takes the place of the file's, as in diffusers."""
    state_dict, file_metadata, source = read_lora_weights(pretrained_model_name_or_path_or_dict, **options)
    metadata = file_metadata if metadata is None else metadata
    check_lora_state_dict(model, state_dict, prefix, source, metadata)
    if metadata is not None and not _check_metadata(metadata, prefix, source):
        metadata = None  # nothing under this prefix: diffusers would build peft's defaults (rank 8), not the file's
    return state_dict, metadata, source


# Adapter names and the methods that choose among loaded adapters (set_adapters, fuse_lora, delete_adapters): an
# unknown name or a weight that matches nothing is refused naming the adapters there are, instead of a silent no-op.


def check_adapter_name(name: Any, parameter: str = "adapter_name") -> None:
    """A name a new adapter can take: a non-empty string without dots that is not an attribute of peft's
    ``ModuleDict`` of adapters (torch refuses those half-way through injecting the layers)."""
    if name is None:
        return
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise DiTOptimumError(
            f"`{parameter}`={_shown(name)} is not a valid adapter name; allowed: a non-empty string without '.' "
            "(e.g. 'style'), not a name of nn.ModuleDict's attributes, or None for diffusers' default_<n>."
        )


def _adapter_names_of(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", None) or {})


def adapters_text(model: nn.Module) -> str:
    return ", ".join(_adapter_names_of(model)) or "none loaded"


def check_adapter_names(model: nn.Module, names: Any, parameter: str = "adapter_names") -> list[str]:
    """``names`` (one name or a list of them) as a list, each an adapter loaded into ``model``."""
    listed = [names] if isinstance(names, str) else names
    if not isinstance(listed, (list, tuple)) or not listed or not all(isinstance(n, str) for n in listed):
        raise DiTOptimumError(
            f"`{parameter}`={_shown(names)} must be an adapter name or a non-empty list of them; adapters: "
            f"{adapters_text(model)}."
        )
    unknown = [name for name in listed if name not in _adapter_names_of(model)]
    if unknown:
        raise DiTOptimumError(
            f"No LoRA adapter named {', '.join(repr(n) for n in unknown)} in `{parameter}`; adapters: "
            f"{adapters_text(model)}."
        )
    if len(set(listed)) != len(listed):
        raise DiTOptimumError(f"`{parameter}`={_shown(names)} names an adapter twice; give each name once.")
    return list(listed)


def _adapted_layer_names(model: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def check_adapter_weights(model: nn.Module, names: Sequence[str], weights: Any, parameter: str = "weights") -> None:
    """``set_adapters`` weights for the adapters ``names``: None, a number, a per-layer dict, or a list of those
    with one entry per adapter. A per-layer dict's keys are parts of the adapted layers' names (diffusers matches
    them as substrings, a layer no key matches keeping weight 1.0): a key that matches no layer is refused, and so
    are values that are not numbers. (Finite values: ``check_adapter_scales``.)"""
    listed = weights if isinstance(weights, list) else [weights] * len(names)
    if len(listed) != len(names):
        raise DiTOptimumError(
            f"`{parameter}` has {len(listed)} entries for {len(names)} adapters {list(names)}; give one weight per "
            "adapter (or one number for all)."
        )
    layers = None
    for name, weight in zip(names, listed, strict=True):
        if not isinstance(weight, Mapping):
            continue
        layers = _adapted_layer_names(model) if layers is None else layers
        for key, value in weight.items():
            if not isinstance(key, str) or not any(key in layer for layer in layers):
                blocks = sorted({".".join(layer.split(".")[:2]) for layer in layers})
                raise DiTOptimumError(
                    f"`{parameter}` for adapter {name!r} has the key {_shown(key)}, which matches no adapted layer; "
                    f"keys are parts of the adapted layers' names, e.g. {', '.join(repr(b) for b in blocks[:3])} or "
                    f"{_shown(layers[0] if layers else 'transformer_blocks.0.attn1')}."
                )
            if isinstance(value, (Mapping, list, tuple)):
                raise DiTOptimumError(
                    f"`{parameter}` for adapter {name!r} gives {key!r} the value {_shown(value)}; per-layer weights "
                    "are numbers."
                )


def check_no_lora_layers(model: nn.Module, pipeline: bool = False) -> None:
    """Refuse to save ``model`` (or the pipeline holding it) while peft layers are attached: its weights would be
    written under peft's ``base_layer`` / ``lora_`` keys, which no loader reads back."""
    if "peft" not in sys.modules:  # no peft layer can exist (and saving need not import it)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    if not any(isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for module in model.modules()):
        return
    adapters = ", ".join(getattr(model, "peft_config", {})) or "removed, its layers still attached"
    if pipeline:
        steps = (
            "call `pipe.fuse_lora()` then `pipe.unload_lora_weights()` to save the adapted model, or save the adapter "
            "with `pipe.transformer.save_lora_adapter(folder)` and remove it with `pipe.unload_lora_weights()` to "
            "save the base model"
        )
    else:
        steps = (
            "call `fuse_lora()` then `unload_lora()` to save the adapted model, or save the adapter with "
            "`save_lora_adapter(folder)` and remove it with `unload_lora()` to save the base model"
        )
    raise DiTOptimumError(
        f"Saving a model with a LoRA adapter attached (adapters: {adapters}) is not supported: its weights would be "
        f"saved under peft's `base_layer` keys and could not be loaded. To save, {steps}."
    )
