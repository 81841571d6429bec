"""LoRA targets of a DiT and the peft config that adapts them: named groups of the block's linear layers, checked
against the model before anything is added, so a typo or an empty selection is an error, not a silent no-op."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import DiTOptimumError

# Module-name suffixes inside a transformer block, by group (MoE experts are batched weights: not targetable).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    "mlp": ("ff.net.0.proj", "ff.net.2"),
    "adaln": ("norm1.linear",),
}
DEFAULT_TARGETS: tuple[str, ...] = ("attention",)


def lora_target_modules(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """The full names of ``model``'s linear layers in the ``targets`` groups; unknown groups, or groups that match
    nothing in this model (e.g. ``mlp`` on a model whose every block is MoE), raise naming ``targets``."""
    if isinstance(targets, str) or not targets:
        raise DiTOptimumError(f"`targets`={targets!r} must be a non-empty list; allowed: {', '.join(LORA_TARGETS)}.")
    unknown = [name for name in targets if name not in LORA_TARGETS]
    if unknown:
        raise DiTOptimumError(f"Unknown LoRA `targets` {unknown}; allowed values: {', '.join(LORA_TARGETS)}.")
    found = []
    for group in dict.fromkeys(targets):
        suffixes = LORA_TARGETS[group]
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("transformer_blocks.") and name.endswith(suffixes)
        ]
        if not names:
            raise DiTOptimumError(f"LoRA `targets` group {group!r} matches no layer of this model ({suffixes}).")
        found.extend(names)
    return found


def lora_config(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float | None = None,
    modules_to_save: Sequence[str] | None = None,
):
    """A peft ``LoraConfig`` for ``model``: rank ``rank`` on the ``targets`` groups, scale ``alpha / rank``
    (``alpha`` defaults to ``rank``), ``modules_to_save`` trained in full (e.g. a resized class embedding)."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DiTOptimumError(f"LoRA `rank`={rank!r} must be an integer >= 1.")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or alpha == float("inf"):
        raise DiTOptimumError(f"LoRA `alpha`={alpha!r} must be a finite number > 0.")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=True,  # B = 0: the adapter starts as the identity
        target_modules=lora_target_modules(model, targets),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )


def check_lora_file_name(weight_name: str | None) -> None:
    """LoRA weights load from safetensors only: a ``weight_name`` of another format is refused before reading."""
    if weight_name is not None and not str(weight_name).endswith(".safetensors"):
        raise DiTOptimumError(
            f"`weight_name`={weight_name!r} is not a .safetensors file: LoRA weights load from safetensors only."
        )
