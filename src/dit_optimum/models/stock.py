"""Stock diffusers format: pipelines and transformers saved with diffusers' own classes where diffusers can run them.

A ``DiTOptimumTransformer2DModel`` with standard (SDPA) attention, uniform blocks, a 4x MLP, no MoE, no saved block
cache schedule, diffusers' timestep embedding, a null class and at most 1000 classes computes exactly what a stock
``DiTTransformer2DModel`` computes: the only difference is that ours holds ONE conditioning embedding
(``conditioning_embedding.*``) where the stock model holds a copy in every block (``transformer_blocks.N.norm1.emb.*``).
``to_stock_transformer`` builds that stock model around the same (possibly quantized) leaf modules, so that
``save_pretrained`` of a pipeline whose parts are all representable writes a folder that plain diffusers loads
(``DiffusionPipeline.from_pretrained(path)``) without this package; ``stock_format_problem`` says why a pipeline or
model is not representable (the folder then keeps the package format and needs ``import dit_optimum``).

Fewer than 1000 classes: stock ``DiTPipeline`` always guides with class 1000 as the null (unconditional) class, and its
label table has ``num_embeds_ada_norm + 1`` rows. A k-class model (k < 1000) is written with
``num_embeds_ada_norm=1000``: rows 0..k-1 are its classes, row 1000 its null row, and rows k..999 copies of the null
row, so that an unknown class id in k..999 samples unconditionally. What this package needs to give back the k-class
model is recorded under ``MARKER_KEY`` in the transformer's config (a key with a leading underscore: diffusers drops
it silently); ``restore_stock_config`` and ``trim_stock_class_table`` undo the padding when
``DiTOptimumTransformer2DModel`` loads such a folder.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from ..errors import DiTOptimumError

# The config key that records what this package needs to undo the stock layout (diffusers ignores `_` keys).
MARKER_KEY = "_dit_optimum"
STOCK_TRANSFORMER = ("diffusers", "DiTTransformer2DModel")
# Stock DiTPipeline's null class, and so the most classes a stock-format model can have.
STOCK_NULL_CLASS = 1000
# Stock DiT blocks: an MLP 4x the width.
STOCK_MLP_RATIO = 4
_TABLE_KEY = "conditioning_embedding.class_embedder.embedding_table.weight"
_STOCK_INIT_KEYS = tuple(
    name for name in inspect.signature(DiTTransformer2DModel.__init__).parameters if name != "self"
)
# Quantization backends whose diffusers config reloads the same model under stock module names.
_STOCK_QUANTIZATION = ("torchao", "quanto")


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def transformer_config_problem(config: Any) -> str | None:
    """Why a transformer with this config (a model's config or a saved ``config.json``) cannot be saved as diffusers'
    ``DiTTransformer2DModel``, or None. Several reasons are joined with "; "."""
    reasons = []
    attention = _get(config, "attention_type", "sdpa")
    if attention != "sdpa":
        reasons.append(f"attention_type={attention!r} (diffusers' DiT has standard softmax attention only)")
    kv_heads = _get(config, "num_kv_heads")
    if kv_heads not in (None, _get(config, "num_attention_heads")):
        reasons.append(f"num_kv_heads={kv_heads!r} (diffusers' DiT has one K/V head per query head)")
    heads, head_dim = _get(config, "num_attention_heads"), _get(config, "attention_head_dim")
    layer_heads, layer_mlp_dims = _get(config, "layer_heads"), _get(config, "layer_mlp_dims")
    ratio = _get(config, "mlp_ratio", 4.0)
    # per-layer lists that repeat the uniform width (depth pruning writes them) are uniform blocks
    width = STOCK_MLP_RATIO * heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
    pruned_heads = layer_heads is not None and (
        not isinstance(layer_heads, (list, tuple)) or any(value != heads for value in layer_heads)
    )
    pruned_mlp = layer_mlp_dims is not None and (
        not isinstance(layer_mlp_dims, (list, tuple)) or any(value != width for value in layer_mlp_dims)
    )
    if pruned_heads or pruned_mlp:
        reasons.append(
            f"per-layer widths `{'layer_heads' if pruned_heads else 'layer_mlp_dims'}` (head or MLP pruning; "
            "diffusers' DiT blocks are uniform)"
        )
    elif layer_mlp_dims is None and ratio != STOCK_MLP_RATIO:
        reasons.append(f"mlp_ratio={ratio!r} (diffusers' DiT blocks have an MLP 4x the width)")
    runtime = _get(config, "runtime")
    if runtime is not None:
        reasons.append(f"runtime={runtime!r} (an exported graph saved beside the weights; diffusers' DiT runs torch)")
    experts = _get(config, "moe_num_experts", 0)
    if experts:
        reasons.append(f"a mixture-of-experts feed-forward (moe_num_experts={experts!r})")
    if _get(config, "block_cache_schedule") is not None:
        reasons.append(
            "a saved block cache schedule (`block_cache_schedule`; diffusers' DiTPipeline does not apply it)"
        )
    if _get(config, "original_timestep_embedding", False):
        reasons.append("the original DiT timestep embedding (`original_timestep_embedding`=true)")
    if not _get(config, "class_dropout_prob", 0.1):
        reasons.append("no null class (`class_dropout_prob`=0; diffusers' DiTPipeline guides with null class 1000)")
    classes = _get(config, "num_embeds_ada_norm")
    if not isinstance(classes, int) or classes > STOCK_NULL_CLASS:
        reasons.append(
            f"num_embeds_ada_norm={classes!r} classes (diffusers' DiTPipeline takes class 1000 as the null class: at "
            "most 1000 classes)"
        )
    quantization = _get(config, "quantization_config")
    method = _quant_method(quantization)
    if quantization is not None and method not in _STOCK_QUANTIZATION:
        reasons.append(f"quantization with {method!r} (torchao and quanto weight-only save in diffusers' format)")
    return "; ".join(reasons) or None


def _quant_method(quantization: Any) -> str | None:
    if quantization is None:
        return None
    method = _get(quantization, "quant_method")
    return str(getattr(method, "value", method))


def transformer_stock_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be saved as diffusers' ``DiTTransformer2DModel`` (its config, its attention processors,
    its quantization), or None. A stock ``DiTTransformer2DModel`` is one already."""
    from .attention import SDPAAttnProcessor
    from .transformer import UNSERIALIZABLE_ATTRIBUTE, DiTOptimumTransformer2DModel

    if type(model) is DiTTransformer2DModel:
        return None
    if not isinstance(model, DiTOptimumTransformer2DModel):
        return f"the transformer is a {type(model).__name__}"
    unserializable = getattr(model, UNSERIALIZABLE_ATTRIBUTE, None)
    if unserializable:
        return "quantized in a form diffusers cannot save (quanto with activations)"
    problem = transformer_config_problem(model.config)
    if problem:
        return problem
    for index, block in enumerate(model.transformer_blocks):  # set_attn_processor may have swapped one
        processor = block.attn1.processor
        if type(processor) is not SDPAAttnProcessor:
            return f"attention processor {type(processor).__name__} on block {index} (diffusers' DiT runs SDPA)"
    if model.config.get("quantization_config") is not None:
        return _quantization_problem(model)
    return None


def stock_format_problem(pipeline_or_model: Any) -> str | None:
    """Why a pipeline (its transformer and VAE) or a transformer needs this package to load, or None when it saves
    as a folder of diffusers' own classes (``DiTPipeline``, ``DiTTransformer2DModel``, a diffusers VAE)."""
    if isinstance(pipeline_or_model, nn.Module):
        return transformer_stock_problem(pipeline_or_model)
    from .autoencoder import IdentityAutoencoder

    reasons = [transformer_stock_problem(pipeline_or_model.transformer)]
    vae = getattr(pipeline_or_model, "vae", None)
    if vae is None or isinstance(vae, IdentityAutoencoder):
        reasons.append("pixel space (an identity autoencoder; diffusers' DiTPipeline decodes through a VAE)")
    elif not type(vae).__module__.startswith("diffusers."):
        reasons.append(f"the VAE is a {type(vae).__name__} (not a diffusers class)")
    scheduler = getattr(pipeline_or_model, "scheduler", None)
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1:
        reasons.append(
            f"the {type(scheduler).__name__} starts from noise scaled by its init_noise_sigma, which diffusers' "
            "DiTPipeline does not apply (it would sample from the wrong noise)"
        )
    return "; ".join(reason for reason in reasons if reason) or None


def folder_stock_problem(folder: str | Path) -> str | None:
    """``stock_format_problem`` of a saved pipeline folder, read from its files (for cards written beside a saved
    pipeline): None for a stock-format folder (``model_index.json`` names diffusers' ``DiTTransformer2DModel``)."""
    folder, unknown = Path(folder), "the pipeline's components are dit-optimum classes"
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return unknown
    if not isinstance(index, dict):
        return unknown
    transformer = index.get("transformer")
    if isinstance(transformer, list) and tuple(transformer) == STOCK_TRANSFORMER:
        return None
    reasons = []
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict):
        reasons.append(transformer_config_problem(config))
    vae = index.get("vae")
    if isinstance(vae, list) and len(vae) == 2 and vae[1] == "IdentityAutoencoder":
        reasons.append("pixel space (an identity autoencoder; diffusers' DiTPipeline decodes through a VAE)")
    return "; ".join(reason for reason in reasons if reason) or unknown


