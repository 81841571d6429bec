"""DiTOptimumTransformer2DModel: diffusers' DiT with swappable attention and one shared conditioning embedding."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import AdaLayerNormZero
from torch import nn

from ..configs import dit_config
from ..errors import DiTOptimumError, MissingPathError, ModelFileError, keeping_type
from ..schemas import check_component_folder
from ..utils import check_variant, first_line, pop_unsupported_save_options
from ..utils import save_directory as save_directory_into
from .attention import (
    ATTENTION_SPECS,
    ATTENTION_TYPES,
    FOCUSED_VARIANTS,
    AttentionConfig,
    DiTAttention,
    _shown,
    check_focusing_factor,
    resolve_num_kv_heads,
)
from .block_cache import BLOCK_SCHEDULE_HOOK, BlockCacheSchedule, apply_block_schedule
from .moe import MoEFeedForward
from .resources import check_resources
from .runtimes import ExportedRuntime, check_exportable, make_runtime

# diffusers' DiTPipeline always passes 1000 as the unconditional ("null") class.
DIFFUSERS_NULL_CLASS = 1000
# Set (to the reason) on a model whose quantized form cannot be saved as a diffusers folder.
UNSERIALIZABLE_ATTRIBUTE = "_dit_optimum_unserializable"
# Set by the weight loading to the files it read, for from_pretrained's checks (then removed).
_LOADED_FILES_ATTRIBUTE = "_dit_optimum_loaded_files"
# The feed-forward activations diffusers' FeedForward implements.
ACTIVATION_FUNCTIONS: tuple[str, ...] = (
    "gelu",
    "gelu-approximate",
    "geglu",
    "geglu-approximate",
    "swiglu",
    "linear-silu",
)
_GATED_ACTIVATIONS = ("geglu", "geglu-approximate", "swiglu")  # their first projection is twice as wide
_STOCK_BLOCK_EMBEDDING = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\.(.+)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Config keys by kind: every key is checked for its type and range before anything is built.
_POSITIVE_INTEGERS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "num_layers",
    "sample_size",
    "patch_size",
    "num_embeds_ada_norm",
    "attention_compression",
    "num_mediators",
    "moe_top_k",
    "moe_every",
    "norm_num_groups",  # a stock DiT key this model does not use: still an integer
)
_OPTIONAL_POSITIVE_INTEGERS = ("out_channels", "num_kv_heads", "dwconv_kernel_size", "moe_expert_dim")
_NON_NEGATIVE_INTEGERS = ("moe_num_experts", "moe_num_shared_experts")
# Every integer key (and per-layer list entry) is at most this: far beyond any model that fits in memory (the memory
# check names the key that is too large), small enough that the size arithmetic never overflows a float.
MAX_CONFIG_INTEGER = 2**31 - 1
_BOOLEANS = ("attention_bias", "upcast_attention", "norm_elementwise_affine", "original_timestep_embedding")
# name -> the strings allowed
_CHOICES: dict[str, tuple[str, ...]] = {
    "norm_type": ("ada_norm_zero",),
    "activation_fn": ACTIVATION_FUNCTIONS,
    "attention_type": ATTENTION_TYPES,
    "focused_variant": FOCUSED_VARIANTS,
}
# name -> (minimum, maximum, minimum allowed, maximum allowed): every number is finite and bounded
_NUMBERS: dict[str, tuple[float, float, bool, bool]] = {
    "dropout": (0, 1, True, False),
    "class_dropout_prob": (0, 1, True, False),
    # below 1e-12 the epsilon vanishes in float16/float32 sums (1e-320 is 0 in float32: a 0/0 on a constant token)
    "norm_eps": (1e-12, 1, True, True),
    "mlp_ratio": (0, 256, False, True),
    # at num_experts / moe_top_k every assignment fits already: larger factors change nothing (capacity <= tokens)
    "moe_capacity_factor": (0, 64, False, True),
    "moe_balance_loss_weight": (0, 100, True, True),
    "moe_router_z_loss_weight": (0, 100, True, True),
}


def _check_number(name: str, value: Any, bounds: tuple[float, float, bool, bool]) -> None:
    # No float() of an unchecked value: an integer of 400 digits is out of range, not an OverflowError.
    minimum, maximum, include_minimum, include_maximum = bounds
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if valid and not isinstance(value, numbers.Integral):
        try:
            valid = math.isfinite(float(value))
        except (OverflowError, ValueError):  # a Fraction beyond any float
            valid = False
    if valid:  # exact comparisons: an integer of any size compares with the float bounds without overflowing
        valid = (value >= minimum if include_minimum else value > minimum) and (
            value <= maximum if include_maximum else value < maximum
        )
    if not valid:
        low, high = "[" if include_minimum else "(", "]" if include_maximum else ")"
        raise DiTOptimumError(
            f"`{name}`={_shown(value)} must be a finite number in {low}{minimum:g}, {maximum:g}{high}."
        )


def _check_config_types(config: Any) -> None:
    for name in _POSITIVE_INTEGERS + _OPTIONAL_POSITIVE_INTEGERS + _NON_NEGATIVE_INTEGERS:
        value = getattr(config, name)
        if value is None and name in _OPTIONAL_POSITIVE_INTEGERS:
            continue
        lowest = 0 if name in _NON_NEGATIVE_INTEGERS else 1
        if not _is_int(value) or not lowest <= value <= MAX_CONFIG_INTEGER:
            kind = "an integer >= 0" if lowest == 0 else "a positive integer"
            optional = " or None" if name in _OPTIONAL_POSITIVE_INTEGERS else ""
            raise DiTOptimumError(f"`{name}`={_shown(value)} must be {kind} <= {MAX_CONFIG_INTEGER}{optional}.")
    for name in _BOOLEANS:
        if not isinstance(getattr(config, name), bool):
            raise DiTOptimumError(f"`{name}`={_shown(getattr(config, name))} must be true or false.")
    for name, allowed in _CHOICES.items():
        value = getattr(config, name)
        if not isinstance(value, str) or value not in allowed:  # a list or dict: refused, not an unhashable error
            raise DiTOptimumError(f"Unknown `{name}`={_shown(value)}; allowed values: {', '.join(allowed)}.")
    for name, bounds in _NUMBERS.items():
        _check_number(name, getattr(config, name), bounds)
    check_focusing_factor(config.focusing_factor)  # [1, 10]: the range where focused attention stays meaningful


def _parameter_counts(config: Any) -> dict[str, int]:
    """Float32 values of every weight and buffer a type-checked config builds, by the config keys that size them
    (a label naming the keys and their values). An upper estimate: K/V heads and compressed widths are counted at
    the query width. Counted per block from ``layer_heads`` / ``layer_mlp_dims`` and the MoE keys."""
    heads, head_dim, layers = config.num_attention_heads, config.attention_head_dim, config.num_layers
    dim, patch = heads * head_dim, config.patch_size
    base = f"`num_layers`={layers} at width `num_attention_heads` x `attention_head_dim`={heads} x {head_dim}"
    counts: dict[str, int] = {}

    def add(label: str, count: int) -> None:
        counts[label] = counts.get(label, 0) + count

    spec = ATTENTION_SPECS[config.attention_type]
    kernel = (config.dwconv_kernel_size or spec.dwconv_kernel) if spec.dwconv_kernel is not None else None
    gated = config.activation_fn in _GATED_ACTIVATIONS
    experts, shared, top_k = config.moe_num_experts, config.moe_num_shared_experts, config.moe_top_k
    expert_dim = config.moe_expert_dim
    expert_label = f"`moe_num_experts`={experts}" + (f" x `moe_expert_dim`={expert_dim}" if expert_dim else "")
    shared_label = f"`moe_num_shared_experts`={shared}" + (f" x `moe_expert_dim`={expert_dim}" if expert_dim else "")
    attention_label = base if config.layer_heads is None else f"`layer_heads`={_shown(config.layer_heads)}"
    conv_label = f"`dwconv_kernel_size`={kernel}" if config.dwconv_kernel_size else attention_label
    if config.layer_mlp_dims is not None:
        mlp_label = f"`layer_mlp_dims`={_shown(config.layer_mlp_dims)}"
    else:
        mlp_label = f"`mlp_ratio`={config.mlp_ratio!r} at width {dim}"

    def block(layer_heads: int, mlp: int, moe: bool, repeat: int) -> None:
        inner = layer_heads * head_dim
        add(attention_label, repeat * (4 * dim * inner + 3 * inner + dim))  # q, k, v, out and their biases
        if kernel:
            add(conv_label, repeat * inner * (kernel * kernel + 1))
        if not moe:  # diffusers' FeedForward: in (twice as wide when gated) and out projections
            add(mlp_label, repeat * ((2 if gated else 1) * (dim + 1) * mlp + mlp * dim + dim))
            return
        width = expert_dim or mlp // top_k
        add(expert_label, repeat * experts * (2 * dim * width + width + 2 * dim + 1))  # router, experts, counts
        if shared:
            add(shared_label, repeat * (shared * width * (2 * dim + 1) + dim))

    listed = None if config.moe_layers is None else set(config.moe_layers)

    def is_moe(index: int) -> bool:  # as `is_moe_layer`
        return experts > 0 and (index in listed if listed is not None else (index + 1) % config.moe_every == 0)

    if config.layer_heads is None and config.layer_mlp_dims is None:  # uniform blocks: no loop over the layers
        moe_count = 0 if experts == 0 else len(listed) if listed is not None else layers // config.moe_every
        block(heads, int(dim * config.mlp_ratio), False, layers - moe_count)
        if moe_count:
            block(heads, int(dim * config.mlp_ratio), True, moe_count)
    else:  # the lists hold one entry per layer
        for index in range(layers):
            layer_heads = heads if config.layer_heads is None else config.layer_heads[index]
            mlp = int(dim * config.mlp_ratio) if config.layer_mlp_dims is None else config.layer_mlp_dims[index]
            block(layer_heads, mlp, is_moe(index), 1)
    add(base, layers * (6 * dim * dim + 8 * dim))  # adaLN-Zero modulation, norm2
    add(base, 256 * dim + dim * dim + 2 * dim + 2 * dim * dim + 2 * dim)  # timestep embedder, proj_out_1
    tokens = (config.sample_size // patch) ** 2
    add(f"`sample_size` / `patch_size`={config.sample_size} / {patch} ({tokens} tokens)", tokens * dim)
    add(f"`num_embeds_ada_norm`={config.num_embeds_ada_norm}", (config.num_embeds_ada_norm + 1) * dim)
    out = config.in_channels if config.out_channels is None else config.out_channels
    add(
        f"`patch_size`={patch} with `in_channels`={config.in_channels} / `out_channels`={out}",
        (config.in_channels + out) * patch * patch * dim + dim + patch * patch * out,
    )
    return counts


def estimated_parameter_bytes(config: Any) -> int:
    """Upper estimate of the float32 weights and buffers a config builds (before building it): every key that sizes
    a weight counts (width, depth, ``layer_heads``, ``layer_mlp_dims``, MoE experts, shared experts and expert
    width, depthwise kernel, position and class tables)."""
    return 4 * sum(_parameter_counts(config).values())


def estimated_activation_bytes(config: Any, batch_size: int, training: bool = False) -> int:
    """Rough upper estimate of one forward's float32 activations at ``batch_size`` (attention scores included, as
    the math path materialises them); with ``training`` every block's activations are kept for the backward.
    A config not validated yet (a training command's overrides) may raise ``ValueError`` / ``TypeError``: the
    model's own validation names the key when it is built."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (config["sample_size"] // config["patch_size"]) ** 2
    try:
        mlp = int(dim * config.get("mlp_ratio", 4.0))
        if config.get("layer_mlp_dims"):  # pruned widths: the widest block
            mlp = max(config["layer_mlp_dims"])
        experts = config.get("moe_num_experts") or 0
        if experts:  # per token: the expert slots it may fill (at most one per expert) and any shared experts
            top_k = config.get("moe_top_k", 2)
            width = config.get("moe_expert_dim") or mlp // top_k
            slots = min(experts, math.ceil(config.get("moe_capacity_factor", 1.25) * top_k))
            mlp = max(mlp, width * (slots + config.get("moe_num_shared_experts", 0)))
    except OverflowError as error:  # e.g. mlp_ratio=1e308 in unvalidated overrides
        raise ValueError(f"a model config value out of range ({error})") from error
    per_block = batch_size * tokens * (8 * dim + 2 * mlp) + batch_size * config["num_attention_heads"] * tokens**2
    blocks = 3 * config["num_layers"] if training else 2
    return 4 * per_block * blocks


def check_activation_memory(config: Any, batch_size: int, parameter: str, training: bool = False) -> None:
    """Refuse a batch whose activations cannot fit in the memory available now, naming ``parameter`` and the largest
    batch that fits (``resources.check_resources``, the check the Python API makes too)."""
    check_resources(config, parameter=parameter, images=batch_size, training=training)


# safetensors dtype codes that are not floating point (torch's names), and those of complex numbers
_SAFETENSORS_NON_FLOAT = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "C64": "complex64",
    "C128": "complex128",
}


