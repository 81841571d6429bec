"""Self-attention for DiT blocks: one module holding the weights, and small processors holding the maths.

Attention types (DESIGN.md section 3):

- ``sdpa``: multi-head softmax attention (same maths as diffusers ``AttnProcessor2_0``).
- ``gqa`` / ``mqa``: ``num_kv_heads`` K/V heads shared by groups of query heads (``mqa``: one K/V head).
- ``shallow``: q/k/v projected to ``dim / attention_compression``, output projected back to ``dim``.
- ``mediated``: ``m`` mediator tokens pooled from Q over the token grid; cost O(N m d) (Pu et al. 2024).
- ``focused``, ``focused_gqa``, ``focused_mqa``: focused linear attention (FLatten, Han et al. 2023),
  with full, grouped or a single K/V head.

The module (``DiTAttention``) owns projections and any extra weights (depthwise convolution); the processor
(``SDPAAttnProcessor``, ``MediatedAttnProcessor``, ``FocusedLinearAttnProcessor``) is a plain callable, swappable
with ``set_processor`` as in diffusers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiTOptimumError

ATTENTION_TYPES: tuple[str, ...] = (
    "sdpa",
    "gqa",
    "mqa",
    "shallow",
    "mediated",
    "focused",
    "focused_gqa",
    "focused_mqa",
)
FOCUSED_VARIANTS: tuple[str, ...] = ("published", "paper")
GROUPED_TYPES = ("gqa", "focused_gqa")
SINGLE_KV_TYPES = ("mqa", "focused_mqa")
_FOCUSED_TYPES = ("focused", "focused_gqa", "focused_mqa")
_DEFAULT_DWCONV_KERNEL = {"mediated": 3, "focused": 5, "focused_gqa": 5, "focused_mqa": 5}


def resolve_num_kv_heads(attention_type: str, num_heads: int, num_kv_heads: int | None) -> int:
    """Number of K/V heads for an attention type; ``None`` picks groups of two query heads for grouped types."""
    if attention_type in SINGLE_KV_TYPES:
        if num_kv_heads not in (None, 1):
            raise DiTOptimumError(
                f"`num_kv_heads` must be None or 1 for attention_type={attention_type!r}, got {num_kv_heads}."
            )
        return 1
    if attention_type in GROUPED_TYPES:
        if num_kv_heads is None:
            group = next(g for g in range(2, num_heads + 1) if num_heads % g == 0) if num_heads > 1 else 1
            return num_heads // group
        allowed = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        if num_kv_heads not in allowed:
            raise DiTOptimumError(
                f"`num_kv_heads`={num_kv_heads} must divide num_attention_heads={num_heads} for "
                f"attention_type={attention_type!r}; allowed values: {allowed}."
            )
        return num_kv_heads
    if num_kv_heads not in (None, num_heads):
        raise DiTOptimumError(
            f"`num_kv_heads` is only used by {GROUPED_TYPES + SINGLE_KV_TYPES}; "
            f"for attention_type={attention_type!r} "
            f"it must be None or {num_heads}, got {num_kv_heads}."
        )
    return num_heads


def validate_attention_config(
    attention_type: str,
    num_heads: int,
    head_dim: int,
    grid_size: int,
    num_kv_heads: int | None,
    attention_compression: int,
    num_mediators: int,
    focusing_factor: float,
    dwconv_kernel_size: int | None,
    focused_variant: str,
) -> None:
    """Raise ``ValueError`` naming the parameter and its allowed values for any invalid combination."""
    if attention_type not in ATTENTION_TYPES:
        raise DiTOptimumError(
            f"Unknown `attention_type`={attention_type!r}; allowed values: {', '.join(ATTENTION_TYPES)}."
        )
    resolve_num_kv_heads(attention_type, num_heads, num_kv_heads)
    if attention_type == "shallow":
        divisors = [c for c in range(1, head_dim + 1) if head_dim % c == 0]
        if not isinstance(attention_compression, int) or attention_compression not in divisors[1:]:
            raise DiTOptimumError(
                f"`attention_compression`={attention_compression!r} must be an integer > 1 dividing "
                f"attention_head_dim={head_dim}; allowed values: {divisors[1:]}."
            )
    if attention_type == "mediated":
        side = math.isqrt(num_mediators) if isinstance(num_mediators, int) and num_mediators > 0 else 0
        if side * side != num_mediators or side > grid_size:
            allowed = [s * s for s in range(1, grid_size + 1)]
            raise DiTOptimumError(
                f"`num_mediators`={num_mediators!r} must be a square number whose side fits "
                f"the {grid_size}x{grid_size} "
                f"token grid (mediators are pooled over the grid); allowed values: {allowed}."
            )
    if attention_type in _FOCUSED_TYPES:
        if not focusing_factor >= 1:
            raise DiTOptimumError(f"`focusing_factor`={focusing_factor!r} must be a number >= 1 (the paper uses 3).")
        if focused_variant not in FOCUSED_VARIANTS:
            raise DiTOptimumError(
                f"Unknown `focused_variant`={focused_variant!r}; allowed values: {', '.join(FOCUSED_VARIANTS)}."
            )
    if dwconv_kernel_size is not None and (
        not isinstance(dwconv_kernel_size, int) or dwconv_kernel_size < 1 or dwconv_kernel_size % 2 == 0
    ):
        raise DiTOptimumError(
            f"`dwconv_kernel_size`={dwconv_kernel_size!r} must be None or an odd positive integer (1, 3, 5, ...)."
        )


class DepthwiseConv2d(nn.Module):
    """Depthwise k x k convolution over the token grid: the local term added to linear/mediated attention."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        # tokens: (B, N, C) with N = h * w -> (B, N, C)
        batch, _, channels = tokens.shape
        height, width = grid_size
        grid = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.conv(grid).flatten(2).transpose(1, 2)


