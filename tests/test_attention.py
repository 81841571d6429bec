"""Attention processors against plain reference maths written here (explicit softmax, explicit pooling)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import model_inputs, tiny_config, tiny_model
from dit_optimum import ATTENTION_TYPES, DiTAttention, DiTOptimumTransformer2DModel
from dit_optimum.models.attention import AttentionConfig, SDPAAttnProcessor

GRID = (4, 4)


def make_attention(attention_type: str, seed: int = 0, **kwargs) -> DiTAttention:
    torch.manual_seed(seed)
    attn = DiTAttention(32, 4, 8, AttentionConfig(attention_type, **kwargs))
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.normal_(0, 0.3)
    return attn.eval()


def heads(x: torch.Tensor, count: int) -> list[torch.Tensor]:
    # (B, N, count * d) -> list of (B, N, d), one per head
    return list(x.chunk(count, dim=-1))


def softmax(scores: torch.Tensor) -> torch.Tensor:
    scores = scores - scores.max(dim=-1, keepdim=True).values
    weights = scores.exp()
    return weights / weights.sum(dim=-1, keepdim=True)


def dwconv(attn: DiTAttention, v: torch.Tensor) -> torch.Tensor:
    batch, _, channels = v.shape
    grid = v.transpose(1, 2).reshape(batch, channels, *GRID)
    conv = attn.dwconv.conv
    out = F.conv2d(grid, conv.weight, conv.bias, padding=conv.padding, groups=channels)
    return out.flatten(2).transpose(1, 2)


def reference_softmax(attn: DiTAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = heads(attn.to_q(x), attn.heads), heads(attn.to_k(x), attn.kv_heads), heads(attn.to_v(x), attn.kv_heads)
    group = attn.heads // attn.kv_heads
    outs = []
    for h in range(attn.heads):
        d = q[h].shape[-1]
        weights = softmax(q[h] @ k[h // group].transpose(1, 2) / math.sqrt(d))
        outs.append(weights @ v[h // group])
    return attn.to_out[0](torch.cat(outs, dim=-1))


def reference_mediated(attn: DiTAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v_all = heads(attn.to_q(x), attn.heads), heads(attn.to_k(x), attn.heads), attn.to_v(x)
    v = heads(v_all, attn.heads)
    side = math.isqrt(attn.num_mediators)
    cell = GRID[0] // side
    local = heads(dwconv(attn, v_all), attn.heads)
    outs = []
    for h in range(attn.heads):
        batch, _, d = q[h].shape
        # mediators: mean of Q over each cell x cell block of the grid, row-major
        grid = q[h].reshape(batch, side, cell, side, cell, d)
        mediators = grid.mean(dim=(2, 4)).reshape(batch, side * side, d)
        v_m = softmax(mediators @ k[h].transpose(1, 2) / math.sqrt(d)) @ v[h]
        outs.append(softmax(q[h] @ mediators.transpose(1, 2) / math.sqrt(d)) @ v_m + local[h])
    return attn.to_out[0](torch.cat(outs, dim=-1))


def reference_focused(attn: DiTAttention, x: torch.Tensor, variant: str = "published") -> torch.Tensor:
    eps, p = 1e-6, attn.focusing_factor
    q_all, k_all, v_all = torch.relu(attn.to_q(x)) + eps, torch.relu(attn.to_k(x)) + eps, attn.to_v(x)

    def focus_tokens(t):
        return t**p / (t**p).norm(dim=-1, keepdim=True) * t.norm(dim=-1, keepdim=True)

    def focus_map(t):  # Frobenius norms over each sample's whole map (all heads, tokens, channels)
        return t**p / (t**p).flatten(1).norm(dim=1)[:, None, None] * t.flatten(1).norm(dim=1)[:, None, None]

    focus_fn = focus_tokens if variant == "published" else focus_map
    q, k, v = heads(focus_fn(q_all), attn.heads), heads(focus_fn(k_all), attn.kv_heads), heads(v_all, attn.kv_heads)
    local = heads(dwconv(attn, v_all), attn.kv_heads)
    group = attn.heads // attn.kv_heads
    outs = []
    for h in range(attn.heads):
        kh, vh = k[h // group], v[h // group]
        n = kh.shape[1]
        numerator = q[h] @ (kh.transpose(1, 2) @ vh) / n
        if variant == "published":
            numerator = numerator / (q[h] @ kh.mean(dim=1, keepdim=True).transpose(1, 2) + eps)
        outs.append(numerator + local[h // group])
    return attn.to_out[0](torch.cat(outs, dim=-1))


CASES = [
    ("sdpa", {}, reference_softmax),
    ("gqa", {"num_kv_heads": 2}, reference_softmax),
    ("mqa", {}, reference_softmax),
    ("shallow", {"attention_compression": 2}, reference_softmax),
    ("mediated", {"num_mediators": 4}, reference_mediated),
    ("focused", {}, reference_focused),
    ("focused_gqa", {"num_kv_heads": 2}, reference_focused),
    ("focused_mqa", {}, reference_focused),
]


@pytest.mark.parametrize(("attention_type", "kwargs", "reference"), CASES, ids=[c[0] for c in CASES])
def test_processor_matches_reference(attention_type, kwargs, reference):
    attn = make_attention(attention_type, **kwargs)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = reference(attn, x), attn(x, GRID)
    assert actual.shape == (2, 16, 32)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["focused", "focused_gqa"])
def test_paper_variant_of_focused_attention_matches_reference(attention_type):
    kwargs = {"num_kv_heads": 2} if attention_type == "focused_gqa" else {}
    attn = make_attention(attention_type, focused_variant="paper", **kwargs)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, GRID), reference_focused(attn, x, "paper"), rtol=1e-4, atol=1e-5)
        published = make_attention(attention_type, **kwargs)
        assert not torch.allclose(attn(x, GRID), published(x, GRID))


def test_projection_shapes_follow_the_attention_type():
    assert make_attention("gqa", num_kv_heads=2).to_k.out_features == 16
    assert make_attention("mqa").to_v.out_features == 8
    shallow = make_attention("shallow", attention_compression=4)
    assert (shallow.to_q.out_features, shallow.to_out[0].out_features) == (8, 32)
    assert make_attention("mediated").dwconv.conv.kernel_size == (3, 3)
    assert make_attention("focused").dwconv.conv.kernel_size == (5, 5)
    assert make_attention("focused", dwconv_kernel_size=3).dwconv.conv.kernel_size == (3, 3)
    assert not hasattr(make_attention("sdpa"), "dwconv")


def test_gqa_default_groups_pairs_of_heads():
    model = DiTOptimumTransformer2DModel(**tiny_config(attention_type="gqa"))
    assert model.transformer_blocks[0].attn1.kv_heads == 2


@pytest.mark.parametrize("patch_size", [2, 4])
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_every_attention_type_runs_deterministically(attention_type, patch_size):
    model = tiny_model(attention_type=attention_type, patch_size=patch_size)
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        first = model(sample, timestep, labels).sample
        second = model(sample, timestep, labels).sample
    assert first.shape == (3, 8, 8, 8)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    # each sample depends only on itself: running one alone gives the same result
    with torch.no_grad():
        single = model(sample[1:2], timestep[1:2], labels[1:2]).sample
    torch.testing.assert_close(single, first[1:2], rtol=1e-4, atol=1e-5)


def test_set_attn_processor_swaps_the_maths_and_keeps_weights():
    model = tiny_model(attention_type="focused")
    assert len(model.attn_processors) == 2
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        before = model(sample, timestep, labels).sample
        model.set_attn_processor(SDPAAttnProcessor())
        after = model(sample, timestep, labels).sample
    assert all(isinstance(p, SDPAAttnProcessor) for p in model.attn_processors.values())
    assert not torch.allclose(before, after)
    with pytest.raises(ValueError, match="number of attention layers"):
        model.set_attn_processor({"transformer_blocks.0.attn1.processor": SDPAAttnProcessor()})
    wrong = {"transformer_blocks.0.attn1.processor": SDPAAttnProcessor(), "blocks.1.processor": SDPAAttnProcessor()}
    with pytest.raises(ValueError, match=r"Unknown attention processor keys \['blocks.1.processor'\]"):
        model.set_attn_processor(wrong)
    assert all(isinstance(p, SDPAAttnProcessor) for p in model.attn_processors.values())  # nothing half-set
    named = {name: SDPAAttnProcessor() for name in model.attn_processors}
    model.set_attn_processor(named)
    assert [id(p) for p in model.attn_processors.values()] == [id(p) for p in named.values()]


BAD_CONFIGS = [
    ({"attention_type": "flash"}, "attention_type"),
    ({"attention_type": "gqa", "num_kv_heads": 3}, r"num_kv_heads.*allowed values: \[1, 2, 4\]"),
    ({"attention_type": "mqa", "num_kv_heads": 2}, "num_kv_heads"),
    ({"attention_type": "sdpa", "num_kv_heads": 2}, "num_kv_heads"),
    ({"attention_type": "mediated", "num_mediators": 8}, r"num_mediators.*square"),
    ({"attention_type": "mediated", "num_mediators": 25}, "num_mediators"),
    ({"attention_type": "shallow", "attention_compression": 3}, "attention_compression"),
    ({"attention_type": "focused", "focusing_factor": 0.5}, "focusing_factor"),
    ({"attention_type": "focused", "focused_variant": "mine"}, "focused_variant"),
    ({"attention_type": "focused", "dwconv_kernel_size": 4}, "dwconv_kernel_size"),
    ({"sample_size": 9}, "sample_size"),
    ({"norm_type": "layer_norm"}, "norm_type"),
    ({"class_dropout_prob": 1.0}, "class_dropout_prob"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_configs_raise_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiTOptimumTransformer2DModel(**tiny_config(**overrides))


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_fused_qkv_projections_give_the_unfused_output(attention_type, tmp_path):
    model = tiny_model(attention_type=attention_type)
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        unfused = model(sample, timestep, labels).sample
        model.fuse_qkv_projections()
        attn = model.transformer_blocks[0].attn1
        assert attn.fused_projections
        assert attn.to_qkv.out_features == attn.to_q.out_features + 2 * attn.to_k.out_features
        fused = model(sample, timestep, labels).sample
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)  # one GEMM sums in another order
    with pytest.raises(ValueError, match=r"fused QKV projections.*unfuse_qkv_projections"):
        model.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    model.unfuse_qkv_projections()
    assert not hasattr(attn, "to_qkv") and not attn.fused_projections
    model.save_pretrained(tmp_path / "unfused")  # the plain layout saves again


def test_pruning_refuses_a_fused_model():
    from dit_optimum import prune

    model = tiny_model()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="Pruning a model with fused QKV projections"):
        prune(model, heads=0.5)


@pytest.mark.parametrize("attention_type", ["sdpa", "gqa", "mqa", "shallow", "mediated", "focused_gqa"])
def test_attention_backend_round_trip(attention_type, restore_active_backend):
    model = tiny_model(attention_type=attention_type)
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        native = model(sample, timestep, labels).sample
        model.set_attention_backend("_native_math")
        assert {p._attention_backend.value for p in model.attn_processors.values()} == {"_native_math"}
        math_backend = model(sample, timestep, labels).sample
        model.reset_attention_backend()
        assert {p._attention_backend for p in model.attn_processors.values()} == {None}
        again = model(sample, timestep, labels).sample
    torch.testing.assert_close(math_backend, native, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, math_backend)  # as in diffusers: the process-wide backend stays the last one set
    with pytest.raises(ValueError, match=r"Unknown attention `backend`=.no-such-backend.; allowed values: .*native"):
        model.set_attention_backend("no-such-backend")


def test_backend_is_used_by_dispatching_processors(monkeypatch, restore_active_backend):
    from diffusers.models import attention_dispatch

    calls = []
    original = attention_dispatch.dispatch_attention_fn

    def recording(*args, backend=None, **kwargs):
        calls.append(backend.value if backend is not None else None)
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr("dit_optimum.models.attention.dispatch_attention_fn", recording)
    model = tiny_model(attention_type="mediated")
    model.set_attention_backend("_native_math")
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        model(sample, timestep, labels)
    assert calls == ["_native_math"] * 2 * len(model.transformer_blocks)  # two softmax attentions per block


def test_attention_table_declares_every_type_once():
    from dit_optimum.models.attention import ATTENTION_SPECS, KV_LAYOUTS

    assert tuple(ATTENTION_SPECS) == ATTENTION_TYPES
    for name, spec in ATTENTION_SPECS.items():
        attn = make_attention(name)
        assert type(attn.processor) is spec.processor
        expected_kv = {"full": attn.heads, "single": 1, "grouped": attn.heads // 2}[spec.kv_layout]
        assert spec.kv_layout in KV_LAYOUTS and attn.kv_heads == expected_kv
        assert (getattr(attn, "dwconv", None) is not None) == (spec.dwconv_kernel is not None)
    with pytest.raises(ValueError, match=r"`num_mediators`=5 must be a square"):
        AttentionConfig("mediated", num_mediators=5).validate(num_heads=4, head_dim=8, grid_size=4)