def _model_key(file_key: str) -> str:
    # a stock diffusers checkpoint's per-block embedder copies load into the shared conditioning embedding
    match = _STOCK_BLOCK_EMBEDDING.match(file_key)
    return f"conditioning_embedding.{match.group(2)}" if match else file_key


def _safetensors_dtypes(path: str) -> dict[str, str]:
    """Tensor name -> dtype code from a safetensors file's header (the tensors themselves are not read)."""
    with open(path, "rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(size))
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def check_weight_dtypes(module: nn.Module, files: list[str]) -> None:
    """Refuse a checkpoint holding an integer, bool or complex tensor where ``module`` has a plain floating-point
    parameter or buffer (loading would cast it to float silently: bools to 0/1, complex numbers without their
    imaginary part), naming the file and tensor. Quantized checkpoints keep loading: their integer tensors have
    names of their own (``weight._data``, ``_weight_qdata``) or load into quantized tensor subclasses."""
    floats = {
        name: tensor
        for name, tensor in module.state_dict().items()
        if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_floating_point()
    }
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        for key, code in _safetensors_dtypes(str(path)).items():
            if code in _SAFETENSORS_NON_FLOAT and _model_key(key) in floats:
                raise DiTOptimumError(
                    f"The weights in {str(path)!r} hold tensor {key!r} as {_SAFETENSORS_NON_FLOAT[code]}, where the "
                    "model has a floating-point weight: loading would silently cast it to float. A model's weights "
                    "are stored as float16, bfloat16, float32 or float64 (quantized checkpoints declare a "
                    "`quantization_config` in config.json); re-save the model from good weights."
                )


def _cast_overflow(name: str, tensor: torch.Tensor, files: list[str], source: str) -> DiTOptimumError | None:
    """The error for a non-finite ``tensor`` whose values in the file are finite: the cast to the loading dtype
    overflowed (e.g. float32 weights of 1e30 loaded with ``torch_dtype=torch.float16``); None otherwise."""
    from safetensors import safe_open

    wanted = {name}
    if name.startswith("conditioning_embedding."):  # a stock checkpoint: block 0's copy is the one loaded
        wanted.add(f"transformer_blocks.0.norm1.emb.{name.removeprefix('conditioning_embedding.')}")
    for path in files:
        if not str(path).endswith(".safetensors") or not os.path.isfile(path):
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                key = next(iter(sorted(wanted.intersection(handle.keys()))), None)
                stored = None if key is None else handle.get_tensor(key)
        except Exception:  # an unreadable file: the generic message stands
            return None
        if stored is None:
            continue
        if not stored.is_floating_point() or stored.shape != tensor.shape or stored.dtype == tensor.dtype:
            return None
        values = stored if stored.dtype.itemsize > 1 else stored.float()
        if not bool(torch.isfinite(values).all()):
            return None
        largest = float(values.abs().max().double())
        target = str(tensor.dtype).replace("torch.", "")
        wider = "torch.float32 or torch.bfloat16" if largest <= torch.finfo(torch.float32).max else "torch.float64"
        bad = int((~torch.isfinite(tensor)).sum())
        return DiTOptimumError(
            f"The weights in {str(path)!r} are finite, but tensor {name!r} holds values up to {largest:.3g}, beyond "
            f"the range of {target} (largest {torch.finfo(tensor.dtype).max:.5g}): casting them to {target} (the "
            f"`torch_dtype` the model was loaded with) turned {bad} of {tensor.numel()} into inf. The file is fine; "
            f"load it with `torch_dtype`={wider} (loaded from {source!r})."
        )
    return None


def check_finite_weights(module: nn.Module, source: str, files: list[str] | None = None) -> None:
    """Refuse a module whose floating-point weights or buffers hold NaN or inf, naming ``source`` (the file or folder
    they were loaded from) and the first such tensor. One reduction per tensor (on its device); quantized
    tensor subclasses are skipped (their integer data cannot be non-finite). ``files`` (the safetensors files
    loaded; by default ``source``'s ``diffusion_pytorch_model.safetensors`` when it is a folder) tell a damaged file
    from finite values that overflowed in the cast to a narrower ``torch_dtype``."""
    tensors = [
        (name, tensor)
        for name, tensor in module.state_dict().items()
        if type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.is_floating_point()
        and tensor.numel()
        and not tensor.is_meta
    ]
    if not tensors:
        return
    # float8 has no isfinite kernel: those (small) tensors are checked in float32
    tensors = [(name, tensor if tensor.dtype.itemsize > 1 else tensor.float()) for name, tensor in tensors]
    finite = torch.stack([torch.isfinite(tensor).all().cpu() for _, tensor in tensors])
    if bool(finite.all()):
        return
    name, tensor = tensors[int((~finite).nonzero()[0])]
    if files is None:
        default = Path(source) / "diffusion_pytorch_model.safetensors"
        files = [str(default)] if default.is_file() else [source]
    overflow = _cast_overflow(name, tensor, files, source)
    if overflow is not None:
        raise overflow
    bad = int((~torch.isfinite(tensor)).sum())
    raise DiTOptimumError(
        f"The weights in {source!r} are not finite: tensor {name!r} holds {bad} NaN/inf value(s) of {tensor.numel()} "
        "(a diverged training run or a damaged file); re-save the model from good weights."
    )


def _check_fits_in_memory(config: Any) -> None:
    import psutil

    from .resources import _size

    counts = _parameter_counts(config)
    needed, available = 4 * sum(counts.values()), psutil.virtual_memory().available
    if needed > available:
        label, largest = max(counts.items(), key=lambda item: item[1])
        raise DiTOptimumError(
            f"This config (num_layers={config.num_layers}, width {config.num_attention_heads}x"
            f"{config.attention_head_dim}, sample_size={config.sample_size}, patch_size={config.patch_size}) needs "
            f"about {_size(needed)} for its weights alone; {_size(available)} are available. The largest part "
            f"({_size(4 * largest)}) is sized by {label}: use smaller values."
        )


@contextlib.contextmanager
def outside_sampling(model: nn.Module) -> Iterator[None]:
    """Around forwards made outside a pipeline's denoising loop (timing, FLOP counting, memory): a step cache is
    switched off and back on afterwards (same config, calibrations kept), so every forward computes every block
    (some hooks, e.g. FasterCache, also assume a guided batch that such forwards do not have); else nothing."""
    config = getattr(model, "_cache_config", None)
    if config is None:
        yield
        return
    model.disable_cache()
    try:
        yield
    finally:
        model.enable_cache(config)


def _weights_file(folder: Path, variant: str | None) -> str:
    # The file diffusers read (sharded or Hub weights: the folder), to name it in an error.
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    return str(folder / name) if (folder / name).is_file() else str(folder)


def _no_pickled_fallback(folder: Path, variant: str | None, error: OSError) -> str:
    """For a folder without its safetensors weights: what diffusers would read next, its pickled ``.bin`` file
    (which this package never loads), in diffusers' own words, so the message says whether that file is there."""
    text = str(error)
    if "Error no file named" not in text or ".safetensors" not in text or not folder.is_dir():
        return ""
    from diffusers.utils import WEIGHTS_NAME, _add_variant

    name = _add_variant(WEIGHTS_NAME, variant)
    if (folder / name).exists():
        return f" The folder holds {name}, pickled weights, which are not loaded (safetensors only): re-save them."
    return f" diffusers' pickled fallback finds nothing either: Error no file named {name} found in directory {folder}."


def check_adapter_scales(name: str, value: Any, dtype: torch.dtype = torch.float32) -> None:
    """LoRA scales (``lora_scale``, ``set_adapters`` weights, ``lora_alpha``: a number, None, or lists / per-block
    dicts of them) must be finite numbers whose size the weights' ``dtype`` can hold: NaN, inf or a scale that is
    inf in that dtype would turn every output into NaN. Raises naming ``name`` and the range."""
    import numbers

    if value is None:
        return
    if isinstance(value, dict):
        for item in value.values():
            check_adapter_scales(name, item, dtype)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_adapter_scales(name, item, dtype)
        return
    largest = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        valid = valid and math.isfinite(float(value)) and abs(float(value)) <= largest
    except OverflowError:  # an integer beyond any float
        valid = False
    if not valid:
        raise DiTOptimumError(
            f"LoRA `{name}`={value!r} must be a finite number in [-{largest:g}, {largest:g}] (the range of the "
            f"weights' {str(dtype).replace('torch.', '')}), or a list / dict of them."
        )


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` carries quantized weights (a diffusers quantization config, or quanto's unsaveable form)."""
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None or hasattr(model, UNSERIALIZABLE_ATTRIBUTE)


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block; submodule names match diffusers' ``BasicTransformerBlock`` for weight compatibility.

    ``feed_forward`` replaces the dense MLP (a ``MoEFeedForward`` in MoE blocks).
    """

    def __init__(
        self,
        dim: int,
        attention: DiTAttention,
        feed_forward: nn.Module | None,
        ff_inner_dim: int,
        dropout: float,
        activation_fn: str,
        norm_elementwise_affine: bool,
        norm_eps: float,
    ):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, num_embeddings=None)
        self.attn1 = attention
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = feed_forward or FeedForward(dim, dropout=dropout, activation_fn=activation_fn, inner_dim=ff_inner_dim)

    def forward(
        self, hidden_states: torch.Tensor, conditioning: torch.Tensor, grid_size: tuple[int, int]
    ) -> torch.Tensor:
        # hidden_states: (B, N, dim); conditioning: (B, dim)
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=conditioning)
        hidden_states = gate_msa.unsqueeze(1) * self.attn1(norm_hidden, grid_size) + hidden_states
        norm_hidden = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return gate_mlp.unsqueeze(1) * self.ff(norm_hidden) + hidden_states


class DiTOptimumTransformer2DModel(DiTTransformer2DModel, AttentionMixin, PeftAdapterMixin, CacheMixin):
    """A ``DiTTransformer2DModel`` whose config also picks the attention type and computes conditioning once.

    Loads stock diffusers DiT folders unchanged (the per-block copies of the timestep/class embedder collapse into
    ``conditioning_embedding``). Extra config keys:

    - ``attention_type``: one of ``ATTENTION_TYPES`` with its parameters ``num_kv_heads`` (gqa types),
      ``attention_compression`` (shallow), ``num_mediators`` (mediated), ``focusing_factor``,
      ``focused_variant`` (focused types) and ``dwconv_kernel_size`` (mediated and focused; default 3 / 5).
    - ``class_dropout_prob``: label dropout for classifier-free guidance; the null class is ``num_embeds_ada_norm``.
    - ``original_timestep_embedding``: use the original DiT sinusoid (frequency shift 0) instead of diffusers'
      (shift 1), so that converted original checkpoints reproduce the original model.
    - ``layer_heads`` / ``layer_mlp_dims``: per-block widths written by structured pruning.
    - ``moe_*``: mixture-of-experts feed-forward (``moe_num_experts`` > 0) in every ``moe_every``-th block (or the
      blocks in ``moe_layers``), top-``moe_top_k`` routing, ``moe_num_shared_experts``, ``moe_capacity_factor``,
      ``moe_expert_dim`` (default: the MLP width / top-k, so active compute matches the dense MLP), and the
      balance / router z-loss weights.
    - ``block_cache_schedule``: a per-step block reuse schedule (``BlockCacheSchedule.to_dict()``), enabled at
      construction, so that a release saved with ``enable_cache(schedule)`` samples with it after loading.
    - ``runtime``: ``{"backend": "openvino" | "onnxruntime", "precision": ...}`` (``runtimes.RUNTIMES``): forwards
      without gradients run an exported graph of the whole forward, saved beside the weights (``enable_runtime``).
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "conditioning_embedding"]
    _no_split_modules = ["DiTBlock"]
    _contiguous_block_inputs = False  # set by `compile_repeated_blocks`
    _repeated_blocks = ["DiTBlock"]  # regional compilation: `compile_repeated_blocks()` compiles one block once

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        attention_type: str = "sdpa",
        num_kv_heads: int | None = None,
        attention_compression: int = 2,
        num_mediators: int = 4,
        focusing_factor: float = 3.0,
        dwconv_kernel_size: int | None = None,
        focused_variant: str = "published",
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        original_timestep_embedding: bool = False,
        layer_heads: list[int] | None = None,
        layer_mlp_dims: list[int] | None = None,
        moe_num_experts: int = 0,
        moe_top_k: int = 2,
        moe_num_shared_experts: int = 0,
        moe_capacity_factor: float = 1.25,
        moe_every: int = 1,
        moe_layers: list[int] | None = None,
        moe_expert_dim: int | None = None,
        moe_balance_loss_weight: float = 0.01,
        moe_router_z_loss_weight: float = 0.0,
        block_cache_schedule: dict[str, Any] | None = None,
        runtime: dict[str, str] | None = None,
    ):
        # Skip DiTTransformer2DModel.__init__ (it would build stock blocks); the class stays one for isinstance checks.
        ModelMixin.__init__(self)
        self._validate_config()

        self.attention_head_dim = attention_head_dim
        self.inner_dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False
        self.height = self.width = sample_size
        self.patch_size = patch_size

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
        )
        self.conditioning_embedding = CombinedTimestepLabelEmbeddings(
            num_embeds_ada_norm, self.inner_dim, class_dropout_prob=class_dropout_prob
        )
        if original_timestep_embedding:
            self.conditioning_embedding.time_proj.downscale_freq_shift = 0
        self.transformer_blocks = nn.ModuleList([self._build_block(index) for index in range(num_layers)])
        self.norm_out = nn.LayerNorm(self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(self.inner_dim, 2 * self.inner_dim)
        self.proj_out_2 = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        if block_cache_schedule is not None and runtime is not None:
            raise DiTOptimumError(
                "The config has both `block_cache_schedule` and `runtime`: a runtime runs the whole forward as one "
                "graph, so a step cache cannot skip blocks inside it; drop one of them."
            )
        self._runtime = None
        if block_cache_schedule is not None:  # a saved reuse schedule is part of the model: on from the start
            self.enable_cache(BlockCacheSchedule.from_dict(block_cache_schedule, num_layers))
        if runtime is not None:  # its graph: loaded by from_pretrained, or exported at the first forward
            self._runtime = make_runtime(runtime)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """diffusers' loader, made strict: safetensors only, and the weights must match the config exactly.

        A missing, unreadable or inconsistent file raises ``DiTOptimumError`` naming the folder, instead of a
        random-initialised or silently truncated model after a warning. Where diffusers raises another type the
        error is that type too: a missing or unreadable file (weights, config, folder) is a ``ModelFileError``, an
        ``OSError`` as in diffusers, so its variant fallback and callers catching ``OSError`` keep working.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        where = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        dtype = kwargs.get("torch_dtype")
        if dtype is not None and not isinstance(dtype, torch.dtype):  # diffusers would ignore a name and load fp32
            raise DiTOptimumError(f"`torch_dtype`={dtype!r} must be a torch.dtype, e.g. torch.bfloat16, or None.")
        if kwargs.get("subfolder") and os.path.isdir(str(pretrained_model_name_or_path)) and not where.is_dir():
            raise MissingPathError(
                f"`subfolder`={kwargs['subfolder']!r} does not exist in {str(pretrained_model_name_or_path)!r}."
            )
        try:
            check_component_folder(where)  # a local folder: its config a JSON object, its files regular ones
        except DiTOptimumError as error:
            if isinstance(error, OSError):
                raise
            raise ModelFileError(str(error)) from error  # a damaged config.json is an OSError in diffusers too
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except DiTOptimumError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as error:
            message = f"Could not load the transformer from {str(where)!r}: {first_line(error)}"
            if isinstance(error, OSError):
                message += _no_pickled_fallback(where, kwargs.get("variant"), error)
            raise keeping_type(error, message) from error  # diffusers' type: an OSError stays an OSError
        problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
        problems["mismatched_keys"] = [key for key, *_ in info.get("mismatched_keys") or []]
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            details = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys[:4])}" for kind, keys in problems.items())
            raise DiTOptimumError(
                f"The weights in {str(where)!r} do not match its config.json ({details}); the folder is "
                "inconsistent (edited config or mixed files): re-save the model."
            )
        files = model.__dict__.pop(_LOADED_FILES_ATTRIBUTE, None)
        check_finite_weights(model, _weights_file(where, kwargs.get("variant")), files)
        if model._runtime is not None:
            if model.dtype != torch.float32:
                raise DiTOptimumError(
                    f"{str(where)!r} runs with {model._runtime.describe()}, exported from float32 weights: load it "
                    f"without `torch_dtype`={model.dtype} (the runtime chooses its compute precision), or with "
                    "`runtime=None` to run it in torch at that dtype."
                )
            if where.is_dir():  # a local folder: its saved graph, when it matches
                model._runtime.load(model, where)
        return (model, info) if wants_info else model

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, resolved_model_file, *args: Any, **kwargs: Any):
        """diffusers' weight loading, after refusing integer/bool/complex tensors for float weights (the load would
        cast them silently); the files read are kept for ``from_pretrained``'s finite-weights check."""
        files = [str(path) for path in resolved_model_file or [] if isinstance(path, (str, os.PathLike))]
        check_weight_dtypes(model, files)
        if len(args) >= 2:  # (source, loaded_keys, ...): a quantizer may name stock per-block keys (stock.py)
            from .stock import map_stock_loaded_keys

            args = (args[0], map_stock_loaded_keys(args[1], kwargs.get("hf_quantizer")), *args[2:])
        result = super()._load_pretrained_model(model, state_dict, resolved_model_file, *args, **kwargs)
        model.__dict__[_LOADED_FILES_ATTRIBUTE] = files
        return result

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> DiTOptimumTransformer2DModel:
        """Randomly initialised model from a preset name such as ``"DiT-S/2"`` (see ``configs.dit_config``)."""
        return cls(**dit_config(name, **kwargs))

    @property
    def num_classes(self) -> int:
        return self.config.num_embeds_ada_norm

    @property
    def null_class_label(self) -> int | None:
        """Label of the unconditional class used by classifier-free guidance (None if the model has none)."""
        return self.num_classes if self.config.class_dropout_prob > 0 else None

    def _validate_config(self) -> None:
        """One validation of the whole config, at construction and therefore at every load."""
        config = self.config
        _check_config_types(config)  # every scalar key: its type and range (strings: the allowed values)
        hidden = config.num_attention_heads * config.attention_head_dim
        if hidden % 4:  # the 2-D sin-cos position table splits the width into four sinusoid bands
            raise DiTOptimumError(
                f"The hidden size `num_attention_heads` x `attention_head_dim` = {config.num_attention_heads} x "
                f"{config.attention_head_dim} = {hidden} must be a multiple of 4."
            )
        if config.sample_size % config.patch_size != 0:
            raise DiTOptimumError(
                f"`sample_size`={config.sample_size} must be a multiple of `patch_size`={config.patch_size}."
            )
        if int(config.num_attention_heads * config.attention_head_dim * config.mlp_ratio) < 1:
            raise DiTOptimumError(f"`mlp_ratio`={config.mlp_ratio!r} gives an MLP of width 0; use a larger ratio.")
        for name, values, upper in (
            ("layer_heads", config.layer_heads, config.num_attention_heads),
            ("layer_mlp_dims", config.layer_mlp_dims, None),
        ):
            if values is None:
                continue
            if (
                not isinstance(values, (list, tuple))
                or len(values) != config.num_layers
                or any(not _is_int(v) or not 1 <= v <= MAX_CONFIG_INTEGER for v in values)
            ):
                raise DiTOptimumError(
                    f"`{name}` must list one positive integer (at most {MAX_CONFIG_INTEGER}) per layer "
                    f"({config.num_layers}), got {_shown(values)}."
                )
            if upper is not None and max(values) > upper:
                raise DiTOptimumError(
                    f"`{name}` entries must be at most num_attention_heads={upper}, got {_shown(values)}."
                )
        self._validate_moe_config()
        # Before the attention checks (whose allowed values are listed up to the width): a config too large for the
        # memory is refused naming the key that sizes it, before anything is allocated.
        _check_fits_in_memory(config)
        self.attention_config = AttentionConfig.from_model_config(config)
        self.attention_config.validate(
            config.num_attention_heads, config.attention_head_dim, config.sample_size // config.patch_size
        )
        group = self.query_heads_per_kv_head
        grouped = config.layer_heads is not None and self.attention_config.spec.kv_layout == "grouped"
        if grouped and any(heads % group for heads in config.layer_heads):
            raise DiTOptimumError(
                f"`layer_heads` entries must be multiples of {group} (query heads per K/V head for "
                f"attention_type={config.attention_type!r}), got {_shown(config.layer_heads)}."
            )

    def _validate_moe_config(self) -> None:
        config = self.config
        experts = config.moe_num_experts
        if not _is_int(experts) or experts < 0:
            raise DiTOptimumError(f"`moe_num_experts`={_shown(experts)} must be 0 (dense) or a positive integer.")
        layers = config.moe_layers  # a list of block indices, checked for a dense model too (a typo is not ignored)
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not all(_is_int(i) and 0 <= i < config.num_layers for i in layers)
        ):
            raise DiTOptimumError(
                f"`moe_layers`={_shown(layers)} is invalid; allowed values: None or a list of block indices in "
                f"0..{config.num_layers - 1}."
            )
        if experts == 0:
            return
        checks = [
            ("moe_top_k", 1 <= config.moe_top_k <= experts, f"1..{experts}"),
            (
                "moe_every",
                1 <= config.moe_every <= config.num_layers,
                f"1..{config.num_layers}",
            ),
        ]
        for name, valid, allowed in checks:
            if not valid:
                value = _shown(getattr(config, name))
                raise DiTOptimumError(f"`{name}`={value} is invalid; allowed values: {allowed}.")
        if config.layer_mlp_dims is not None:
            raise DiTOptimumError("`layer_mlp_dims` (MLP pruning) cannot be combined with MoE (`moe_num_experts` > 0).")
        mlp = int(config.num_attention_heads * config.attention_head_dim * config.mlp_ratio)
        if config.moe_expert_dim is None and mlp // config.moe_top_k < 1:
            raise DiTOptimumError(
                f"The expert width (the MLP width {mlp} // `moe_top_k`={config.moe_top_k}) is 0: "
                "set `moe_expert_dim` (a positive integer), a smaller `moe_top_k` or a larger `mlp_ratio`."
            )

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` has the MoE feed-forward (listed in ``moe_layers``, else every ``moe_every``-th)."""
        config = self.config
        if config.moe_num_experts == 0:
            return False
        return index in config.moe_layers if config.moe_layers is not None else (index + 1) % config.moe_every == 0

    def moe_aux_loss(self) -> torch.Tensor:
        """Weighted balance + z losses of the last forward, summed over MoE blocks (0 for a dense model)."""
        losses = [block.ff.aux_loss for block in self.transformer_blocks if isinstance(block.ff, MoEFeedForward)]
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)

    def routing_statistics(self) -> dict[str, dict[str, float | list[float]]]:
        """Per MoE block: statistics of the last forward (if any) and the saved cumulative load (host values)."""
        statistics = {}
        for index, block in enumerate(self.transformer_blocks):
            if isinstance(block.ff, MoEFeedForward):
                stats = {name: value.tolist() for name, value in block.ff.last_stats.items()}
                counts = block.ff.routing_counts
                stats["cumulative_load"] = (counts / counts.sum().clamp_min(1)).tolist()
                statistics[f"block_{index}"] = stats
        return statistics

    @property
    def query_heads_per_kv_head(self) -> int:
        """Query heads sharing one K/V head in the unpruned layout (1 without grouping)."""
        config = self.config
        kv_heads = resolve_num_kv_heads(config.attention_type, config.num_attention_heads, config.num_kv_heads)
        return config.num_attention_heads // kv_heads if self.attention_config.spec.kv_layout == "grouped" else 1

    def kv_heads_of_layer(self, index: int) -> int | None:
        """K/V heads of block ``index``: head pruning removes whole groups, so the group size is kept."""
        layout = self.attention_config.spec.kv_layout
        if layout == "grouped":
            return self.heads_of_layer(index) // self.query_heads_per_kv_head
        return 1 if layout == "single" else None

    def heads_of_layer(self, index: int) -> int:
        """Attention heads of block ``index`` (fewer than ``num_attention_heads`` after head pruning)."""
        layer_heads = self.config.layer_heads
        return self.config.num_attention_heads if layer_heads is None else layer_heads[index]

    def mlp_dim_of_layer(self, index: int) -> int:
        """Hidden width of block ``index``'s feed-forward network (smaller after MLP pruning)."""
        layer_mlp_dims = self.config.layer_mlp_dims
        return int(self.inner_dim * self.config.mlp_ratio) if layer_mlp_dims is None else layer_mlp_dims[index]

    def _build_block(self, index: int) -> DiTBlock:
        config = self.config
        attention = DiTAttention(
            self.inner_dim,
            self.heads_of_layer(index),
            config.attention_head_dim,
            self.attention_config.with_kv_heads(self.kv_heads_of_layer(index)),
            bias=config.attention_bias,
            dropout=config.dropout,
        )
        feed_forward = None
        if self.is_moe_layer(index):
            feed_forward = MoEFeedForward(
                self.inner_dim,
                num_experts=config.moe_num_experts,
                expert_dim=config.moe_expert_dim or self.mlp_dim_of_layer(index) // config.moe_top_k,
                top_k=config.moe_top_k,
                num_shared_experts=config.moe_num_shared_experts,
                capacity_factor=config.moe_capacity_factor,
                balance_loss_weight=config.moe_balance_loss_weight,
                router_z_loss_weight=config.moe_router_z_loss_weight,
            )
        return DiTBlock(
            self.inner_dim,
            attention,
            feed_forward=feed_forward,
            ff_inner_dim=self.mlp_dim_of_layer(index),
            dropout=config.dropout,
            activation_fn=config.activation_fn,
            norm_elementwise_affine=config.norm_elementwise_affine,
            norm_eps=config.norm_eps,
        )

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_config``; a stock-format config written by this package (``stock.MARKER_KEY``) gives back
        the model's own class count and label dropout (``stock.restore_stock_config``)."""
        from .stock import restore_stock_config

        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (restore_stock_config(loaded[0]), *loaded[1:])
        return restore_stock_config(loaded)

    def _fix_state_dict_keys_on_load(self, state_dict: OrderedDict) -> None:
        """Map a stock diffusers checkpoint (an embedder copy in every block) onto the shared embedding; a stock-format
        folder saved by this package also gets its label table back to the model's classes and null row."""
        from .stock import trim_stock_class_table

        copies: dict[str, list[torch.Tensor]] = {}
        for key in [key for key in state_dict if _STOCK_BLOCK_EMBEDDING.match(key)]:
            block, name = _STOCK_BLOCK_EMBEDDING.match(key).groups()
            tensor = state_dict.pop(key)
            if block == "0":
                state_dict[f"conditioning_embedding.{name}"] = tensor
            copies.setdefault(name, []).append(tensor)
        # float copies only: an integer copy is refused by its dtype (`check_weight_dtypes`), naming the tensor
        differing = [
            name
            for name, tensors in copies.items()
            if all(t.is_floating_point() for t in tensors) and any(not torch.equal(t, tensors[0]) for t in tensors)
        ]
        if differing:  # a DiT trained with diffusers' own class: sharing block 0's would compute another function
            raise DiTOptimumError(
                f"The stock DiT checkpoint's per-block timestep/class embedders differ ({', '.join(sorted(differing))}"
                "): this model shares one embedding, so it cannot hold that checkpoint exactly. Load it with "
                "diffusers' `DiTTransformer2DModel` (`DiffusionPipeline.from_pretrained`); checkpoints converted "
                "from the original DiT have equal copies and load here."
            )
        trim_stock_class_table(self, state_dict)
        super()._fix_state_dict_keys_on_load(state_dict)

    def enable_cache(self, config: Any) -> None:
        """diffusers' ``enable_cache`` (FirstBlockCache, TaylorSeer, PAB, FasterCache, MagCache, ...), plus a
        ``BlockCacheSchedule``, which is also written into the config so that ``save_pretrained`` keeps it.

        A second cache while one is on raises diffusers' ``ValueError`` (its message, naming the first). diffusers'
        defaults that name other models' modules are fitted to the DiT's (``cache_hooks.fit_cache_config``:
        TaylorSeer hooks the blocks' ``attn1``, FasterCache splits ``class_labels`` with the guided batch), and a
        config that hooks no module at all is refused saying what to pass, instead of changing nothing."""
        from .cache_hooks import fit_cache_config, hooks_on_submodules, no_hook_error

        if self._runtime is not None:
            raise DiTOptimumError(
                f"A step cache cannot be enabled on a model that runs with {self._runtime.describe()} (its forward is "
                "one exported graph, inside which no block can be skipped): call `disable_runtime()` first."
            )
        if self.is_cache_enabled:
            current = type(self._cache_config)
            origin = " (the model config's `block_cache_schedule`)" if current is BlockCacheSchedule else ""
            raise DiTOptimumError(
                f"Caching has already been enabled with {current}. To apply a new caching technique, please disable "
                f"the existing one first: call `disable_cache()`; the cache on now is {current.__name__}{origin}."
            )
        if not isinstance(config, BlockCacheSchedule):
            fitted = fit_cache_config(config)
            before = hooks_on_submodules(self)
            super().enable_cache(fitted)
            if not hooks_on_submodules(self) - before:  # nothing hooked: the cache would change nothing
                self.disable_cache()
                raise no_hook_error(config)
            return
        schedule = BlockCacheSchedule.from_dict(config.to_dict(), len(self.transformer_blocks))  # checks the indices
        apply_block_schedule(self.transformer_blocks, schedule)
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self).invalidate_child_registries_cache()
        self._cache_config = schedule
        self.register_to_config(block_cache_schedule=schedule.to_dict())

    def _apply(self, fn: Any, recurse: bool = True) -> DiTOptimumTransformer2DModel:
        """``nn.Module._apply`` (``to``, ``half``, ``cuda``, ...), keeping the position table (a buffer computed at
        construction, never saved) float32 as diffusers' loader leaves it: a model cast with ``.to(torch.bfloat16)``
        then gives the images its saved folder gives when loaded with ``torch_dtype=torch.bfloat16``."""
        table = getattr(self.pos_embed, "pos_embed", None)
        super()._apply(fn, recurse)
        moved = getattr(self.pos_embed, "pos_embed", None)
        if table is not None and moved is not None and moved.dtype != table.dtype:
            self.pos_embed.pos_embed = table.to(moved.device)
        return self

    @property
    def runtime(self) -> ExportedRuntime | None:
        """The exported runtime that runs forwards without gradients (``enable_runtime``), or None (torch)."""
        return self._runtime

    def enable_runtime(self, backend: str, precision: str) -> None:
        """Run forwards without gradients through ``backend`` (``"openvino"``: ``"bf16"``, ``"f32"``, ``"int8"``;
        ``"onnxruntime"``: ``"fp32"``, ``"int8"``; ``runtimes.RUNTIMES``), exported now from the current weights and
        recorded in the config, so that ``save_pretrained`` writes the graph beside the weights and
        ``from_pretrained`` runs it again without exporting. Training (gradients on) still runs torch. Refused on a
        model with a step cache, LoRA layers, torch quantization, non-float32 weights, a compiled forward, or off the
        CPU."""
        runtime = make_runtime({"backend": backend, "precision": precision})
        if self._runtime is not None:
            raise DiTOptimumError(
                f"This model already runs with {self._runtime.describe()}: call `disable_runtime()` first."
            )
        check_exportable(self)
        runtime.export(self)
        self._runtime = runtime
        self.register_to_config(runtime=runtime.spec)

    def disable_runtime(self) -> None:
        """Run every forward in torch again (the config's ``runtime`` is cleared)."""
        self._runtime = None
        self.register_to_config(runtime=None)

    def _runs_graph(
        self, hidden_states: torch.Tensor, timestep: Any, class_labels: Any, cross_attention_kwargs: Any
    ) -> bool:
        """Whether this forward runs the exported graph: an inference forward of float32 inputs of the configured
        shape with one timestep (or one per sample) and valid integer class labels. Anything else runs torch, which
        raises its own errors for what it refuses (a wrong dtype or shape, an unknown class)."""
        if self._runtime is not None and self.dtype != torch.float32 and not torch.is_grad_enabled():
            check_exportable(self)  # cast after enable_runtime: refused, naming what to do
        if (
            self._runtime is None
            or torch.is_grad_enabled()
            or self.__dict__.get("_runtime_paused", False)
            or cross_attention_kwargs
            or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dtype != torch.float32
            or hidden_states.ndim != 4
            or hidden_states.shape[0] == 0
            or tuple(hidden_states.shape[1:])
            != (self.config.in_channels, self.config.sample_size, self.config.sample_size)
        ):
            return False
        batch = hidden_states.shape[0]
        try:
            timestep = torch.as_tensor(timestep)
            labels = torch.as_tensor(class_labels).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            return False
        if timestep.numel() not in (1, batch) or labels.numel() != batch or labels.is_floating_point():
            return False
        if labels.dtype == torch.bool or labels.is_complex() or timestep.is_complex():
            return False
        mapped = self._map_null_label(labels.long())
        rows = self.conditioning_embedding.class_embedder.embedding_table.num_embeddings
        return bool(mapped.min() >= 0 and mapped.max() < rows)

    def compile_repeated_blocks(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' regional compilation (each ``DiTBlock`` compiled with ``torch.compile(*args, **kwargs)``).
        The blocks then get contiguous inputs: the patch embedding's output is transposed, and a first block fed that
        layout would be compiled a second time for the others. Uncompiled, the layout stays stock DiT's, whose last
        bits it decides (plain diffusers loading gives the same images)."""
        super().compile_repeated_blocks(*args, **kwargs)
        self._contiguous_block_inputs = True

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' ``set_attention_backend`` for every attention module; an unknown name is refused listing the
        backends diffusers has (those needing another device or package fail there, with diffusers' message)."""
        from diffusers.models.attention_dispatch import AttentionBackendName

        allowed = sorted(name.value for name in AttentionBackendName)
        if not isinstance(backend, str) or backend.lower() not in allowed:
            raise DiTOptimumError(f"Unknown attention `backend`={backend!r}; allowed values: {', '.join(allowed)}.")
        super().set_attention_backend(backend)

    def disable_cache(self) -> None:
        """diffusers' ``disable_cache``; a block schedule is also removed from the config."""
        if not isinstance(self._cache_config, BlockCacheSchedule):
            super().disable_cache()
            return
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self)
        registry.remove_hook(BLOCK_SCHEDULE_HOOK, recurse=True)
        registry.invalidate_child_registries_cache()
        self._cache_config = None
        self.register_to_config(block_cache_schedule=None)

    def check_unfused(self, action: str) -> None:
        """Refuse ``action`` on a model with fused QKV projections: the fused copy would be saved beside the separate
        weights (and fail to load), or go stale when the separate weights change."""
        if any(getattr(module, "fused_projections", False) for module in self.modules()):
            raise DiTOptimumError(
                f"{action.capitalize()} a model with fused QKV projections is not supported: call "
                "`unfuse_qkv_projections()` first (fusing is a run-time speed-up, redone after loading)."
            )

    def set_attn_processor(self, processor: Any) -> None:
        """diffusers' ``set_attn_processor`` (one processor for all, or a dict with one per attention layer); a dict
        whose keys are not the layers' names is refused naming them, instead of a KeyError half-way through, and the
        caller's dict is not emptied."""
        if isinstance(processor, dict):
            expected = set(self.attn_processors)
            if len(processor) == len(expected) and set(processor) != expected:
                unknown = sorted(set(processor) - expected)
                raise DiTOptimumError(
                    f"Unknown attention processor keys {unknown[:4]}; keys are the names in `attn_processors`, "
                    f"e.g. {sorted(expected)[0]!r}."
                )
            processor = dict(processor)  # diffusers pops the entries: leave the caller's dict as it was
        super().set_attn_processor(processor)

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """diffusers' ``add_adapter``, with the LoRA rank bounded by the layer width (``check_resources``: the
        training scripts' ``--lora-rank`` goes through here too) and a finite ``lora_alpha``."""
        ranks = getattr(adapter_config, "rank_pattern", None) or {}
        for rank in [getattr(adapter_config, "r", None), *ranks.values()]:
            if rank is not None:
                check_resources(self.config, lora_rank=rank, parameter="r")
        alphas = getattr(adapter_config, "alpha_pattern", None) or {}
        check_adapter_scales("lora_alpha", [getattr(adapter_config, "lora_alpha", None), *alphas.values()], self.dtype)
        super().add_adapter(adapter_config, adapter_name=adapter_name)

    def set_adapters(self, adapter_names: str | list[str], weights: Any = None) -> None:
        """diffusers' ``set_adapters``; ``weights`` must be finite numbers (a NaN weight makes every output NaN),
        one per adapter, and ``adapter_names`` loaded adapters; a per-layer dict key that matches no adapted layer
        is refused (diffusers would leave those layers at weight 1.0)."""
        from .lora import check_adapter_names, check_adapter_weights

        check_adapter_scales("weights", weights, self.dtype)
        names = check_adapter_names(self, adapter_names)
        check_adapter_weights(self, names, weights)
        super().set_adapters(adapter_names, weights)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Any = None) -> None:
        """diffusers' ``fuse_lora``; ``lora_scale`` must be a finite number and ``adapter_names`` (default: the
        active adapters) loaded adapters (an unknown name would fuse nothing)."""
        from .lora import check_adapter_names

        check_adapter_scales("lora_scale", lora_scale, self.dtype)
        if adapter_names is not None:
            check_adapter_names(self, adapter_names)
        super().fuse_lora(lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """diffusers' ``delete_adapters``; an ``adapter_names`` entry that names no loaded adapter is refused
        (diffusers would delete nothing without a word)."""
        from .lora import check_adapter_names

        check_adapter_names(self, adapter_names)
        super().delete_adapters(adapter_names)

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        prefix: str | None = "transformer",
        hotswap: bool = False,
        **kwargs: Any,
    ):
        """diffusers' ``load_lora_adapter`` (same signature and defaults), through the package's one LoRA reader
        (``lora.load_checked_lora``): safetensors only (a ``.bin`` ``weight_name`` is refused unread), a regular and
        readable file of finite tensors whose keys under ``prefix`` name this model's layers with their shapes;
        anything else is refused naming the file before the model changes (diffusers would load a foreign LoRA as a
        silent no-op).

        As in diffusers, the default ``prefix="transformer"`` reads the keys and metadata under ``transformer.`` (a
        pipeline-level file, ``pipe.save_lora_weights``), and ``prefix=None`` reads them as they are (a model-level
        file, ``save_lora_adapter``); a file whose keys are all of the other kind is refused naming the ``prefix`` to
        pass. The adapter metadata is checked against peft's ``LoraConfig`` (``lora.check_lora_state_dict``; a key
        that is no option of it is a ``TypeError`` too, as in diffusers). A load that fails anyway leaves no adapter
        behind, with diffusers' exception type; the new layers (their dropout included) follow the model's train /
        eval mode, so an adapter loaded into a model in eval mode samples deterministically."""
        from diffusers.utils.peft_utils import get_adapter_name

        from .lora import LORA_FILE_OPTIONS, adapters_text, check_adapter_name, load_checked_lora

        options = {name: kwargs.pop(name) for name in LORA_FILE_OPTIONS if name in kwargs}
        name = kwargs.get("adapter_name")
        check_adapter_name(name)
        hotswap = bool(hotswap)
        if name is not None and name in getattr(self, "peft_config", {}) and not hotswap:
            raise DiTOptimumError(
                f"`adapter_name`={name!r} is already in use; adapters: {', '.join(self.peft_config)}. Choose another "
                "name, or remove it first (`delete_adapters`)."
            )
        if hotswap and name not in (getattr(self, "peft_config", None) or {}):
            raise DiTOptimumError(
                f"`hotswap`=True replaces a loaded adapter: `adapter_name`={name!r} names none; adapters: "
                f"{adapters_text(self)}."
            )
        state_dict, metadata, source = load_checked_lora(
            self, pretrained_model_name_or_path_or_dict, prefix, kwargs.pop("metadata", None), **options
        )
        kwargs["adapter_name"] = name if name is not None else get_adapter_name(self)  # diffusers' default name
        modules = set(self.modules())
        try:
            result = super().load_lora_adapter(state_dict, prefix=prefix, hotswap=hotswap, metadata=metadata, **kwargs)
        except Exception as error:
            if not hotswap:
                self._remove_failed_adapter(kwargs["adapter_name"], modules)
            if isinstance(error, DiTOptimumError) or not isinstance(
                error, (ValueError, TypeError, RuntimeError, KeyError, OverflowError, AttributeError)
            ):
                raise
            message = f"{source} could not be loaded as a LoRA adapter: {first_line(error)}"
            raise keeping_type(error, message) from error  # the type diffusers raises
        for module in self.modules():  # new peft layers follow the model's mode (a training-mode dropout is random)
            if module not in modules:
                module.training = self.training
        return result

    def _remove_failed_adapter(self, adapter_name: str, modules: set[nn.Module]) -> None:
        # What a failed load left: the adapter's layers and config; peft's wrappers too if there were none before.
        from diffusers.utils import recurse_remove_peft_layers
        from diffusers.utils.peft_utils import delete_adapter_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not any(isinstance(module, BaseTunerLayer) for module in modules):
            recurse_remove_peft_layers(self)
            if hasattr(self, "peft_config"):
                del self.peft_config
            self._hf_peft_config_loaded = None
            return
        delete_adapter_layers(self, adapter_name)
        (getattr(self, "peft_config", None) or {}).pop(adapter_name, None)

    def save_lora_adapter(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str = "default",
        upcast_before_saving: bool = False,
        safe_serialization: bool = True,
        weight_name: str | None = None,
    ) -> None:
        """diffusers' ``save_lora_adapter``: the file diffusers writes (``pytorch_lora_weights.safetensors``, the
        adapter's keys and its ``LoraConfig`` as metadata, both without a prefix), safetensors only and written
        atomically. It loads as diffusers loads it, with ``load_lora_adapter(folder, prefix=None)`` (on this model or
        a pipeline's ``pipe.transformer``); a pipeline-level file, keys under ``transformer.`` for
        ``pipe.load_lora_weights``, is written by ``pipe.save_lora_weights`` (or
        ``pipelines.lora.save_lora_weights_of``). It also works on a quantized base, which diffusers' version
        refuses because it casts the whole model first."""
        import json

        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        from ..files import staged_file
        from .lora import LORA_SAVE_ADVICE, check_finite_lora_tensors, check_lora_file_name

        if not safe_serialization:
            raise DiTOptimumError("`safe_serialization`=False is not supported: LoRA weights are saved as safetensors.")
        check_lora_file_name(weight_name, saving=True)  # a file its own loader reads: refused before writing
        if adapter_name not in getattr(self, "peft_config", {}):
            adapters = ", ".join(getattr(self, "peft_config", {})) or "none"
            raise DiTOptimumError(f"Adapter name {adapter_name} not found in the model. Its adapters: {adapters}.")
        config = self.peft_config[adapter_name].to_dict()
        # a model-level file, as diffusers writes it: keys and metadata without a prefix (sets as sorted lists)
        config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
        state = dict(get_peft_model_state_dict(self, adapter_name=adapter_name))
        if upcast_before_saving:
            state = {key: value.float() for key, value in state.items()}
        check_finite_lora_tensors(state, f"Adapter {adapter_name!r}")  # a NaN adapter is not saved
        from ..files import check_writable

        folder = Path(save_directory)
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise DiTOptimumError(f"`save_directory`={str(folder)!r} is a file; give a folder.")
        check_writable(folder, "save_directory")  # read-only, full, a name too long: one line naming it
        metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
        # the file the caller asked for (replaced like diffusers does), never through a link
        name = weight_name or LORA_WEIGHT_NAME_SAFE  # an earlier save of the package's is replaced; a user's file not
        with staged_file(folder, name, "save_directory", advice=LORA_SAVE_ADVICE) as temporary:
            save_file({key: value.contiguous() for key, value in state.items()}, str(temporary), metadata=metadata)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        overwrite: bool = False,
        stock_format: bool = False,
        variant: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Save as safetensors, each file written whole, other files in the folder left alone (as diffusers does);
        ``variant`` (e.g. ``"fp16"``) names the weights file ``diffusion_pytorch_model.<variant>.safetensors``.

        By default in this package's format (one shared conditioning embedding: the size the benchmark measures, and
        ``DiTOptimumTransformer2DModel.from_pretrained`` loads it). ``stock_format=True`` saves diffusers' own
        ``DiTTransformer2DModel`` instead (``stock.to_stock_transformer``: an embedding copy per block, the label
        table padded to 1000 classes), which plain diffusers loads; a model diffusers cannot represent is refused
        with the reason (``stock.stock_format_problem``). Pipelines pick the stock format by themselves.

        Refuses models whose quantized form cannot be reloaded, and a folder holding other files but no
        ``config.json`` (or a file at that path) unless ``overwrite=True``.
        """
        reason = getattr(self, UNSERIALIZABLE_ATTRIBUTE, None)
        if reason:
            raise DiTOptimumError(reason)
        self.check_unfused("saving")
        from .lora import check_no_lora_layers
        from .stock import to_stock_transformer

        check_no_lora_layers(self)  # peft's `base_layer` keys would not load back
        pop_unsupported_save_options(kwargs)
        check_variant(variant)
        if not isinstance(stock_format, bool):
            raise DiTOptimumError(
                f"`stock_format`={stock_format!r} is not allowed; allowed values: False (this package's format), "
                "True (diffusers' DiTTransformer2DModel, or an error saying why not)."
            )
        model = to_stock_transformer(self) if stock_format else None
        sources = [getattr(self.config, "_name_or_path", None)]
        with save_directory_into(save_directory, "config.json", overwrite, sources=sources) as staging:
            if model is None:
                super().save_pretrained(staging, safe_serialization=True, variant=variant, **kwargs)
                if self._runtime is not None:  # its graph beside the weights, so a reload does not export again
                    self._runtime.save(self, Path(staging))
            else:
                model.save_pretrained(staging, safe_serialization=True, variant=variant, **kwargs)

    def _map_null_label(self, class_labels: torch.LongTensor) -> torch.LongTensor:
        # diffusers' DiTPipeline asks for class 1000 as "unconditional"; route it to this model's null class.
        null = self.null_class_label
        if null is None or null == DIFFUSERS_NULL_CLASS or self.num_classes > DIFFUSERS_NULL_CLASS:
            return class_labels
        return torch.where(class_labels == DIFFUSERS_NULL_CLASS, torch.full_like(class_labels, null), class_labels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and variance when learned) for ``hidden_states`` (B, C, H, W) at ``timestep``.

        ``timestep`` and ``class_labels`` are (B,) tensors (a scalar timestep is broadcast). The conditioning
        embedding is computed once and shared by every block.
        """
        if self._runs_graph(hidden_states, timestep, class_labels, cross_attention_kwargs):
            output = self._runtime.run(self, hidden_states, timestep, class_labels)
            return Transformer2DModelOutput(sample=output) if return_dict else (output,)
        batch = hidden_states.shape[0]
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        class_labels = self._map_null_label(torch.as_tensor(class_labels, device=hidden_states.device).reshape(-1))

        # (B, N, dim), contiguous: every block then sees the same strides (a compiled block is not recompiled)
        hidden_states = self.pos_embed(hidden_states)  # (B, N, dim), laid out as in stock DiT: the same bits
        if self._contiguous_block_inputs:  # regionally compiled: one layout for every block, or block 1 recompiles
            hidden_states = hidden_states.contiguous()
        conditioning = self.conditioning_embedding(timestep, class_labels, hidden_dtype=hidden_states.dtype)  # (B, dim)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, conditioning, (height, width))
            else:
                hidden_states = block(hidden_states, conditioning, (height, width))

        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)  # (B, N, p * p * C_out)

        patch, channels = self.patch_size, self.out_channels
        hidden_states = hidden_states.reshape(-1, height, width, patch, patch, channels)
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(-1, channels, height * patch, width * patch)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
