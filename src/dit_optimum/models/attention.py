"""Self-attention for DiT blocks: one diffusers attention module holding the weights, small processors the maths.

Attention types (DESIGN.md section 3), one row each in ``ATTENTION_SPECS``:

- ``sdpa``: multi-head softmax attention (same maths as diffusers ``AttnProcessor2_0``).
- ``gqa`` / ``mqa``: ``num_kv_heads`` K/V heads shared by groups of query heads (``mqa``: one K/V head).
- ``shallow``: q/k/v projected to ``dim / attention_compression``, output projected back to ``dim``.
- ``mediated``: ``m`` mediator tokens pooled from Q over the token grid; cost O(N m d) (Pu et al. 2024).
- ``focused``, ``focused_gqa``, ``focused_mqa``: focused linear attention (FLatten, Han et al. 2023),
  with full, grouped or a single K/V head.

``DiTAttention`` is a diffusers ``AttentionModuleMixin``: ``set_processor``, ``fuse_projections`` and
``set_attention_backend`` work as on diffusers' own attention modules. Processors whose kernel is softmax attention
call diffusers' ``dispatch_attention_fn``, so the backend chosen with ``set_attention_backend`` runs them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn
from torch import nn

from ..errors import DiTOptimumError

FOCUSED_VARIANTS: tuple[str, ...] = ("published", "paper")
# Focusing factors allowed (the paper uses 3). FLatten's own formula, ``x**p / ||x**p||``, leaves float32 at p >= 4
# (an all-ReLU-zero token: (1e-6)**p squared underflows to 0, giving 0/0) and from p ~ 10 at moderate features
# (x**p squared overflows once x > 1.8e19**(1/p): 80 at p = 10; the forward of tiny models turned NaN from p = 40).
# ``focus`` below rescales before the power, so it stays finite for any p; beyond 10 the focusing is an arg-max.
MIN_FOCUSING_FACTOR, MAX_FOCUSING_FACTOR = 1.0, 10.0
KV_LAYOUTS: tuple[str, ...] = ("full", "grouped", "single")


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


def _repeat_kv(tokens: torch.Tensor, groups: int, dim: int = 1) -> torch.Tensor:
    # heads along `dim`: kv_heads -> kv_heads * groups; query head h uses K/V head h // groups.
    return tokens if groups == 1 else tokens.repeat_interleave(groups, dim=dim)


def project_qkv(attn: DiTAttention, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, inner), (B, N, kv), (B, N, kv): one GEMM when the projections are fused, else three."""
    if attn.fused_projections:
        kv_dim = attn.to_k.out_features
        return attn.to_qkv(hidden_states).split([attn.to_q.out_features, kv_dim, kv_dim], dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def dispatched_attention(processor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, N, H, d) tensors through diffusers' ``dispatch_attention_fn`` (the processor's
    backend, else the active one); K/V with fewer heads are repeated for backends without grouped-query support."""
    groups = query.shape[2] // key.shape[2]
    grouped = False
    if groups > 1:  # only grouped K/V need to know the backend (the common case skips the lookup)
        backend = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
        grouped = "enable_gqa" in _AttentionBackendRegistry._supported_arg_names.get(backend, ())
        if not grouped:
            key, value = _repeat_kv(key, groups, dim=2), _repeat_kv(value, groups, dim=2)
    return dispatch_attention_fn(
        query,
        key,
        value,
        enable_gqa=grouped,
        backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )


class DispatchingProcessor:
    """Base of processors: the backend and parallel config diffusers' ``set_attention_backend`` sets."""

    _attention_backend = None
    _parallel_config = None

    @classmethod
    def from_attention_config(cls, config: AttentionConfig) -> DispatchingProcessor:
        """The processor for a validated attention config (its options come from there)."""
        return cls()


