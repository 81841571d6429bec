"""DiTOptimumPipeline: class-conditional DiT sampling for any class count, in latent or pixel space."""

from __future__ import annotations

import json
import math
import numbers
import os
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

from ..errors import DiTOptimumError
from ..models.autoencoder import IdentityAutoencoder
from ..models.lora import check_no_lora_layers
from ..models.resources import check_resources
from ..models.transformer import DiTOptimumTransformer2DModel, check_finite_weights
from ..schemas import MODEL_INDEX, FileContentError, SchemaError, check_component_folder, read_json_file
from ..utils import check_number, check_source, first_line, is_integer, pop_unsupported_save_options
from ..utils import save_directory as save_directory_into
from .lora import DiTLoraLoaderMixin

OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")
# Saved folders name diffusers' own class so that plain `DiffusionPipeline.from_pretrained` resolves them.
SAVED_PIPELINE_CLASS = "DiTPipeline"
# One re-entrant lock per pipeline object (kept outside the object so that it still deep-copies and pickles).
_CALL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CALL_LOCKS_GUARD = threading.Lock()
# The largest guidance scale an option may ask for before any pipeline is built: float16's largest number (a larger
# scale is inf in a half-precision pipeline's guided noise, so every image would be NaN). A pipeline call allows up
# to its own dtype's largest number.
MAX_GUIDANCE_SCALE = float(torch.finfo(torch.float16).max)


