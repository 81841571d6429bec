"""Conversion from original DiT checkpoints and stock diffusers folders: numerical equality is the acceptance."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline

from conftest import stock_model, tiny_autoencoder
from dit_optimum import DiTOptimumPipeline
from dit_optimum.cli import main
from dit_optimum.conversion import convert_diffusers_pipeline, convert_original_state_dict, model_from_original
from original_dit import random_original_dit


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def reference_inputs(in_channels=4, side=8, batch=3):
    generator = torch.Generator().manual_seed(7)
    return (
        torch.randn(batch, in_channels, side, side, generator=generator),
        torch.tensor([0, 431, 999])[:batch],
        torch.tensor([1, 9, 10])[:batch],
    )


@pytest.mark.parametrize("patch_size", [2, 4])
def test_converted_original_model_matches_the_original(patch_size):
    original = random_original_dit(patch_size=patch_size, input_size=16)
    model = model_from_original(original.state_dict(), num_heads=4)
    assert model.config.patch_size == patch_size and model.config.sample_size == 16
    assert model.config.num_embeds_ada_norm == 10 and model.config.out_channels == 8
    x, t, y = reference_inputs(side=16)
    with torch.no_grad():
        assert relative_error(model(x, t, y).sample, original(x, t, y)) < 1e-4


def test_the_stock_timestep_embedding_would_not_match():
    original = random_original_dit()
    model = model_from_original(original.state_dict(), num_heads=4)
    model.conditioning_embedding.time_proj.downscale_freq_shift = 1  # diffusers' formula
    x, t, y = reference_inputs()
    with torch.no_grad():
        assert relative_error(model(x, t, y).sample, original(x, t, y)) > 1e-3


def test_key_mapping_splits_qkv_and_drops_pos_embed():
    state = random_original_dit().state_dict()
    converted = convert_original_state_dict(state)
    assert "pos_embed" not in converted
    q = converted["transformer_blocks.1.attn1.to_q.weight"]
    torch.testing.assert_close(q, state["blocks.1.attn.qkv.weight"][:32])
    torch.testing.assert_close(converted["transformer_blocks.1.attn1.to_v.bias"], state["blocks.1.attn.qkv.bias"][64:])
    with pytest.raises(ValueError, match="Unexpected key"):
        convert_original_state_dict({**state, "blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        model_from_original({"pos_embed": state["pos_embed"]})
    with pytest.raises(ValueError, match="model_name"):
        model_from_original(state, model_name="DiT-S/2")


def test_cli_converts_a_training_checkpoint_to_a_loadable_pixel_pipeline(tmp_path):
    original = random_original_dit(in_channels=3, patch_size=4)
    checkpoint = {
        "model": {k: torch.zeros_like(v) for k, v in original.state_dict().items()},
        "ema": original.state_dict(),
        "args": argparse.Namespace(model="DiT-XS/4"),
    }
    torch.save(checkpoint, tmp_path / "0001000.pt")
    (tmp_path / "labels.json").write_text('{"0": "zero", "9": "nine"}')
    code = main(
        [
            "convert",
            "original",
            str(tmp_path / "0001000.pt"),
            str(tmp_path / "out"),
            "--id2label",
            str(tmp_path / "labels.json"),
            "--num-heads",
            "4",
        ]
    )
    assert code == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.labels == {"nine": 9, "zero": 0}
    x, t, y = reference_inputs(in_channels=3)
    with torch.no_grad():
        assert relative_error(pipe.transformer(x, t, y).sample, original(x, t, y)) < 1e-4
    images = pipe(
        [0, 9], num_inference_steps=3, guidance_scale=2.0, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 8, 8, 3)


def test_latent_checkpoint_without_vae_is_refused(tmp_path):
    torch.save(random_original_dit().state_dict(), tmp_path / "ckpt.pt")
    assert main(["convert", "original", str(tmp_path / "ckpt.pt"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert main(["convert", "original", str(tmp_path / "ckpt.pt"), str(tmp_path / "t"), "--transformer-only"]) == 0
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors").is_file()


def test_stock_diffusers_pipeline_converts_and_gives_the_same_images(tmp_path):
    transformer = stock_model(in_channels=3, out_channels=6, num_embeds_ada_norm=1000)
    stock = DiTPipeline(
        transformer=transformer, vae=_identity_like_vae(), scheduler=DDIMScheduler(), id2label={"3": "three"}
    )
    stock.register_to_config(id2label={"3": "three"})
    stock.save_pretrained(tmp_path / "stock")
    convert_diffusers_pipeline(tmp_path / "stock", tmp_path / "ours")
    ours = DiTOptimumPipeline.from_pretrained(tmp_path / "ours")
    assert ours.labels == {"three": 3}
    kwargs = {"num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "np"}
    expected = stock([3, 7], generator=torch.manual_seed(1), **kwargs).images
    np.testing.assert_allclose(ours([3, 7], generator=torch.manual_seed(1), **kwargs).images, expected, atol=1e-6)


def _identity_like_vae():
    return tiny_autoencoder(channels=3, levels=1, seed=1, latent_channels=3)
