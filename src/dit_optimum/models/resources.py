"""Resource checks shared by the Python API and the command line: the images one call samples or trains on, the
training image side, a LoRA rank and seeds.

``check_resources`` is the one function both call (the CLI's batch-size checks, ``check_activation_memory``, go
through it too), so what the command line refuses the Python API refuses the same way, before any work, with a
``DiTOptimumError`` naming the parameter and the range allowed on this machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import DiTOptimumError
from ..utils import is_integer

# torch.Generator.manual_seed's range (it wraps larger Python integers with an "Overflow" error, negative ones
# silently): seeds are refused outside it.
MAX_SEED = 2**64 - 1


def check_resources(
    config: Mapping[str, Any] | None = None,
    *,
    parameter: str | None = None,
    images: int | None = None,
    guided: bool = False,
    training: bool = False,
    image_size: int | None = None,
    lora_rank: int | None = None,
    seed: int | None = None,
    seeds: int = 1,
) -> None:
    """Refuse work this machine cannot do, naming ``parameter`` and the allowed range.

    - ``images``: images in one forward batch of the model with ``config`` (a pipeline call, a calibration run, a
      training or measuring batch); ``guided`` doubles it (classifier-free guidance), ``training`` keeps every
      block's activations. Bounded by the memory available now.
    - ``image_size``: the input side for ``config`` (its ``sample_size`` replaced) at a batch of ``images``
      (default 1); bounded the same way, the largest side that fits is named.
    - ``lora_rank``: 1..the model's hidden width (a larger rank only adds memory).
    - ``seed``: 0..2**64 - 1 (torch's seed range); ``seeds`` > 1 when ``seed + i`` seeds each of ``seeds`` samples.

    ``parameter`` is the name the user typed, optionally with its command-line option: ``"image_size (--image-size)"``.
    """
    if seed is not None:
        _check_seed(seed, parameter or "seed", seeds)
    if lora_rank is not None:
        _check_lora_rank(_require(config), lora_rank, parameter or "r")
    if image_size is not None:
        _check_image_size(_require(config), image_size, 1 if images is None else images, training, parameter)
    elif images is not None:
        _check_images(_require(config), images, guided, training, parameter or "images")


def _require(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if config is None:
        raise TypeError("check_resources needs the model `config` for this check.")
    return config


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _size(count: int | float) -> str:
    gib = count / 2**30
    return f"{gib:.1f} GiB" if gib < 1e6 else f"{gib:.2g} GiB"


def _activation_bytes(config: Mapping[str, Any], batch: int, training: bool) -> int:
    from .transformer import estimated_activation_bytes

    return estimated_activation_bytes(config, batch, training)


def _named(parameter: str, value: Any) -> str:
    # "image_size (--image-size)" -> "`image_size` (--image-size)=5": the API name and, where given, the CLI option
    name, _, option = parameter.partition(" ")
    return f"`{name}`{' ' + option if option else ''}={value!r}"


def _check_positive(name: str, value: Any) -> None:
    if not is_integer(value) or value < 1:
        raise DiTOptimumError(f"{_named(name, value)} must be a positive integer.")


def _check_images(config: Mapping[str, Any], count: int, guided: bool, training: bool, parameter: str) -> None:
    _check_positive(parameter, count)
    per_image = _activation_bytes(config, 2 if guided else 1, training)
    available = _available_bytes()
    fits = available // max(1, per_image)
    if count <= fits:
        return
    if not fits:
        _check_model_config(config)
    side, patch = config["sample_size"], config["patch_size"]
    purpose = " for training" if training else (" with guidance (two forwards per image)" if guided else "")
    allowed = f"allowed here: 1..{fits}" if fits else "not even one image fits here"
    advice = f"split the work into batches of at most {fits}, or use" if fits else "use"
    raise DiTOptimumError(
        f"{_named(parameter, count)} images at {side}x{side} inputs (patch {patch}: {(side // patch) ** 2} tokens) "
        f"needs about {_size(per_image * count)} of activations{purpose}; {_size(available)} are available "
        f"({allowed}): {advice} a smaller image size."
    )


def _check_model_config(config: Mapping[str, Any]) -> None:
    """When not even one image fits, the model config itself may be what is wrong (a key sizing weights too large
    for the memory, a value out of range): its own validation, run without allocating weights, names that key
    instead of blaming the batch. A config that validates (or cannot be built at all) leaves the batch message, and
    so does a built model's config (diffusers' ``FrozenDict``): it validated when built, and its weights, already in
    memory, are not part of what is available now."""
    import torch
    from diffusers.configuration_utils import FrozenDict

    from .transformer import DiTOptimumTransformer2DModel

    if isinstance(config, FrozenDict):
        return
    try:
        with torch.device("meta"):
            DiTOptimumTransformer2DModel.from_config(dict(config))
    except DiTOptimumError:
        raise
    except Exception:  # not this check's to report: the batch message stands
        return


def _check_image_size(config: Mapping[str, Any], side: int, batch: int, training: bool, parameter: str | None) -> None:
    parameter = parameter or "image_size"
    _check_positive(parameter, side)
    _check_positive("batch_size", batch)
    config = dict(config)
    patch = config["patch_size"]

    def needed(size: int) -> int:
        return _activation_bytes({**config, "sample_size": size}, batch, training)

    available = _available_bytes()
    if needed(side) <= available:
        return
    low, high = 0, side // patch  # the largest multiple of the patch that fits, by bisection (needs grow with size)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if needed(middle * patch) <= available else (low, middle - 1)
    if not low:  # not even the smallest side fits: the batch is what is too large
        _check_images({**config, "sample_size": side}, batch, False, training, "batch_size")
    raise DiTOptimumError(
        f"{_named(parameter, side)} needs about {_size(needed(side))} of activations"
        f"{' for training' if training else ''} at a batch of {batch} ({(side // patch) ** 2} tokens per image, "
        f"patch {patch}); {_size(available)} are available (allowed here: {patch}..{low * patch}). Use a smaller image "
        "size or batch."
    )


def _check_lora_rank(config: Mapping[str, Any], rank: Any, parameter: str) -> None:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if not is_integer(rank) or not 1 <= rank <= width:
        raise DiTOptimumError(
            f"LoRA rank {_named(parameter, rank)} must be an integer in 1..{width}: the layers it adapts are at most "
            f"{width} wide (num_attention_heads x attention_head_dim), so a larger rank only adds memory."
        )


def _check_seed(seed: Any, parameter: str, count: int) -> None:
    highest = MAX_SEED - max(0, count - 1)
    if not is_integer(seed) or not 0 <= seed <= highest:
        reason = f", and seed + i seeds each of the {count} samples" if count > 1 else ""
        raise DiTOptimumError(
            f"{_named(parameter, seed)} must be an integer in 0..{highest} (torch seeds are 0..2**64 - 1{reason})."
        )
