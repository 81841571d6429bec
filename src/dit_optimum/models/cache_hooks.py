"""diffusers' cache configs on this DiT: the defaults that name other models' modules, fitted to the DiT's, and a
check that a cache hooked something (a config whose identifiers match no module would change nothing, silently).

- TaylorSeer's default identifiers are ``re.fullmatch`` patterns such as ``^transformer_blocks.*attn``: they match an
  attention module named ``attn``, and a DiT block names it ``attn1``, so nothing would be hooked. With no
  ``cache_identifiers`` given, the DiT's attention modules are hooked (what the defaults mean: every block's
  attention); lite mode predicts the final projection, named ``proj_out_2`` here, while the blocks are skipped.
- FasterCache splits the batch along the inputs it lists as ``[unconditional; conditional]``; the DiT's class labels
  are such an input (diffusers' list names text inputs only), so ``class_labels`` is added. Its default
  ``tensor_format`` is a video layout (``BCFHW``); a DiT's output is ``(B, C, H, W)``, and any other layout is refused
  naming ``tensor_format="BCHW"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..errors import DiTOptimumError

# The DiT's modules, as re.fullmatch patterns
ATTENTION_PATTERN = r"transformer_blocks\.\d+\.attn1"
BLOCK_PATTERN = r"transformer_blocks\.\d+"
FINAL_PROJECTION_PATTERN = r"proj_out_2"
# The model input that carries the conditioning of a class-conditional DiT
CONDITIONAL_INPUT = "class_labels"


def fit_cache_config(config: Any) -> Any:
    """``config`` with diffusers' defaults that cannot match a DiT replaced by the DiT's equivalents (a copy; the
    caller's config is not changed), or ``config`` itself when nothing needs fitting. Refuses a FasterCache
    ``tensor_format`` other than ``"BCHW"``."""
    from diffusers import FasterCacheConfig, TaylorSeerCacheConfig

    if isinstance(config, TaylorSeerCacheConfig):
        if config.use_lite_mode:  # diffusers' lite mode: blocks skipped, the final projection predicted
            return dataclasses.replace(
                config,
                use_lite_mode=False,
                cache_identifiers=[FINAL_PROJECTION_PATTERN],
                skip_predict_identifiers=[BLOCK_PATTERN],
            )
        if not config.cache_identifiers:
            return dataclasses.replace(config, cache_identifiers=[ATTENTION_PATTERN])
        return config
    if isinstance(config, FasterCacheConfig):
        if config.tensor_format != "BCHW":
            raise DiTOptimumError(
                f"FasterCacheConfig(tensor_format={config.tensor_format!r}) does not fit this model: a DiT's input "
                "and output are images, (batch, channels, height, width); pass tensor_format='BCHW'."
            )
        inputs = list(config._unconditional_conditional_input_kwargs_identifiers)
        if CONDITIONAL_INPUT not in inputs:
            return dataclasses.replace(
                config, _unconditional_conditional_input_kwargs_identifiers=[*inputs, CONDITIONAL_INPUT]
            )
    return config


def hooks_on_submodules(model: nn.Module) -> set[tuple[str, str]]:
    """``(module name, hook name)`` of every diffusers hook on a module inside ``model`` (not on ``model`` itself)."""
    found = set()
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if name and registry is not None:
            found.update((name, hook) for hook in getattr(registry, "_hook_order", ()))
    return found


def no_hook_error(config: Any) -> DiTOptimumError:
    """The refusal of a cache config that hooked no module of the DiT, saying what to pass."""
    kind = type(config).__name__
    advice = {
        "TaylorSeerCacheConfig": f"pass `cache_identifiers` (re.fullmatch patterns), e.g. [{ATTENTION_PATTERN!r}]",
        "PyramidAttentionBroadcastConfig": (
            f"pass `spatial_attention_block_identifiers` (re.search patterns), e.g. ({ATTENTION_PATTERN!r},)"
        ),
        "FasterCacheConfig": (
            f"pass `spatial_attention_block_identifiers` (re.search patterns), e.g. ({ATTENTION_PATTERN!r},)"
        ),
        "TextKVCacheConfig": "it caches the text key/values of text-conditioned blocks, and a DiT has none",
    }.get(kind, "its identifiers match none of this model's modules")
    return DiTOptimumError(
        f"{kind} hooked no module of this model, so it would change nothing: {advice}. The DiT's attention modules "
        "are named 'transformer_blocks.<i>.attn1', its blocks 'transformer_blocks.<i>'."
    )
