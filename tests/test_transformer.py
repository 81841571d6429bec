"""DiTOptimumTransformer2DModel against stock diffusers, and its conditioning/loading behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DiTTransformer2DModel

from conftest import model_inputs, stock_model, tiny_model
from dit_optimum import DiTOptimumError, DiTOptimumTransformer2DModel


@pytest.mark.parametrize("patch_size", [2, 4])
def test_outputs_equal_stock_diffusers_loaded_from_its_folder(tmp_path, patch_size):
    stock = stock_model(patch_size=patch_size)
    stock.save_pretrained(tmp_path)
    ours = DiTOptimumTransformer2DModel.from_pretrained(tmp_path).eval()
    sample, timestep, labels = model_inputs(ours)
    labels[-1] = 10  # the null class too
    with torch.no_grad():
        torch.testing.assert_close(
            ours(sample, timestep, labels).sample, stock(sample, timestep, labels).sample, rtol=1e-6, atol=1e-6
        )
    # one shared embedding instead of one per block: fewer parameters than stock
    assert sum(p.numel() for p in ours.parameters()) < sum(p.numel() for p in stock.parameters())
    assert isinstance(ours, DiTTransformer2DModel)


def test_stock_checkpoint_with_differing_block_embedders_is_refused_not_approximated(tmp_path):
    # trained with diffusers' own class, each block's embedder is its own: the shared embedding cannot hold it
    stock = stock_model()
    with torch.no_grad():
        stock.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    stock.save_pretrained(tmp_path)
    with pytest.raises(DiTOptimumError, match=r"per-block timestep/class embedders differ \(class_embedder"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path)


def test_save_and_load_round_trip_keeps_config_and_outputs(tmp_path):
    model = tiny_model(attention_type="focused_gqa", num_kv_heads=2, focused_variant="paper")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.attention_type == "focused_gqa" and loaded.config.focused_variant == "paper"
    inputs = model_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).sample, model(*inputs).sample)


def test_original_timestep_embedding_uses_the_original_sinusoid():
    model = tiny_model(original_timestep_embedding=True)
    t = torch.tensor([0, 17, 999])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(model.conditioning_embedding.time_proj(t), expected)
    assert not torch.allclose(tiny_model().conditioning_embedding.time_proj(t), expected)


def test_diffusers_null_class_maps_to_the_model_null_class():
    model = tiny_model()
    sample, timestep, _ = model_inputs(model)
    with torch.no_grad():
        stock_null = model(sample, timestep, torch.full((3,), 1000)).sample
        own_null = model(sample, timestep, torch.full((3,), 10)).sample
    assert torch.equal(stock_null, own_null)


def test_scalar_timestep_broadcasts_and_gradient_checkpointing_matches():
    model = tiny_model()
    sample, _, labels = model_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(sample, 500, labels).sample, model(sample, torch.full((3,), 500), labels).sample
        )
    model.train()
    model.conditioning_embedding.class_embedder.dropout_prob = 0.0
    plain = model(sample, torch.full((3,), 500), labels).sample
    model.enable_gradient_checkpointing()
    checkpointed = model(sample, torch.full((3,), 500), labels).sample
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    assert model.pos_embed.proj.weight.grad is not None


def test_non_square_inputs_are_supported():
    model = tiny_model(attention_type="mediated")
    sample = torch.randn(2, 4, 8, 16)
    with torch.no_grad():
        out = model(sample, torch.tensor([3, 4]), torch.tensor([0, 1])).sample
    assert out.shape == (2, 8, 8, 16)


def test_from_preset_builds_paper_sizes():
    model = DiTOptimumTransformer2DModel.from_preset("DiT-XS/4", sample_size=16, num_classes=10, in_channels=1)
    config = model.config
    assert (config.num_layers, model.inner_dim, config.num_attention_heads, config.patch_size) == (6, 256, 4, 4)
    assert (config.out_channels, config.num_embeds_ada_norm) == (2, 10)


def test_regional_compile_of_the_repeated_block_matches_eager():
    """diffusers' `compile_repeated_blocks` finds the DiT block through `_repeated_blocks` and compiles it."""
    model = tiny_model()
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        eager = model(sample, timestep, labels).sample
        model.compile_repeated_blocks(fullgraph=False)
        assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
        compiled = model(sample, timestep, labels).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
