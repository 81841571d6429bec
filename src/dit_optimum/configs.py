"""DiT presets: the model sizes of the DiT paper plus fast-DiT's XS, each with patch 2, 4 or 8."""

from __future__ import annotations

import re
from typing import Any

from .errors import DiTOptimumError

# size -> (depth, hidden size, heads); head dim is 64 for every size.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "XS": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES: tuple[int, ...] = (2, 4, 8)
# The variants of the study this project reproduces (arXiv 2509.17894).
PAPER_PRESETS: tuple[str, ...] = ("DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4")

_NAME_PATTERN = re.compile(r"^(?:DiT[-_])?(XS|S|B|L|XL)[/_-]([0-9]+)$", re.IGNORECASE)  # ASCII digits only


def preset_names() -> list[str]:
    """All preset names, e.g. ``"DiT-S/2"``."""
    return [f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in PATCH_SIZES]


def parse_preset_name(name: str) -> tuple[str, int]:
    """Split ``"DiT-S/2"`` (also ``"DiT_S_2"`` or ``"S/2"``) into ``("S", 2)``; reject unknown names."""
    match = _NAME_PATTERN.match(name.strip()) if isinstance(name, str) else None
    if match is None or int(match.group(2)) not in PATCH_SIZES:
        raise DiTOptimumError(f"Unknown DiT preset `name`={name!r}; allowed values: {', '.join(preset_names())}.")
    return match.group(1).upper(), int(match.group(2))


def dit_config(
    name: str,
    *,
    sample_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Config dict for ``DiTOptimumTransformer2DModel`` from a preset name.

    ``sample_size`` is the side of the (latent or pixel) input, ``in_channels`` its channels; with ``learn_sigma``
    the model also predicts the variance (``out_channels = 2 * in_channels``) as DiT does. ``overrides`` are any
    other config keys (``attention_type``, ``num_kv_heads``, ...).
    """
    size, patch = parse_preset_name(name)
    if not isinstance(learn_sigma, bool):  # "no" would be truthy
        raise DiTOptimumError(f"`learn_sigma`={learn_sigma!r} must be True or False.")
    depth, hidden, heads = DIT_SIZES[size]
    config: dict[str, Any] = {
        "num_layers": depth,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "patch_size": patch,
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if learn_sigma else in_channels,
        "num_embeds_ada_norm": num_classes,
    }
    config.update(overrides)
    return config
