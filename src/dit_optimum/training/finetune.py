"""Fine-tuning a pretrained DiT on new data: the base loaded from a pipeline and checked against the data, its class
table rebuilt when the class set changes (count or names; classes matched by name, the null class last), and what
trains: everything (``full``), LoRA adapters through peft (``lora``), or biases only (``bias_norm``, BitFit /
DiffFit-style), the class table always in full when it was rebuilt. After training the adapter is saved on its own
and merged into the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..data import TrainingData
from ..errors import DiTOptimumError
from ..models.lora import lora_config
from ..models.transformer import DiTOptimumTransformer2DModel, is_quantized
from ..pipelines.dit import DiTOptimumPipeline
from ..utils import public_config
from .config import TrainConfig

CLASS_TABLE = "conditioning_embedding.class_embedder.embedding_table"
LORA_FOLDER = "lora"


class BaseSampling(NamedTuple):
    """How the pretrained pipeline samples: its scheduler and recorded sampling defaults, which a fine-tune keeps."""

    scheduler: Any
    defaults: dict[str, Any]


def load_pretrained(config: TrainConfig, data: TrainingData) -> tuple[DiTOptimumTransformer2DModel, bool, BaseSampling]:
    """The base transformer of ``config.pretrained``, with its class table resized to the data's classes; returns
    the model, whether the table was resized, and how the base samples. Input size and channels must match the
    data."""
    try:
        pipeline = DiTOptimumPipeline.from_pretrained(config.pretrained)
    except DiTOptimumError as error:
        raise DiTOptimumError(f"`pretrained`={str(config.pretrained)!r} cannot be loaded: {error}") from error
    model = pipeline.transformer
    if is_quantized(model):
        raise DiTOptimumError(
            f"`pretrained`={str(config.pretrained)!r} is quantized: the trainer fine-tunes float pipelines (quantize "
            "the result afterwards). A LoRA on a quantized transformer trains through `add_adapter` in your own loop."
        )
    base_names = {int(index): str(name) for index, name in (pipeline.config.get("id2label") or {}).items()}
    side, channels = data.samples.shape[-1], data.samples.shape[1]
    for key, value in (("sample_size", side), ("in_channels", channels)):
        if model.config[key] != value:
            raise DiTOptimumError(
                f"`pretrained`={str(config.pretrained)!r} has {key}={model.config[key]} but the data gives {value}: "
                "fine-tuning keeps the input space (choose --image-size / --channels to match)."
            )
    num_classes = max(data.num_classes, max(data.id2label, default=-1) + 1)
    names = {index: str(name) for index, name in (data.id2label or {}).items()}
    same = num_classes == model.num_classes and all(base_names.get(i, names[i]) == names[i] for i in names)
    sampling = BaseSampling(pipeline.scheduler, pipeline.sampling_defaults)
    if same:
        return model.float(), False, sampling
    return resize_class_table(model, num_classes, names, base_names), True, sampling


def resize_class_table(
    model: DiTOptimumTransformer2DModel,
    num_classes: int,
    names: dict[int, str] | None = None,
    base_names: dict[int, str] | None = None,
) -> DiTOptimumTransformer2DModel:
    """A copy of ``model`` for a new class set of ``num_classes``: a class keeps the row of the base class of the
    same name (by index when neither side has names), others start from the mean of the base classes, and the null
    class (guidance) keeps its row and moves to the end."""
    config = public_config(model.config)
    resized = DiTOptimumTransformer2DModel.from_config({**config, "num_embeds_ada_norm": num_classes})
    state = {key: value for key, value in model.state_dict().items() if key != f"{CLASS_TABLE}.weight"}
    missing, unexpected = resized.load_state_dict(state, strict=False)
    assert missing == [f"{CLASS_TABLE}.weight"] and not unexpected, (missing, unexpected)
    old = model.get_submodule(CLASS_TABLE).weight.detach().float()
    table = resized.get_submodule(CLASS_TABLE).weight
    if names and base_names:
        by_name = {name: index for index, name in base_names.items()}
        source = {index: by_name.get(name) for index, name in names.items()}
    else:
        source = {index: index for index in range(min(num_classes, model.num_classes))}
    with torch.no_grad():
        table[:num_classes] = old[: model.num_classes].mean(0)
        for index, base_index in source.items():
            if base_index is not None and index < num_classes:
                table[index] = old[base_index]
        if model.null_class_label is not None:
            table[num_classes] = old[model.null_class_label]
    return resized.float()


def prepare_finetune(model: DiTOptimumTransformer2DModel, config: TrainConfig, resized: bool) -> None:
    """Set what trains: all weights, LoRA adapters (added here), or biases only; a resized class table always."""
    if config.finetune == "full":
        return
    model.requires_grad_(False)
    if config.finetune == "lora":
        model.add_adapter(lora_config(model, config.lora_targets, config.lora_rank, config.lora_alpha))
    else:  # bias_norm: every bias (attention, MLP, adaLN modulation, output) and affine norm weight
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or _is_norm_weight(model, name):
                parameter.requires_grad_(True)
    if resized:
        model.get_submodule(CLASS_TABLE).requires_grad_(True)


def _is_norm_weight(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(owner, (nn.LayerNorm, nn.GroupNorm)) and name.endswith(".weight")


def finish_lora(model: DiTOptimumTransformer2DModel, output_dir: Path) -> DiTOptimumTransformer2DModel:
    """Save the adapter to ``<output_dir>/lora`` as a pipeline-level file (loadable onto the base pipeline with
    ``load_lora_weights``) and return ``model`` with it merged and removed, ready to save as a plain pipeline."""
    from ..pipelines.lora import save_lora_weights_of

    save_lora_weights_of(model, output_dir / LORA_FOLDER)
    model.fuse_lora()
    model.unload_lora()
    return model