# --- quantization ------------------------------------------------------------------------------------------------


def _stock_names(name: str, num_layers: int) -> list[str]:
    """The stock module names of one of our module names (the shared embedding is in every block)."""
    if name == "conditioning_embedding" or name.startswith("conditioning_embedding."):
        rest = name.removeprefix("conditioning_embedding")
        return [f"transformer_blocks.{index}.norm1.emb{rest}" for index in range(num_layers)]
    return [name]


def _stock_modules_to_not_convert(method: str | None, names: list[str] | None) -> list[str] | None:
    """``modules_to_not_convert`` under stock module names: torchao matches name fragments (``conditioning_embedding``
    is ``norm1.emb`` in every block), quanto local child names (the same in both models)."""
    if names is None or method != "torchao":
        return None if names is None else list(names)
    mapped = []
    for name in names:
        if name == "conditioning_embedding" or name.startswith("conditioning_embedding."):
            name = "norm1.emb" + name.removeprefix("conditioning_embedding")
        if name not in mapped:
            mapped.append(name)
    return mapped


def _is_quantized_linear(module: nn.Module) -> bool:
    if type(module).__name__ == "QLinear" or hasattr(module, "weight_qtype"):  # optimum-quanto
        return True
    weight = getattr(module, "weight", None)
    data = getattr(weight, "data", weight)
    return data is not None and type(data) not in (torch.Tensor, nn.Parameter)  # a torchao tensor subclass