class SDPAAttnProcessor(DispatchingProcessor):
    """Softmax attention through ``dispatch_attention_fn``; covers sdpa, gqa, mqa and shallow.

    GQA/MQA and shallow attention differ from the baseline only in projection shapes, which the module owns.
    """

    def __call__(self, attn: DiTAttention, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        query, key, value = project_qkv(attn, hidden_states)
        batch, length, _ = hidden_states.shape
        query = query.view(batch, length, attn.heads, -1)  # (B, N, H, d): diffusers' dispatch layout
        key = key.view(batch, length, attn.kv_heads, -1)
        value = value.view(batch, length, attn.kv_heads, -1)
        out = dispatched_attention(self, query, key, value).flatten(2).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class MediatedAttnProcessor(DispatchingProcessor):
    """Attention through ``m`` mediator tokens T pooled from Q over the grid, plus a depthwise conv on V.

    ``V_m = softmax(T K^T s) V``; ``O = softmax(Q T^T s) V_m + DWConv(V)``: O(N m d) instead of O(N^2 d). Both
    softmax attentions go through ``dispatch_attention_fn``.
    """

    def __call__(self, attn: DiTAttention, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        height, width = grid_size
        side = math.isqrt(attn.num_mediators)
        groups = attn.heads // attn.kv_heads
        query_tokens, key_tokens, value_tokens = project_qkv(attn, hidden_states)
        query = query_tokens.view(batch, length, attn.heads, -1)  # (B, N, H, d)
        key = _repeat_kv(key_tokens.view(batch, length, attn.kv_heads, -1), groups, dim=2)
        value = _repeat_kv(value_tokens.view(batch, length, attn.kv_heads, -1), groups, dim=2)
        head_dim = query.shape[-1]
        # Mediators: average-pool Q over the 2-D grid to side x side tokens -> (B, m, H, d).
        grid_query = query.permute(0, 2, 3, 1).reshape(batch * attn.heads, head_dim, height, width)
        mediators = F.adaptive_avg_pool2d(grid_query, (side, side)).reshape(batch, attn.heads, head_dim, side * side)
        mediators = mediators.permute(0, 3, 1, 2)
        mediated_values = dispatched_attention(self, mediators, key, value)  # (B, m, H, d)
        out = dispatched_attention(self, query, mediators, mediated_values)  # (B, N, H, d)
        local = _repeat_kv(attn.dwconv(value_tokens, grid_size).view(batch, length, attn.kv_heads, -1), groups, 2)
        out = (out + local).flatten(2)
        return attn.to_out[1](attn.to_out[0](out.to(query.dtype)))


def focus(features: torch.Tensor, power: float, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """FLatten's focusing function ``||x|| / ||x^p|| * x^p`` on positive features, norms over ``dims``.

    Computed on ``y = x / max(x)`` (``||x|| = m ||y||`` and ``y^p / ||y^p|| = x^p / ||x^p||``): the same value, but
    ``y^p`` lies in (0, 1] with a largest entry of 1, so neither the power nor the norms' squares overflow or vanish
    in float32 / float16 (``x^p`` directly turns NaN for large features or ``p``). The scale carries no gradient:
    the result does not depend on it."""
    scale = features.amax(dim=dims, keepdim=True).detach()
    unit = features / scale
    powered = unit**power
    norm = unit.norm(dim=dims, keepdim=True) * scale
    return powered * (norm / powered.norm(dim=dims, keepdim=True))


class FocusedLinearAttnProcessor(DispatchingProcessor):
    """Focused linear attention: ``phi = ReLU`` then focusing, ``Q (K^T V)`` order, plus a depthwise conv on V.

    ``variant="published"`` (default) is FLatten's form: per-token focusing norms and the normaliser
    ``1 / (Q mean(K)^T)``. ``variant="paper"`` reproduces the benchmark study's code: focusing norms over each
    sample's whole map (Frobenius) and no normaliser. Linear attention has no softmax kernel to dispatch: the
    attention backend does not change it.
    """

    eps = 1e-6

    def __init__(self, variant: str = "published"):
        if variant not in FOCUSED_VARIANTS:
            raise DiTOptimumError(f"Unknown `variant`={variant!r}; allowed values: {', '.join(FOCUSED_VARIANTS)}.")
        self.variant = variant

    @classmethod
    def from_attention_config(cls, config: AttentionConfig) -> FocusedLinearAttnProcessor:
        return cls(config.focused_variant)

    def __call__(self, attn: DiTAttention, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        groups = attn.heads // attn.kv_heads
        query_tokens, key_tokens, value_tokens = project_qkv(attn, hidden_states)
        # Focus over all channels of a token (FLatten), or over the whole (N, C) map in the paper's variant.
        dims = (-1,) if self.variant == "published" else (1, 2)
        query = focus(F.relu(query_tokens) + self.eps, attn.focusing_factor, dims)
        key = focus(F.relu(key_tokens) + self.eps, attn.focusing_factor, dims)
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


@dataclass(frozen=True)
class AttentionSpec:
    """One attention type: its processor, K/V layout (``KV_LAYOUTS``), default depthwise-conv kernel (None: no
    conv) and whether q/k/v are projected to a compressed width."""

    processor: type[DispatchingProcessor]
    kv_layout: str = "full"
    dwconv_kernel: int | None = None
    compressed: bool = False


ATTENTION_SPECS: dict[str, AttentionSpec] = {
    "sdpa": AttentionSpec(SDPAAttnProcessor),
    "gqa": AttentionSpec(SDPAAttnProcessor, "grouped"),
    "mqa": AttentionSpec(SDPAAttnProcessor, "single"),
    "shallow": AttentionSpec(SDPAAttnProcessor, compressed=True),
    "mediated": AttentionSpec(MediatedAttnProcessor, dwconv_kernel=3),
    "focused": AttentionSpec(FocusedLinearAttnProcessor, dwconv_kernel=5),
    "focused_gqa": AttentionSpec(FocusedLinearAttnProcessor, "grouped", dwconv_kernel=5),
    "focused_mqa": AttentionSpec(FocusedLinearAttnProcessor, "single", dwconv_kernel=5),
}
ATTENTION_TYPES: tuple[str, ...] = tuple(ATTENTION_SPECS)
GROUPED_TYPES = tuple(name for name, spec in ATTENTION_SPECS.items() if spec.kv_layout == "grouped")
SINGLE_KV_TYPES = tuple(name for name, spec in ATTENTION_SPECS.items() if spec.kv_layout == "single")
_FOCUSED_TYPES = tuple(name for name, spec in ATTENTION_SPECS.items() if spec.processor is FocusedLinearAttnProcessor)


def resolve_num_kv_heads(attention_type: str, num_heads: int, num_kv_heads: int | None) -> int:
    """Number of K/V heads for an attention type; ``None`` picks groups of two query heads for grouped types."""
    layout = ATTENTION_SPECS[attention_type].kv_layout
    if layout == "single":
        if num_kv_heads not in (None, 1):
            raise DiTOptimumError(
                f"`num_kv_heads` must be None or 1 for attention_type={attention_type!r}, got {num_kv_heads}."
            )
        return 1
    if layout == "grouped":
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


def _shown(value: object, limit: int = 80) -> str:
    # repr for messages: never fails (a 5000-digit integer's repr raises), never floods (a long list is cut)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"<a {int(value).bit_length()}-bit integer>"
    if type(value) in (list, tuple) and len(value) <= 1000:  # item by item: a huge integer inside is shown too
        items = [_shown(item, limit) for item in value[:8]] + (["..."] if len(value) > 8 else [])
        text = ", ".join(items) + ("," if type(value) is tuple and len(value) == 1 else "")
        return f"[{text}]" if type(value) is list else f"({text})"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 5] + " ...>"


def check_focusing_factor(value: object) -> float:
    """A finite ``focusing_factor`` in [1, 10] (the paper uses 3), else ``DiTOptimumError`` naming it."""
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        valid = valid and MIN_FOCUSING_FACTOR <= float(value) <= MAX_FOCUSING_FACTOR  # NaN compares False
    except OverflowError:  # an integer beyond any float
        valid = False
    if not valid:
        raise DiTOptimumError(
            f"`focusing_factor`={_shown(value)} must be a finite number in [{MIN_FOCUSING_FACTOR:g}, "
            f"{MAX_FOCUSING_FACTOR:g}] (the paper uses 3; larger powers make the focusing an arg-max over channels "
            "and overflow float32 in FLatten's formula)."
        )
    return float(value)


@dataclass(frozen=True)
class AttentionConfig:
    """The attention options of a model (its flat config keys of the same names), validated in one place."""

    attention_type: str = "sdpa"
    num_kv_heads: int | None = None
    attention_compression: int = 2
    num_mediators: int = 4
    focusing_factor: float = 3.0
    dwconv_kernel_size: int | None = None
    focused_variant: str = "published"

    @classmethod
    def from_model_config(cls, config) -> AttentionConfig:
        """The attention options of a model config (any object or mapping with the flat keys)."""
        get = config.get if isinstance(config, dict) else lambda name, default: getattr(config, name, default)
        return cls(**{field.name: get(field.name, field.default) for field in dataclasses.fields(cls)})

    @property
    def spec(self) -> AttentionSpec:
        return ATTENTION_SPECS[self.attention_type]

    def with_kv_heads(self, num_kv_heads: int | None) -> AttentionConfig:
        """The same options with another K/V head count (a pruned layer keeps its groups, not their number)."""
        return dataclasses.replace(self, num_kv_heads=num_kv_heads)

    def validate(self, num_heads: int, head_dim: int, grid_size: int) -> None:
        """Raise ``DiTOptimumError`` naming the parameter and its allowed values for any invalid combination."""
        attention_type = self.attention_type
        if not isinstance(attention_type, str) or attention_type not in ATTENTION_SPECS:  # a list is unhashable
            raise DiTOptimumError(
                f"Unknown `attention_type`={_shown(attention_type)}; allowed values: {', '.join(ATTENTION_TYPES)}."
            )
        resolve_num_kv_heads(attention_type, num_heads, self.num_kv_heads)
        if self.spec.compressed:
            divisors = [c for c in range(1, head_dim + 1) if head_dim % c == 0]
            compression = self.attention_compression
            if not isinstance(compression, int) or compression not in divisors[1:]:
                raise DiTOptimumError(
                    f"`attention_compression`={compression!r} must be an integer > 1 dividing "
                    f"attention_head_dim={head_dim}; allowed values: {divisors[1:]}."
                )
        if self.spec.processor is MediatedAttnProcessor:
            mediators = self.num_mediators
            side = math.isqrt(mediators) if isinstance(mediators, int) and mediators > 0 else 0
            if side * side != mediators or side > grid_size:
                squares = [s * s for s in range(1, min(grid_size, 6) + 1)]
                allowed = ", ".join(map(str, squares)) + (f", ..., {grid_size**2}" if grid_size > 6 else "")
                raise DiTOptimumError(
                    f"`num_mediators`={_shown(mediators)} must be a square number whose side fits "
                    f"the {grid_size}x{grid_size} "
                    f"token grid (mediators are pooled over the grid); allowed values: [{allowed}]."
                )
        if attention_type in _FOCUSED_TYPES:
            check_focusing_factor(self.focusing_factor)
            if not isinstance(self.focused_variant, str) or self.focused_variant not in FOCUSED_VARIANTS:
                raise DiTOptimumError(
                    f"Unknown `focused_variant`={_shown(self.focused_variant)}; "
                    f"allowed values: {', '.join(FOCUSED_VARIANTS)}."
                )
        kernel = self.dwconv_kernel_size
        if kernel is not None and (not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0):
            raise DiTOptimumError(
                f"`dwconv_kernel_size`={_shown(kernel)} must be None or an odd positive integer (1, 3, 5, ...)."
            )


class DiTAttention(nn.Module, AttentionModuleMixin):
    """Self-attention weights of one DiT block; keys match diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    ``heads`` and ``head_dim`` are this layer's (head pruning makes layers differ); everything else comes from
    ``config``.
    """

    _default_processor_cls = SDPAAttnProcessor
    _available_processors = [SDPAAttnProcessor, MediatedAttnProcessor, FocusedLinearAttnProcessor]

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        config: AttentionConfig | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        config = config or AttentionConfig()
        spec = config.spec
        self.attention_type = config.attention_type
        self.heads = heads
        self.kv_heads = resolve_num_kv_heads(config.attention_type, heads, config.num_kv_heads)
        self.num_mediators = config.num_mediators
        self.focusing_factor = config.focusing_factor
        self.use_bias = bias  # read by diffusers' fuse_projections
        inner_head_dim = head_dim // config.attention_compression if spec.compressed else head_dim
        inner_dim, kv_dim = heads * inner_head_dim, self.kv_heads * inner_head_dim
        self.to_q = nn.Linear(dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(dim, kv_dim, bias=bias)
        self.to_v = nn.Linear(dim, kv_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim, bias=True), nn.Dropout(dropout)])
        if spec.dwconv_kernel is not None:
            self.dwconv = DepthwiseConv2d(kv_dim, config.dwconv_kernel_size or spec.dwconv_kernel)
        self.set_processor(spec.processor.from_attention_config(config))

    def forward(self, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        # hidden_states: (B, N, dim) with N = grid_size[0] * grid_size[1] -> (B, N, dim)
        if hidden_states.shape[0] == 0:  # a batch of 0 samples attends to nothing: an empty output, as nn.Linear
            return hidden_states.new_zeros(*hidden_states.shape[:-1], self.to_out[0].out_features)
        return self.processor(self, hidden_states, grid_size)
