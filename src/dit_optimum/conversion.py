"""Conversion of original DiT / fast-DiT checkpoints and stock diffusers DiT folders to dit-optimum.

Key mapping from the original ``models.py`` layout (``D`` = hidden size):

==========================================  =====================================================
original                                    dit-optimum (diffusers names)
==========================================  =====================================================
``x_embedder.proj.{weight,bias}``           ``pos_embed.proj.{weight,bias}``
``pos_embed`` (fixed sin-cos)               dropped: recomputed by ``PatchEmbed`` (same values)
``t_embedder.mlp.0`` / ``.mlp.2``           ``conditioning_embedding.timestep_embedder.linear_1`` / ``linear_2``
``y_embedder.embedding_table.weight``       ``conditioning_embedding.class_embedder.embedding_table.weight``
``blocks.i.attn.qkv`` (3D x D, q|k|v)       ``transformer_blocks.i.attn1.to_q`` / ``to_k`` / ``to_v`` (rows split in 3)
``blocks.i.attn.proj``                      ``transformer_blocks.i.attn1.to_out.0``
``blocks.i.mlp.fc1`` / ``mlp.fc2``          ``transformer_blocks.i.ff.net.0.proj`` / ``ff.net.2``
``blocks.i.adaLN_modulation.1``             ``transformer_blocks.i.norm1.linear`` (same chunk order)
``final_layer.adaLN_modulation.1``          ``proj_out_1`` (shift, scale order kept)
``final_layer.linear``                      ``proj_out_2``
==========================================  =====================================================

The converted config sets ``original_timestep_embedding=True`` (sinusoid frequencies divided by ``half``, not
``half - 1`` as in diffusers) and ``norm_eps=1e-6`` (the original's second LayerNorm), so outputs match the
original model to float precision. A stock diffusers DiT folder loads directly (per-block embedder copies
collapse into the shared one); its timestep embedding is kept unless asked otherwise.
"""

from __future__ import annotations

import argparse
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .configs import DIT_SIZES, parse_preset_name
from .errors import DiTOptimumError, MissingPathError
from .models.transformer import DiTOptimumTransformer2DModel
from .schemas import ID2LABEL_FILE, SchemaError, read_json_file
from .utils import check_save_target, first_line, load_from_source

_ORIGINAL_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "conditioning_embedding.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "conditioning_embedding.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "conditioning_embedding.class_embedder.embedding_table",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_ORIGINAL_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}


def load_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of an original DiT / fast-DiT checkpoint (``.pt``, preferring ``ema`` over ``model``; or safetensors).

    ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"`checkpoint` {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise DiTOptimumError(f"`checkpoint` {path} is not a readable safetensors file: {error}") from None
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run whatever code the file carries.
        raise DiTOptimumError(
            f"`checkpoint` {path} holds more than tensors and plain containers (pickled objects or code): it is "
            "refused because loading it could run code. Convert it where it was made to a state dict of tensors "
            "(or safetensors) and try again."
        ) from None
    except Exception as error:
        raise DiTOptimumError(
            f"`checkpoint` {path} is not a readable PyTorch checkpoint (truncated, empty or another format): "
            f"{type(error).__name__}: {first_line(error)}"
        ) from None
    for key in ("ema", "model", "state_dict"):
        if isinstance(checkpoint, Mapping) and key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    if not isinstance(checkpoint, Mapping):
        raise DiTOptimumError(f"`checkpoint` {path} does not hold a state dict (got {type(checkpoint).__name__}).")
    return dict(checkpoint)


