"""Pipeline-level LoRA for DiT pipelines, as diffusers' pipelines have it: ``load_lora_weights``,
``save_lora_weights``, ``fuse_lora`` / ``unfuse_lora``, ``set_adapters``, ``delete_adapters``. The transformer is
the only LoRA-loadable component; diffusers' transformer-only loader does the work, after the package's one LoRA
reader (``models.lora.load_checked_lora``) has read and checked the file: only safetensors load, and a file that does
not fit the transformer is refused naming it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, SanaLoraLoaderMixin

from ..errors import DiTOptimumError
from ..files import check_writable, claim_files, staged_file
from ..models.lora import (
    LORA_FILE_OPTIONS,
    LORA_SAVE_ADVICE,
    adapters_text,
    check_adapter_name,
    check_adapter_names,
    check_finite_lora_tensors,
    check_lora_file_name,
    load_checked_lora,
    read_lora_weights,
)


class DiTLoraLoaderMixin(SanaLoraLoaderMixin):
    """LoRA layers into the pipeline's ``DiTOptimumTransformer2DModel`` (diffusers' transformer-only loader, whose
    first user was Sana); pickled LoRA files are refused. The methods that change the adapters hold the pipeline's
    ``call_lock`` (when it has one): they wait for a running call instead of changing its model half-way."""

    def _adapter_lock(self) -> contextlib.AbstractContextManager:
        lock = getattr(self, "call_lock", None)  # DiTOptimumPipeline's per-object re-entrant lock
        return lock if lock is not None else contextlib.nullcontext()

    def _check_components(self, components: Any, parameter: str) -> None:
        allowed = list(self._lora_loadable_modules)
        listed = [components] if isinstance(components, str) else components
        if (
            not isinstance(listed, (list, tuple))
            or not listed
            or any(not isinstance(c, str) or c not in allowed for c in listed)
        ):
            raise DiTOptimumError(
                f"`{parameter}`={components!r} names no LoRA-loadable component; allowed: {', '.join(allowed)}."
            )

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: Any = None) -> None:
        """diffusers' ``set_adapters`` (after any running call): ``adapter_names`` must be loaded adapters and
        ``adapter_weights`` one entry per adapter; a dict's keys are components (``transformer``) and its per-layer
        dicts' keys must match adapted layers. diffusers would drop an unknown key with a warning and use weight 1.0
        (``{"a": 0.0}`` would leave adapter ``a`` at 1.0)."""
        with self._adapter_lock():
            components = list(self._lora_loadable_modules)
            entries = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights]
            for entry in entries:
                if isinstance(entry, Mapping) and set(entry) - set(components):
                    unknown = sorted(map(repr, set(entry) - set(components)))
                    raise DiTOptimumError(
                        f"`adapter_weights` has the key(s) {', '.join(unknown)}, which name no LoRA-loadable "
                        f"component; allowed keys: {', '.join(components)} (to weight adapters by name, pass a list "
                        f"in the order of `adapter_names`). Adapters: {adapters_text(self.transformer)}."
                    )
            names = check_adapter_names(self.transformer, adapter_names)
            if isinstance(adapter_weights, list) and len(adapter_weights) != len(names):
                raise DiTOptimumError(
                    f"`adapter_weights` has {len(adapter_weights)} entries for {len(names)} adapters {names}; give "
                    "one weight per adapter (or one number for all)."
                )
            super().set_adapters(adapter_names, adapter_weights)

    def fuse_lora(
        self,
        components: list[str] = ["transformer"],  # noqa: B006 (diffusers' signature)
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """diffusers' ``fuse_lora`` (after any running call); ``components`` and ``adapter_names`` must name
        what the pipeline has (an unknown adapter would fuse nothing)."""
        with self._adapter_lock():
            self._check_components(components, "components")
            if adapter_names is not None:
                check_adapter_names(self.transformer, adapter_names)
            super().fuse_lora(
                components=components,
                lora_scale=lora_scale,
                safe_fusing=safe_fusing,
                adapter_names=adapter_names,
                **kwargs,
            )

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs: Any) -> None:  # noqa: B006
        """diffusers' ``unfuse_lora``, after any running call."""
        with self._adapter_lock():
            self._check_components(components, "components")
            super().unfuse_lora(components=components, **kwargs)

    def unload_lora_weights(self) -> None:
        """diffusers' ``unload_lora_weights``, after any running call."""
        with self._adapter_lock():
            super().unload_lora_weights()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """diffusers' ``delete_adapters`` (after any running call); unknown names are refused naming the adapters
        there are (the transformer's ``delete_adapters``)."""
        with self._adapter_lock():
            super().delete_adapters(adapter_names)

    def enable_lora(self) -> None:
        """diffusers' ``enable_lora``, after any running call."""
        with self._adapter_lock():
            super().enable_lora()

    def disable_lora(self) -> None:
        """diffusers' ``disable_lora``, after any running call."""
        with self._adapter_lock():
            super().disable_lora()

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: Any, **kwargs: Any):
        """diffusers' ``lora_state_dict`` through the package's LoRA reader (``read_lora_weights``): safetensors
        only (a ``.bin`` LoRA is never unpickled), a regular, readable file, named in every error."""
        return_metadata = kwargs.pop("return_lora_metadata", False)
        state_dict, metadata, _ = read_lora_weights(pretrained_model_name_or_path_or_dict, **kwargs)
        state_dict = super().lora_state_dict(state_dict)  # diffusers' own key handling, on the tensors read
        return (state_dict, metadata) if return_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """diffusers' ``load_lora_weights`` (Sana's, transformer only), reading and checking the LoRA with the
        model-level loader's reader (``load_checked_lora``): a file that is unreadable, non-finite, or whose keys or
        shapes do not fit this pipeline's transformer is refused naming the file, before the model changes. Waits
        for a running call (``call_lock``)."""
        with self._adapter_lock():
            self._load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name, hotswap, **kwargs)

    def _load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None, hotswap: bool, **kwargs: Any
    ) -> None:
        check_adapter_name(adapter_name)
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        kwargs.pop("return_lora_metadata", None)
        options = {name: kwargs.pop(name) for name in LORA_FILE_OPTIONS if name in kwargs}
        if kwargs:
            raise TypeError(f"load_lora_weights() got unexpected keyword arguments {sorted(kwargs)}.")
        transformer = self.transformer
        state_dict, metadata, source = load_checked_lora(
            transformer, pretrained_model_name_or_path_or_dict, self.transformer_name, **options
        )
        state_dict = super().lora_state_dict(state_dict)
        without_lora = [key for key in state_dict if "lora" not in key]
        if without_lora:  # diffusers' pipeline-level rule: full weights load with `transformer.load_lora_adapter`
            raise DiTOptimumError(
                f"{source} holds keys that are not LoRA layers ({', '.join(repr(k) for k in without_lora[:4])}): "
                "a pipeline loads LoRA weights only; load it with `pipe.transformer.load_lora_adapter`."
            )
        self.load_lora_into_transformer(
            state_dict,
            transformer=transformer,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, Any] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        """diffusers' ``save_lora_weights``, as safetensors only: a ``weight_name`` of another format (a file the
        loaders would refuse) or ``safe_serialization=False`` is refused before anything is written, and so are
        non-finite tensors."""
        if not safe_serialization:
            raise DiTOptimumError("`safe_serialization`=False is not supported: LoRA weights are saved as safetensors.")
        check_lora_file_name(weight_name, saving=True)
        layers = transformer_lora_layers or {}
        tensors = {key: value for key, value in layers.items() if isinstance(value, torch.Tensor)}
        if tensors:
            check_finite_lora_tensors(tensors, "`transformer_lora_layers`")
        if not is_main_process:
            return
        name = weight_name or LORA_WEIGHT_NAME_SAFE
        folder = check_writable(save_directory, "save_directory")
        claim_files(folder, [name], parameter="save_directory", advice=LORA_SAVE_ADVICE)  # before diffusers writes
        # diffusers writes into a fresh folder; the file then takes its place through the package's write path (an
        # earlier LoRA save of the package is replaced; a user's file of that name is refused; never through a link)
        with tempfile.TemporaryDirectory(prefix=".dit_optimum-lora-", dir=folder) as scratch:
            super().save_lora_weights(
                scratch,
                transformer_lora_layers=transformer_lora_layers,
                is_main_process=is_main_process,
                weight_name=name,
                save_function=save_function,
                safe_serialization=safe_serialization,
                transformer_lora_adapter_metadata=transformer_lora_adapter_metadata,
            )
            with staged_file(folder, name, "save_directory", advice=LORA_SAVE_ADVICE) as temporary:
                os.replace(os.path.join(scratch, name), temporary)


def save_lora_weights_of(
    transformer: Any,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    weight_name: str | None = None,
) -> None:
    """A pipeline-level LoRA file of ``transformer``'s adapter ``adapter_name``: its keys and ``LoraConfig`` metadata
    under ``transformer.``, as ``pipe.save_lora_weights`` writes them (safetensors, written atomically). It loads
    with ``pipe.load_lora_weights(folder)`` and ``pipe.transformer.load_lora_adapter(folder)``;
    ``transformer.save_lora_adapter`` writes the model-level file (no prefix) instead."""
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in (getattr(transformer, "peft_config", None) or {}):
        raise DiTOptimumError(
            f"Adapter name {adapter_name} not found in the model. Its adapters: {adapters_text(transformer)}."
        )
    DiTLoraLoaderMixin.save_lora_weights(
        save_directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=adapter_name),
        weight_name=weight_name,
        transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict(),
    )