def _split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, N, heads * d) -> (B, heads, N, d)
    batch, length, _ = tokens.shape
    return tokens.view(batch, length, heads, -1).transpose(1, 2)


def _merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    # (B, heads, N, d) -> (B, N, heads * d)
    batch, heads, length, dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, length, heads * dim)


def _repeat_kv(tokens: torch.Tensor, groups: int) -> torch.Tensor:
    # (B, kv_heads, N, d) -> (B, kv_heads * groups, N, d); query head h uses K/V head h // groups.
    return tokens if groups == 1 else tokens.repeat_interleave(groups, dim=1)


class SDPAAttnProcessor:
    """Softmax attention through ``F.scaled_dot_product_attention``; covers sdpa, gqa, mqa and shallow.

    GQA/MQA and shallow attention differ from the baseline only in projection shapes, which the module owns.
    """

    def __call__(self, attn: DiTAttention, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        key = _split_heads(attn.to_k(hidden_states), attn.kv_heads)
        value = _split_heads(attn.to_v(hidden_states), attn.kv_heads)
        if attn.kv_heads != attn.heads:
            out = F.scaled_dot_product_attention(query, key, value, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = _merge_heads(out).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class MediatedAttnProcessor:
    """Attention through ``m`` mediator tokens T pooled from Q over the grid, plus a depthwise conv on V.

    ``V_m = softmax(T K^T s) V``; ``O = softmax(Q T^T s) V_m + DWConv(V)``: O(N m d) instead of O(N^2 d).
    """

    def __call__(self, attn: DiTAttention, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        batch = hidden_states.shape[0]
        height, width = grid_size
        side = math.isqrt(attn.num_mediators)
        query = _split_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
        value_tokens = attn.to_v(hidden_states)
        key = _repeat_kv(_split_heads(attn.to_k(hidden_states), attn.kv_heads), attn.heads // attn.kv_heads)
        value = _repeat_kv(_split_heads(value_tokens, attn.kv_heads), attn.heads // attn.kv_heads)
        head_dim = query.shape[-1]
        # Mediators: average-pool Q over the 2-D grid to side x side tokens -> (B, H, m, d).
        grid_query = query.reshape(batch * attn.heads, height, width, head_dim).permute(0, 3, 1, 2)
        mediators = F.adaptive_avg_pool2d(grid_query, (side, side)).flatten(2).transpose(1, 2)
        mediators = mediators.reshape(batch, attn.heads, side * side, head_dim)
        mediated_values = F.scaled_dot_product_attention(mediators, key, value)  # (B, H, m, d)
        out = F.scaled_dot_product_attention(query, mediators, mediated_values)  # (B, H, N, d)
        local = attn.dwconv(value_tokens, grid_size)  # (B, N, kv_heads * d)
        out = _merge_heads(out) + _merge_heads(
            _repeat_kv(_split_heads(local, attn.kv_heads), attn.heads // attn.kv_heads)
        )
        return attn.to_out[1](attn.to_out[0](out.to(query.dtype)))


def focus(features: torch.Tensor, power: float, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """FLatten's focusing function ``||x|| / ||x^p|| * x^p`` on non-negative features, norms over ``dims``."""
    powered = features**power
    norm = features.norm(dim=dims, keepdim=True)
    return powered * (norm / powered.norm(dim=dims, keepdim=True))


class FocusedLinearAttnProcessor:
    """Focused linear attention: ``phi = ReLU`` then focusing, ``Q (K^T V)`` order, plus a depthwise conv on V.

    ``variant="published"`` (default) is FLatten's form: per-token focusing norms and the normaliser
    ``1 / (Q mean(K)^T)``. ``variant="paper"`` reproduces the benchmark study's code: focusing norms over each
    sample's whole map (Frobenius) and no normaliser.
    """

    eps = 1e-6

    def __init__(self, variant: str = "published"):
        if variant not in FOCUSED_VARIANTS:
            raise DiTOptimumError(f"Unknown `variant`={variant!r}; allowed values: {', '.join(FOCUSED_VARIANTS)}.")
        self.variant = variant

    def __call__(self, attn: DiTAttention, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        groups = attn.heads // attn.kv_heads
        value_tokens = attn.to_v(hidden_states)
        # Focus over all channels of a token (FLatten), or over the whole (N, C) map in the paper's variant.
        dims = (-1,) if self.variant == "published" else (1, 2)
        query = focus(F.relu(attn.to_q(hidden_states)) + self.eps, attn.focusing_factor, dims)
        key = focus(F.relu(attn.to_k(hidden_states)) + self.eps, attn.focusing_factor, dims)
        query = _split_heads(query, attn.heads)  # (B, H, N, d)
        key = _split_heads(key, attn.kv_heads)  # (B, Hkv, N, d)
        value = _split_heads(value_tokens, attn.kv_heads)
        head_dim = query.shape[-1]
        # Query heads sharing a K/V head are consecutive: fold them into the token axis -> (B, Hkv, g * N, d).
        grouped_query = query.reshape(batch, attn.kv_heads, groups * length, head_dim)
        key_value = key.transpose(-2, -1) @ (value / length)  # (B, Hkv, d, d)
        out = grouped_query @ key_value
        if self.variant == "published":
            key_mean = key.mean(dim=-2, keepdim=True)  # (B, Hkv, 1, d)
            out = out / (grouped_query @ key_mean.transpose(-2, -1) + self.eps)
        out = out.reshape(batch, attn.heads, length, head_dim)
        local = attn.dwconv(value_tokens, grid_size)
        out = _merge_heads(out) + _merge_heads(_repeat_kv(_split_heads(local, attn.kv_heads), groups))
        return attn.to_out[1](attn.to_out[0](out.to(hidden_states.dtype)))


def default_processor(attention_type: str, focused_variant: str = "published"):
    """The processor that implements ``attention_type``."""
    if attention_type == "mediated":
        return MediatedAttnProcessor()
    if attention_type in _FOCUSED_TYPES:
        return FocusedLinearAttnProcessor(focused_variant)
    return SDPAAttnProcessor()


class DiTAttention(nn.Module):
    """Self-attention weights of one DiT block; keys match diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        attention_type: str = "sdpa",
        num_kv_heads: int | None = None,
        attention_compression: int = 2,
        num_mediators: int = 4,
        focusing_factor: float = 3.0,
        dwconv_kernel_size: int | None = None,
        focused_variant: str = "published",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.attention_type = attention_type
        self.heads = heads
        self.kv_heads = resolve_num_kv_heads(attention_type, heads, num_kv_heads)
        self.num_mediators = num_mediators
        self.focusing_factor = focusing_factor
        inner_head_dim = head_dim // attention_compression if attention_type == "shallow" else head_dim
        inner_dim, kv_dim = heads * inner_head_dim, self.kv_heads * inner_head_dim
        self.to_q = nn.Linear(dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(dim, kv_dim, bias=bias)
        self.to_v = nn.Linear(dim, kv_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim, bias=True), nn.Dropout(dropout)])
        if attention_type in _DEFAULT_DWCONV_KERNEL:
            self.dwconv = DepthwiseConv2d(kv_dim, dwconv_kernel_size or _DEFAULT_DWCONV_KERNEL[attention_type])
        self.processor = default_processor(attention_type, focused_variant)

    def set_processor(self, processor) -> None:
        """Swap the callable that computes attention (weights stay)."""
        self.processor = processor

    def get_processor(self):
        return self.processor

    def forward(self, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        # hidden_states: (B, N, dim) with N = grid_size[0] * grid_size[1] -> (B, N, dim)
        return self.processor(self, hidden_states, grid_size)