def original_config(
    state_dict: Mapping[str, torch.Tensor],
    model_name: str | None = None,
    sample_size: int | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """Infer the dit-optimum config of an original DiT state dict (size, patch, channels, classes, learned sigma).

    The class table of a model trained with label dropout (the DiT recipe) has one extra row, the null class;
    ``num_classes`` defaults to rows - 1 and may be given to read a table without that row. The head count
    cannot be read from weights: it comes from ``num_heads``, else ``model_name``, else the preset of the same
    depth and width, else head dim 64.
    """
    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise DiTOptimumError(f"Not an original DiT state dict: missing {missing}.")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    if model_name is not None:
        size, name_patch = parse_preset_name(model_name)
        expected = (DIT_SIZES[size][0], DIT_SIZES[size][1], name_patch)
        if expected != (depth, hidden, patch):
            raise DiTOptimumError(
                f"`model_name`={model_name!r} expects depth/hidden/patch {expected}, "
                f"the checkpoint has {(depth, hidden, patch)}."
            )
        heads = DIT_SIZES[size][2]
    else:
        heads = next((h for d, w, h in DIT_SIZES.values() if (d, w) == (depth, hidden)), max(1, hidden // 64))
    if num_heads is not None:
        if num_heads < 1 or hidden % num_heads:
            raise DiTOptimumError(f"`num_heads`={num_heads} must divide the hidden size {hidden}.")
        heads = num_heads
    if sample_size is None:
        if "pos_embed" not in state_dict:
            raise DiTOptimumError("The checkpoint has no `pos_embed`: pass `sample_size` (the latent/pixel side).")
        sample_size = math.isqrt(state_dict["pos_embed"].shape[1]) * patch
    if num_classes is None:
        num_classes = table_rows - 1
    elif table_rows not in (num_classes, num_classes + 1):
        raise DiTOptimumError(
            f"`num_classes`={num_classes} does not fit the checkpoint's class table of {table_rows} rows."
        )
    return {
        "num_layers": depth,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "patch_size": patch,
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_embeds_ada_norm": num_classes,
        "class_dropout_prob": 0.1 if table_rows == num_classes + 1 else 0.0,
        "norm_eps": 1e-6,
        "original_timestep_embedding": True,
    }


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split qkv of) an original DiT state dict into dit-optimum keys; see the module docstring."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "pos_embed":
            continue
        prefix, _, suffix = key.rpartition(".")
        if prefix in _ORIGINAL_RENAMES:
            converted[f"{_ORIGINAL_RENAMES[prefix]}.{suffix}"] = tensor
            continue
        if not key.startswith("blocks."):
            raise DiTOptimumError(f"Unexpected key {key!r} in the original DiT state dict.")
        _, index, rest = key.split(".", 2)
        module, _, suffix = rest.rpartition(".")
        target = f"transformer_blocks.{index}"
        if module == "attn.qkv":
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                converted[f"{target}.attn1.{name}.{suffix}"] = part.clone()
        elif module in _ORIGINAL_BLOCK_RENAMES:
            converted[f"{target}.{_ORIGINAL_BLOCK_RENAMES[module]}.{suffix}"] = tensor
        else:
            raise DiTOptimumError(f"Unexpected key {key!r} in the original DiT state dict.")
    return converted


def model_from_original(
    state_dict: Mapping[str, torch.Tensor],
    model_name: str | None = None,
    sample_size: int | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
) -> DiTOptimumTransformer2DModel:
    """Build a ``DiTOptimumTransformer2DModel`` holding the weights of an original DiT state dict (strict load)."""
    try:
        config = original_config(state_dict, model_name, sample_size, num_classes, num_heads)
        model = DiTOptimumTransformer2DModel(**config)
        model.load_state_dict(convert_original_state_dict(state_dict), strict=True)
    except DiTOptimumError:
        raise
    except (RuntimeError, ValueError, IndexError, AttributeError, TypeError) as error:
        # Shapes or key names that no DiT has: a checkpoint of another model, or a damaged one.
        raise DiTOptimumError(f"Not an original DiT state dict: {first_line(error)}") from None
    return model.eval()


def _load_id2label(path: str | None) -> dict[str, str] | None:
    """Class names from a JSON object file mapping class index to name."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"`id2label` file {str(path)!r} does not exist.")
    where = f"`id2label` file {str(path)!r}"
    try:
        content = read_json_file(path, ID2LABEL_FILE, where)
    except SchemaError as error:
        raise DiTOptimumError(
            f'{where} must hold a JSON object mapping class index to name, e.g. {{"0": "tench", "1": '
            f'"goldfish"}}: {error.problem}.'
        ) from None
    return {str(key): str(value) for key, value in content.items()}


def convert_original_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    model_name: str | None = None,
    sample_size: int | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
    vae: str | None = None,
    id2label: str | None = None,
    transformer_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert an original checkpoint to a pipeline folder (or a transformer folder with ``transformer_only``).

    ``vae`` is an ``AutoencoderKL`` folder or Hub id for latent models; without it, a model whose input has 1 or 3
    channels becomes a pixel-space pipeline and a 4-channel one is refused (it needs its VAE). ``output_dir`` must be
    new, empty or an earlier save unless ``overwrite`` (its other files are never deleted).
    """
    from diffusers import AutoencoderKL

    from .pipelines.dit import DiTOptimumPipeline

    marker = "config.json" if transformer_only else "model_index.json"
    output_dir = check_save_target(output_dir, marker, overwrite, "output_dir")
    labels = _load_id2label(id2label)
    model = model_from_original(load_original_checkpoint(checkpoint), model_name, sample_size, num_classes, num_heads)
    if transformer_only:
        model.save_pretrained(output_dir, overwrite=overwrite)
        return output_dir
    if vae is None and model.config.in_channels not in (1, 3):
        raise DiTOptimumError(
            f"The model takes {model.config.in_channels}-channel latents: "
            "pass `vae` (an AutoencoderKL folder or Hub id), "
            "or `transformer_only=True`."
        )
    autoencoder = load_from_source(AutoencoderKL.from_pretrained, vae, "vae") if vae is not None else None
    pipeline = DiTOptimumPipeline(transformer=model, vae=autoencoder, id2label=labels)
    pipeline.save_pretrained(output_dir, overwrite=overwrite)
    return output_dir


def convert_diffusers_pipeline(
    source: str | Path, output_dir: str | Path, original_timestep_embedding: bool = False, overwrite: bool = False
) -> Path:
    """Convert a stock diffusers DiT pipeline folder (or Hub id) to dit-optimum, keeping its VAE and scheduler.

    ``original_timestep_embedding=True`` fixes diffusers' conversion of the released DiT weights, which were
    trained with the original sinusoid.
    """
    import diffusers
    from diffusers import AutoencoderKL, DiffusionPipeline

    from .pipelines.dit import DiTOptimumPipeline

    output_dir = check_save_target(output_dir, "model_index.json", overwrite, "output_dir")
    index = load_from_source(DiffusionPipeline.load_config, source, "source")
    components = {name: value for name, value in index.items() if isinstance(value, list) and len(value) == 2}
    if "transformer" not in components or "scheduler" not in components:
        raise DiTOptimumError(f"`source`={str(source)!r} is not a DiT pipeline (no transformer/scheduler component).")
    model = load_from_source(
        DiTOptimumTransformer2DModel.from_pretrained,
        source,
        "source",
        subfolder="transformer",
        original_timestep_embedding=original_timestep_embedding,
    )
    vae = None
    if components.get("vae", [None])[0] == "diffusers":
        vae = load_from_source(AutoencoderKL.from_pretrained, source, "source", subfolder="vae")
    scheduler_library, scheduler_class = components["scheduler"]
    if scheduler_library != "diffusers" or not hasattr(diffusers, str(scheduler_class)):
        raise DiTOptimumError(
            f"Expected a diffusers scheduler in {source}, found {scheduler_library}.{scheduler_class}."
        )
    scheduler = load_from_source(
        getattr(diffusers, scheduler_class).from_pretrained, source, "source", subfolder="scheduler"
    )
    id2label = dict(index.get("id2label") or {}) or None
    pipeline = DiTOptimumPipeline(transformer=model.eval(), vae=vae, scheduler=scheduler, id2label=id2label)
    pipeline.save_pretrained(output_dir, overwrite=overwrite)
    return Path(output_dir)