def check_scheduler_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse a scheduler config that cannot sample: ``num_train_timesteps`` < 1, or betas (``beta_start``,
    ``beta_end``, ``trained_betas``) that are not finite numbers in [0, 1); the error names ``where`` and the key."""
    steps = config.get("num_train_timesteps", 1000)
    if not is_integer(steps) or steps < 1:
        raise DiTOptimumError(f"The scheduler config ({where}) has `num_train_timesteps`={steps!r}: it must be >= 1.")
    for key in ("beta_start", "beta_end"):
        if config.get(key) is not None:
            try:
                check_number(key, config[key], 0, 1, include_maximum=False)
            except DiTOptimumError as error:
                raise DiTOptimumError(f"The scheduler config ({where}): {error}") from None
    trained = config.get("trained_betas")
    if trained is not None:
        values = np.asarray(trained, dtype=object).reshape(-1) if isinstance(trained, (list, tuple)) else None
        valid = values is not None and len(values) > 0
        if valid:
            try:
                numbers = np.asarray(values, dtype=np.float64)
                valid = bool(np.isfinite(numbers).all() and (numbers >= 0).all() and (numbers < 1).all())
            except (TypeError, ValueError):
                valid = False
        if not valid:
            raise DiTOptimumError(
                f"The scheduler config ({where}) has invalid `trained_betas`: it must be a non-empty list of finite "
                "numbers in [0, 1)."
            )


def check_scheduler(scheduler: Any, where: str = "scheduler") -> None:
    """``check_scheduler_config`` on a built scheduler, and its ``betas`` / ``alphas_cumprod`` tables finite."""
    check_scheduler_config(scheduler.config, where)
    for key in ("betas", "alphas_cumprod"):
        table = getattr(scheduler, key, None)
        if torch.is_tensor(table) and table.numel() and not bool(torch.isfinite(table).all()):
            raise DiTOptimumError(f"The scheduler ({where}) has non-finite `{key}`: check its config's betas.")


def _normalize_id2label(id2label: dict[Any, str] | None, num_classes: int) -> dict[str, str] | None:
    if id2label is None:
        return None
    normalized = {}
    for key, value in id2label.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise DiTOptimumError(f"`id2label` keys must be class indices, got {key!r}.") from None
        if not 0 <= index < num_classes:
            raise DiTOptimumError(
                f"`id2label` key {index} is outside the model's classes; allowed values: 0..{num_classes - 1}."
            )
        normalized[str(index)] = str(value)
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
    return dict(sorted(normalized.items(), key=lambda item: int(item[0])))


def _check_saved_scheduler(folder: Path) -> None:
    # Before diffusers builds it (a 0-step config fails there with an IndexError): a readable local config only.
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # diffusers reports an unreadable config naming the file
    if isinstance(config, dict):
        check_scheduler_config(config, str(path))


def _check_model_index(folder: Path) -> None:
    # A local folder's index must be a JSON object naming components (diffusers fails on others with a TypeError),
    # each component's config a JSON object, and every file there a regular one (a FIFO would block the load).
    index = folder / "model_index.json"
    if not folder.is_dir():
        return
    if not index.exists():
        raise DiTOptimumError(f"{str(folder)!r} is not a saved pipeline: it has no model_index.json.")
    try:
        content = read_json_file(index, MODEL_INDEX)
    except SchemaError as error:
        raise DiTOptimumError(f"{str(index)!r} does not describe a DiT pipeline ({error.problem}).") from None
    except FileContentError as error:
        raise DiTOptimumError(f"{str(index)!r} is {error.problem}: the pipeline folder is damaged.") from None
    for name, entry in content.items():
        if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None:
            check_component_folder(folder / name)


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
    ):
        vae = IdentityAutoencoder() if vae is None else vae
        scheduler = DDIMScheduler() if scheduler is None else scheduler
        id2label = _normalize_id2label(id2label, transformer.config.num_embeds_ada_norm)
        check_scheduler(scheduler)
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self.register_to_config(id2label=id2label)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DiTOptimumPipeline:
        """diffusers' loader (safetensors only); a missing, unreadable or inconsistent folder raises
        ``DiTOptimumError`` naming it and the file, never a raw traceback from deep inside."""
        source = check_source(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        _check_model_index(Path(source))
        _check_saved_scheduler(Path(source))
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        try:
            pipeline = super().from_pretrained(source, **kwargs)
        except DiTOptimumError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DiTOptimumError(f"Could not load the pipeline from {source!r}: {first_line(error)}") from error
        for name, component in pipeline.components.items():  # our transformer checked its weights as it loaded
            if isinstance(component, torch.nn.Module) and not isinstance(
                component, (DiTOptimumTransformer2DModel, IdentityAutoencoder)
            ):
                check_finite_weights(component, str(Path(source) / name))
        return pipeline

    @property
    def call_lock(self) -> threading.RLock:
        """The lock each call holds: calls to one pipeline object from several threads (a demo serving two requests)
        run one after the other, each giving the images it would give alone (the scheduler and cache hooks keep
        per-call state in the shared object). Re-entrant: hold it around a call to time the call alone."""
        with _CALL_LOCKS_GUARD:
            lock = _CALL_LOCKS.get(self)
            if lock is None:
                lock = _CALL_LOCKS[self] = threading.RLock()
            return lock

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
        num_classes = self.transformer.config.num_embeds_ada_norm
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

    def _check_sampling_arguments(self, guidance_scale: float, num_inference_steps: int, output_type: str) -> None:
        check_scheduler(self.scheduler)  # it may have been replaced since construction
        dtype = self.transformer.dtype
        # the guided noise is uncond + scale * (cond - uncond) in the model's dtype: a scale beyond its largest
        # number is inf there, and every image NaN
        largest = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
        valid = isinstance(guidance_scale, numbers.Real) and not isinstance(guidance_scale, bool)
        try:
            valid = valid and math.isfinite(float(guidance_scale)) and 1 <= float(guidance_scale) <= largest
        except OverflowError:  # an integer beyond any float
            valid = False
        if not valid:
            raise DiTOptimumError(
                f"`guidance_scale`={guidance_scale!r} must be a finite number in [1, {largest:g}] (1 disables "
                f"guidance; larger values overflow the model's {str(dtype).replace('torch.', '')})."
            )
        if guidance_scale > 1 and self.transformer.null_class_label is None:
            raise DiTOptimumError(
                "`guidance_scale` > 1 needs a null class, but the model has class_dropout_prob=0; use guidance_scale=1."
            )
        max_steps = self.scheduler.config.num_train_timesteps
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= max_steps
        ):
            raise DiTOptimumError(
                f"`num_inference_steps`={num_inference_steps!r} must be an integer in 1..{max_steps}."
            )
        if output_type not in OUTPUT_TYPES:
            raise DiTOptimumError(f"Unknown `output_type`={output_type!r}; allowed values: {', '.join(OUTPUT_TYPES)}.")

    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per entry of ``class_labels`` (indices or names).

        ``guidance_scale`` > 1 enables classifier-free guidance; ``output_type`` is ``"pil"``, ``"np"`` (B, H, W, C
        in [0, 1]), ``"pt"`` (B, C, H, W in [0, 1]) or ``"latent"`` (the denoised latents, before decoding).
        Concurrent calls on one pipeline object run one at a time (``call_lock``); samples that come out NaN or inf
        raise ``DiTOptimumError`` naming the likely causes instead of returning NaN images.
        """
        with self.call_lock:
            return self._sample(class_labels, guidance_scale, generator, num_inference_steps, output_type, return_dict)

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
        self._check_sampling_arguments(guidance_scale, num_inference_steps, output_type)
        labels = self._class_indices(class_labels, guided=guidance_scale > 1)
        device = self._execution_device
        batch_size = len(labels)
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
        steps = len(self.scheduler.timesteps)
        for index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            self._current_timestep = t
            if use_guidance:
                half = model_input[: len(model_input) // 2]
                model_input = torch.cat([half, half], dim=0)
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t[None].to(device) if torch.is_tensor(t) else torch.tensor([t], device=device)
            timesteps = timesteps.expand(model_input.shape[0])
            # one call per step (guidance batched): diffusers' cache hooks key their state by this context
            with self.transformer.cache_context("cond_uncond", step_index=index, num_inference_steps=steps, timestep=t):
                noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=class_tensor).sample

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
        self._check_finite_samples(latents, guidance_scale)
        if output_type == "latent":
            samples = latents
        else:
            latents = 1 / self.vae.config.scaling_factor * latents  # as the stock pipeline: same bits
            if not isinstance(self.vae, IdentityAutoencoder):  # a real VAE may run in another dtype than a
                latents = latents.to(self.vae.dtype)  # quantized / half-precision transformer
            samples = self.vae.decode(latents).sample
            samples = (samples / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    samples = self.numpy_to_pil(samples)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

    def _check_finite_samples(self, latents: torch.Tensor, guidance_scale: float) -> None:
        # one reduction and one host sync per call, after the loop: NaN images are an error, never a result
        if bool(torch.isfinite(latents).all()):
            return
        bad = int((~torch.isfinite(latents)).sum())
        raise DiTOptimumError(
            f"The samples are not finite ({bad} of {latents.numel()} latent values are NaN or inf). Likely causes: "
            f"`guidance_scale`={guidance_scale!r} too large (typical: 1-10), non-finite or diverged transformer "
            "weights (a training run that diverged), or the scheduler's config (betas, num_train_timesteps)."
        )

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False, **kwargs: Any) -> None:
        """Save so that plain ``DiffusionPipeline`` loads it; safetensors only.

        As diffusers does, the pipeline's files go into ``save_directory`` and other files there are left alone; each
        file is written whole (temp file, then rename). A folder that holds other files but no ``model_index.json``
        (or a file at that path) is refused unless ``overwrite=True``.
        """
        pop_unsupported_save_options(kwargs)
        if isinstance(self.transformer, torch.nn.Module):
            check_no_lora_layers(self.transformer, pipeline=True)  # before anything is written
        sources = [getattr(self.config, "_name_or_path", None)]
        sources += [getattr(getattr(c, "config", None), "_name_or_path", None) for c in self.components.values()]
        with save_directory_into(save_directory, "model_index.json", overwrite, sources=sources) as staging:
            super().save_pretrained(staging, safe_serialization=True, **kwargs)
            index_path = staging / "model_index.json"
            index = json.loads(index_path.read_text())
            index["_class_name"] = SAVED_PIPELINE_CLASS
            for name, value in index.items():
                # Components name our top-level package, which re-exports them and ModelMixin as diffusers requires.
                if isinstance(value, list) and len(value) == 2 and str(value[0]).startswith("dit_optimum."):
                    index[name] = ["dit_optimum", value[1]]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