def _stock_would_quantize(method: str, name: str, keep: list[str]) -> bool:
    # diffusers' rule at load time, for a Linear module `name` of the stock model
    if method == "torchao":
        parameter = f"{name}.weight"
        return not any(f"{key}." in parameter or key == parameter for key in keep)
    return name.rsplit(".", 1)[-1] not in keep  # quanto: local child names


def _quantization_problem(model: nn.Module) -> str | None:
    """Whether diffusers, loading the stock folder, would quantize exactly the Linear layers that are quantized now."""
    quantization = model.config.get("quantization_config")
    method = _quant_method(quantization)
    keep = _stock_modules_to_not_convert(method, _get(quantization, "modules_to_not_convert")) or []
    if getattr(model, "hf_quantizer", None) is None:
        return f"quantized with {method} but without diffusers' quantizer (load it with `quantization_config`)"
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not _is_quantized_linear(module):
            continue
        quantized = _is_quantized_linear(module)
        for stock_name in _stock_names(name, len(model.transformer_blocks)):
            if _stock_would_quantize(method, stock_name, keep) != quantized:
                return (
                    f"{method} `modules_to_not_convert`={keep!r} would {'not ' if quantized else ''}quantize "
                    f"{stock_name!r} in diffusers' DiT"
                )
    return None


def _stock_quantization_config(model: nn.Module) -> Any:
    quantization = model.config.get("quantization_config")
    if quantization is None:
        return None
    method = _quant_method(quantization)
    keep = _stock_modules_to_not_convert(method, _get(quantization, "modules_to_not_convert"))
    if isinstance(quantization, Mapping):
        return {**quantization, "modules_to_not_convert": keep}
    stock = copy.deepcopy(quantization)
    stock.modules_to_not_convert = keep
    return stock


# --- conversion ------------------------------------------------------------------------------------------------


