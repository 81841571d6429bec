"""Pipeline-level LoRA for DiT pipelines, as diffusers' pipelines have it: ``load_lora_weights``,
``save_lora_weights``, ``fuse_lora`` / ``unfuse_lora``, ``set_adapters``, ``delete_adapters``. The transformer is
the only LoRA-loadable component; diffusers' transformer-only loader does the work, and only safetensors load."""

from __future__ import annotations

from typing import Any

from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

from ..errors import DiTOptimumError
from ..models.lora import check_lora_file_name


class DiTLoraLoaderMixin(SanaLoraLoaderMixin):
    """LoRA layers into the pipeline's ``DiTOptimumTransformer2DModel`` (diffusers' transformer-only loader, whose
    first user was Sana); pickled LoRA files are refused."""

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: Any, **kwargs: Any):
        """diffusers' state-dict loading with ``use_safetensors=True``: a ``.bin`` LoRA is never unpickled."""
        if kwargs.get("use_safetensors") is False:
            raise DiTOptimumError("`use_safetensors`=False is not supported: LoRA weights load from safetensors only.")
        check_lora_file_name(kwargs.get("weight_name"))
        kwargs["use_safetensors"] = True
        return super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
