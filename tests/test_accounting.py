"""Presets, parameter counts and GFLOPs in the DiT paper's convention."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from dit_optimum import (
    DiTOptimumTransformer2DModel,
    count_gflops,
    count_parameters,
    dit_config,
    gflops_breakdown,
    preset_names,
)
from dit_optimum.evaluation import time_forward


def test_preset_names_and_parsing():
    names = preset_names()
    assert len(names) == 15 and "DiT-XS/2" in names and "DiT-XL/8" in names
    assert dit_config("DiT_S_4")["patch_size"] == 4
    assert dit_config("s/2", learn_sigma=False, in_channels=3)["out_channels"] == 3
    with pytest.raises(ValueError, match=r"`name`='DiT-M/2'.*DiT-XS/2"):
        dit_config("DiT-M/2")
    with pytest.raises(ValueError, match="DiT-S/16"):
        dit_config("DiT-S/16")


@pytest.mark.parametrize(("name", "expected"), [("DiT-S/2", 6.06), ("DiT-S/4", 1.41)])
def test_gflops_match_the_dit_paper(name, expected):
    model = DiTOptimumTransformer2DModel.from_preset(name)
    assert count_gflops(model) == pytest.approx(expected, rel=0.01)


def test_parameter_counts_of_presets():
    # DiT paper: S/2 33M; XS (fast-DiT) about 7.7M; shared conditioning embedding, no per-block copies.
    assert count_parameters(DiTOptimumTransformer2DModel.from_preset("DiT-S/2")) == pytest.approx(33.0e6, rel=0.01)
    xs = DiTOptimumTransformer2DModel.from_preset("DiT-XS/2")
    manual = sum(p.numel() for p in xs.parameters())
    assert count_parameters(xs) == manual
    assert 7e6 < manual < 8e6


def test_linear_attention_variants_cost_fewer_attention_flops_at_1024_tokens():
    costs = {
        name: gflops_breakdown(
            DiTOptimumTransformer2DModel.from_preset("DiT-XS/2", sample_size=64, attention_type=name)
        )
        for name in ("sdpa", "mediated", "focused", "focused_gqa", "focused_mqa")
    }
    for name in ("mediated", "focused", "focused_gqa", "focused_mqa"):
        assert costs[name]["attention_core"] < 0.25 * costs["sdpa"]["attention_core"], name
        assert costs[name]["total"] < costs["sdpa"]["total"], name


def test_every_custom_attention_matmul_is_counted():
    # sdpa core at N tokens, H heads, d head dim: 2 matmuls of N*N*d per head -> 2*N^2*H*d MACs per layer.
    model = tiny_model()
    tokens, width, layers = 16, 32, 2
    assert gflops_breakdown(model)["attention_core"] * 1e9 == pytest.approx(2 * tokens**2 * width * layers)
    # mediated, m mediators: 2 attention pairs of N*m*d, plus the depthwise 3x3 conv (9 MACs per channel/token)
    mediated = tiny_model(attention_type="mediated", num_mediators=4)
    expected = (2 * 2 * tokens * 4 * width + 9 * tokens * width) * layers
    assert gflops_breakdown(mediated)["attention_core"] * 1e9 == pytest.approx(expected)
    # focused: K^T V (N d^2 per head), Q (K^T V) (N d^2), normaliser Q mean(K) (N d), 5x5 depthwise conv
    focused = tiny_model(attention_type="focused")
    head_dim, heads = 8, 4
    per_layer = heads * (2 * tokens * head_dim**2 + tokens * head_dim) + 25 * tokens * width
    assert gflops_breakdown(focused)["attention_core"] * 1e9 == pytest.approx(per_layer * layers)


def test_counting_leaves_the_model_and_backend_untouched():
    model = tiny_model()
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([2]))
    with torch.no_grad():
        before = model(*inputs).sample
        gflops_breakdown(model)
        assert torch.equal(model(*inputs).sample, before)


def test_time_forward_measures_and_validates():
    model = tiny_model()
    assert time_forward(model, batch_size=2, warmup=0, repeats=2) > 0
    with pytest.raises(ValueError, match="repeats"):
        time_forward(model, repeats=0)


def test_peak_memory_sees_a_large_temporary_allocation():
    from dit_optimum.evaluation.memory import peak_memory_bytes

    def allocate():
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        return float(block.sum())

    assert peak_memory_bytes(allocate) > 32 * 1024 * 1024
    assert peak_memory_bytes(lambda: None) < 16 * 1024 * 1024


def test_sampled_peak_memory_fallback_sees_a_held_allocation():
    import time

    from dit_optimum.evaluation.memory import _sampled_peak_rss

    def allocate_and_hold():
        block = torch.ones(64 * 1024 * 1024 // 4)
        time.sleep(0.05)
        return float(block.sum())

    baseline, peak = _sampled_peak_rss(allocate_and_hold, 0.001)
    assert peak - baseline > 32 * 1024 * 1024