def stock_config(model: nn.Module) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` config of a representable model: its stock keys, 1000 classes where it has fewer
    (see the module docstring), and ``MARKER_KEY`` recording the class count, label dropout and the
    ``modules_to_not_convert`` under our names."""
    config = {key: model.config[key] for key in _STOCK_INIT_KEYS if key in model.config}
    classes = model.config.num_embeds_ada_norm
    config["num_embeds_ada_norm"] = STOCK_NULL_CLASS
    marker: dict[str, Any] = {"num_classes": classes, "class_dropout_prob": model.config.class_dropout_prob}
    quantization = model.config.get("quantization_config")
    if quantization is not None:
        marker["modules_to_not_convert"] = _get(quantization, "modules_to_not_convert")
    return {**config, MARKER_KEY: marker}


def _stock_label_table(table: nn.Embedding, classes: int) -> nn.Embedding:
    """Stock's (1001, dim) label table from our (classes + 1, dim) one: rows 0..classes-1 ours, then the null row."""
    weight = table.weight.detach()
    null = weight[classes : classes + 1]
    padded = torch.cat([weight[:classes], null.expand(STOCK_NULL_CLASS + 1 - classes, -1)], dim=0)
    stock = nn.Embedding(STOCK_NULL_CLASS + 1, weight.shape[1], device="meta")
    stock.weight = nn.Parameter(padded.clone(), requires_grad=table.weight.requires_grad)
    return stock


def to_stock_transformer(model: nn.Module) -> DiTTransformer2DModel:
    """diffusers' ``DiTTransformer2DModel`` computing what ``model`` computes: its leaf modules (quantized or not) are
    shared, not copied, except the conditioning embedding, which stock holds once per block (block copies and the
    label table padded to 1000 classes). The stock model carries the quantization config under stock module names
    and a diffusers quantizer, so that its ``save_pretrained`` writes a folder diffusers reloads quantized. Refuses
    a model ``stock_format_problem`` names a reason for."""
    if type(model) is DiTTransformer2DModel:
        return model
    problem = transformer_stock_problem(model)
    if problem:
        raise DiTOptimumError(f"This transformer cannot be saved as diffusers' DiTTransformer2DModel: {problem}.")
    config = stock_config(model)
    marker = config.pop(MARKER_KEY)
    with torch.device("meta"):
        stock = DiTTransformer2DModel(**config)
    shapes = {name: tuple(tensor.shape) for name, tensor in stock.named_parameters()}  # what stock reloads into
    classes = model.config.num_embeds_ada_norm
    ours_embedding = model.conditioning_embedding
    for name in ("pos_embed", "norm_out", "proj_out_1", "proj_out_2"):
        setattr(stock, name, getattr(model, name))
    for index, (block, ours) in enumerate(zip(stock.transformer_blocks, model.transformer_blocks, strict=True)):
        block.norm1.linear = ours.norm1.linear
        for name in ("to_q", "to_k", "to_v"):
            setattr(block.attn1, name, getattr(ours.attn1, name))
        block.attn1.to_out[0] = ours.attn1.to_out[0]
        block.norm2, block.ff = ours.norm2, ours.ff
        embedding = block.norm1.emb  # one copy per block: safetensors stores no shared tensors
        embedding.time_proj = ours_embedding.time_proj
        embedding.timestep_embedder = (
            ours_embedding.timestep_embedder if index == 0 else copy.deepcopy(ours_embedding.timestep_embedder)
        )
        embedding.class_embedder.embedding_table = _stock_label_table(
            ours_embedding.class_embedder.embedding_table, classes
        )
    # stock's own (unshared) tensors are plain ones on the meta device; a pre-quantized quanto weight reports the
    # meta device on its wrapper while its data is real, so tensor subclasses are not asked
    tensors = [*stock.named_parameters(), *stock.named_buffers()]
    left = [name for name, tensor in tensors if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_meta]
    state = dict(stock.named_parameters())  # quantized weights keep their float shape
    changed = sorted(set(shapes) ^ set(state)) + [
        n for n in shapes if n in state and tuple(state[n].shape) != shapes[n]
    ]
    if left or changed:  # a module of ours that the mapping above does not know
        raise DiTOptimumError(
            f"Internal error: the stock DiT model has unshared tensors {left[:4]} or other names or shapes "
            f"{changed[:4]} than diffusers builds."
        )
    stock.register_to_config(**{MARKER_KEY: marker})
    quantization = _stock_quantization_config(model)
    if quantization is not None:
        stock.register_to_config(quantization_config=quantization)
        quantizer = copy.copy(model.hf_quantizer)
        quantizer.quantization_config = quantization
        stock.hf_quantizer = quantizer
    stock.train(model.training)
    return stock


# --- loading a stock-format folder back into the package's model ----------------------------------------------


def restore_stock_config(config: dict[str, Any]) -> dict[str, Any]:
    """A loaded ``config.json`` as ``DiTOptimumTransformer2DModel`` builds it: a stock-format config saved by this
    package (``MARKER_KEY``) gets back its class count, label dropout and ``modules_to_not_convert`` (the marker
    stays, for ``trim_stock_class_table``); any other config is returned unchanged."""
    marker = config.get(MARKER_KEY)
    if config.get("_class_name") != STOCK_TRANSFORMER[1] or not isinstance(marker, Mapping):
        return config
    classes, dropout = marker.get("num_classes"), marker.get("class_dropout_prob")
    table = config.get("num_embeds_ada_norm")
    valid = (
        isinstance(classes, int)
        and not isinstance(classes, bool)
        and table == STOCK_NULL_CLASS
        and 1 <= classes <= STOCK_NULL_CLASS
    )
    # a stock-format model has a null class (row 1000 of the table): its label dropout is in (0, 1)
    if dropout is not None:
        number = isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
        valid = valid and number and 0 < dropout < 1
    if not valid:
        raise DiTOptimumError(
            f"The transformer config's `{MARKER_KEY}` records num_classes={classes!r} and class_dropout_prob="
            f"{dropout!r} for a stock table of num_embeds_ada_norm={table!r}; allowed: num_classes an integer in "
            f"1..{STOCK_NULL_CLASS} with a table of {STOCK_NULL_CLASS}, class_dropout_prob a number in (0, 1) (the "
            "folder was edited: re-save the model)."
        )
    config = {**config, "num_embeds_ada_norm": classes}
    if dropout is not None:
        config["class_dropout_prob"] = dropout
    quantization = config.get("quantization_config")
    if isinstance(quantization, Mapping) and "modules_to_not_convert" in marker:
        config["quantization_config"] = {**quantization, "modules_to_not_convert": marker["modules_to_not_convert"]}
    return config


def trim_stock_class_table(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """In a stock-format checkpoint (``MARKER_KEY`` in the model's config), the padded label table back to the
    model's classes plus its null row; the marker then leaves the config (a later save writes it anew)."""
    from diffusers.configuration_utils import FrozenDict

    config = model.config
    if MARKER_KEY not in config:
        return
    model._internal_dict = FrozenDict({key: value for key, value in config.items() if key != MARKER_KEY})
    table = state_dict.get(_TABLE_KEY)
    classes = config.num_embeds_ada_norm
    if table is None or table.shape[0] != STOCK_NULL_CLASS + 1 or classes == STOCK_NULL_CLASS:
        return
    # the padding (rows classes..999) is copies of the null row and the last class is not: a marker that does not
    # match the weights (an edited folder) would drop classes or invent them
    null = table[STOCK_NULL_CLASS]
    if not bool((table[classes:STOCK_NULL_CLASS] == null).all()) or torch.equal(table[classes - 1], null):
        raise DiTOptimumError(
            f"The transformer config's `{MARKER_KEY}` records num_classes={classes} but the label table's rows do not "
            f"match it (rows {classes}..{STOCK_NULL_CLASS - 1} must repeat the null row {STOCK_NULL_CLASS}, row "
            f"{classes - 1} must be a class of its own): the folder was edited; re-save the model."
        )
    state_dict[_TABLE_KEY] = torch.cat([table[:classes], table[STOCK_NULL_CLASS:]], dim=0)


def map_stock_loaded_keys(loaded_keys: list[str], hf_quantizer: Any) -> list[str]:
    """The checkpoint's key names as ``DiTOptimumTransformer2DModel`` has them, for a quantizer that names them from
    the file's metadata (torchao's safetensors format names every tensor there): block 0's copy of the stock
    conditioning embedding is the shared one, the other blocks' copies are dropped (``_fix_state_dict_keys_on_load``
    maps the tensors themselves the same way)."""
    from .transformer import _STOCK_BLOCK_EMBEDDING

    def mapped(names: list[str]) -> list[str]:
        result = []
        for name in names:
            match = _STOCK_BLOCK_EMBEDDING.match(name)
            if match is None:
                result.append(name)
            elif match.group(1) == "0":
                result.append(f"conditioning_embedding.{match.group(2)}")
        return result

    metadata = getattr(hf_quantizer, "_metadata", None)
    if isinstance(metadata, dict) and isinstance(metadata.get("tensor_names"), str):
        names = json.loads(metadata["tensor_names"])
        if any(_STOCK_BLOCK_EMBEDDING.match(name) for name in names):
            renamed = {**metadata, "tensor_names": json.dumps(mapped(names))}
            for name in names:
                match = _STOCK_BLOCK_EMBEDDING.match(name)
                if match is not None:
                    entry = renamed.pop(name, None)
                    if match.group(1) == "0" and entry is not None:
                        renamed[f"conditioning_embedding.{match.group(2)}"] = entry
            hf_quantizer._metadata = renamed
    if not any(_STOCK_BLOCK_EMBEDDING.match(name) for name in loaded_keys):
        return loaded_keys
    return mapped(loaded_keys)
