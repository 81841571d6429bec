"""Shared helpers: tiny DiT configs that run in milliseconds on CPU, and a tiny released benchmark run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from diffusers import DiTTransformer2DModel  # noqa: E402

from dit_optimum import DiTOptimumTransformer2DModel  # noqa: E402

TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_embeds_ada_norm": 10,
}


def tiny_config(**overrides) -> dict:
    return {**TINY, **overrides}


def tiny_model(seed: int = 0, **overrides) -> DiTOptimumTransformer2DModel:
    """A tiny model with random (non-zero) weights everywhere, adaLN-Zero gates included."""
    torch.manual_seed(seed)
    model = DiTOptimumTransformer2DModel(**tiny_config(**overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def model_inputs(model, batch: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    timestep = torch.tensor([1, 500, 999, 250, 750, 10][:batch])
    labels = torch.arange(batch) % config.num_embeds_ada_norm
    return sample, timestep, labels


def stock_model(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """A stock diffusers DiT whose per-block embedder copies are equal, as in every real checkpoint."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
        state = model.state_dict()
        for key, tensor in state.items():
            if ".norm1.emb." in key:
                tensor.copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
    return model.eval()


class TinyFeatureExtractor(torch.nn.Module):
    """A stand-in for Inception with the same interface: 16x16 input, 8-d pooled and 12-d spatial features."""

    name = "tiny_test_extractor"
    weights_hash = "0" * 64
    input_size = 16
    feature_dims = {"pool": 8, "spatial": 12}

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=generator) * 0.5, requires_grad=False)

    @torch.no_grad()
    def forward(self, images):
        h = torch.relu(torch.nn.functional.conv2d(images / 255, self.weight, stride=2, padding=1))  # (B, 8, 8, 8)
        spatial = h[:, :3, ::4, ::4].permute(0, 2, 3, 1).reshape(len(h), -1)  # (B, 12)
        return {"pool": h.mean(dim=(2, 3)), "spatial": spatial}


def tiny_pixel_pipeline(seed: int = 0, channels: int = 1, **overrides):
    """A pixel-space pipeline around a tiny random model: 8x8 images, 10 classes."""
    from diffusers import DDIMScheduler

    from dit_optimum import DiTOptimumPipeline

    model = tiny_model(seed, in_channels=channels, out_channels=2 * channels, **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.25)  # keep samples in range
    pipeline = DiTOptimumPipeline(transformer=model, vae=None, scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tiny_autoencoder(channels: int = 1, levels: int = 2, seed: int = 0, latent_channels: int = 4, **overrides):
    """A tiny random AutoencoderKL in eval mode, seeded: ``levels`` blocks of 8 channels, each after the first
    halving the image side."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=latent_channels,
        block_out_channels=(8,) * levels,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **overrides,
    ).eval()


def tiny_vae(folder, channels: int = 1):
    """A tiny random AutoencoderKL saved to ``folder`` (for latent extraction and training tests)."""
    tiny_autoencoder(channels).save_pretrained(folder)
    return folder


# Every kind of model the tests run a feature on: each attention type (mediated with a square mediator count that
# fits the tiny grid) and MoE; `kind_id` names them in test ids.
MODEL_KINDS = [
    {"attention_type": "mediated", "num_mediators": 4} if kind == "mediated" else {"attention_type": kind}
    for kind in __import__("dit_optimum").ATTENTION_TYPES
] + [{"moe_num_experts": 4, "moe_top_k": 2}]


def kind_id(overrides: dict) -> str:
    return overrides.get("attention_type", "moe")


# --- a tiny finished benchmark run and its releases (tests of the Hub, the cards and the demo) ------------------

RELEASED_TECHNIQUES = (
    "baseline",
    "attention-mediated",
    "moe",
    "distill",
    "int8",
    "prune-heads-50",
    "cache-first-block-0.5",
)


@pytest.fixture(autouse=True)
def restore_active_backend():
    """diffusers' `set_attention_backend` also sets the process-wide active backend, which `reset_attention_backend`
    leaves as it is (a documented example calls it): put it back after every test, so that each runs on the default
    (another backend changes the last bits of every softmax attention)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory) -> Path:
    """A finished tiny benchmark run (trained models kept) with class accuracy and KID measured."""
    from dataclasses import replace

    from dit_optimum.benchmark import run_benchmark
    from dit_optimum.evaluation.domain import ClassifierRecipe, domain_classifier
    from dit_optimum.evaluation.reference import real_split
    from test_benchmark import tiny_settings

    folder = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIT_OPTIMUM_CACHE", str(folder / "cache"))
        settings = tiny_settings(folder / "results", RELEASED_TECHNIQUES)
        settings.quality = replace(settings.quality, metrics=("class_accuracy", "kid"))
        classifier = domain_classifier(real_split("digits", "train", 40, 20), 8, ClassifierRecipe(epochs=1))
        rows = run_benchmark(settings, inception=TinyFeatureExtractor(), classifier=classifier)
    assert [row["status"] for row in rows] == ["ok"] * len(RELEASED_TECHNIQUES), [row.get("error") for row in rows]
    return folder / "results"


@pytest.fixture(scope="session")
def released(results_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("release") / "out"
    from dit_optimum.hub import release

    release(results_dir, "org", folder)
    return folder
