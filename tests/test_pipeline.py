"""DiTOptimumPipeline: sampling, guidance for any class count, inputs, and round trips through diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline

from conftest import tiny_autoencoder, tiny_model
from dit_optimum import ATTENTION_TYPES, DiTOptimumPipeline, IdentityAutoencoder

ID2LABEL = {0: "zero, null-digit", 1: "one", 7: "seven"}


def make_pipeline(**overrides) -> DiTOptimumPipeline:
    transformer = tiny_model(**overrides)
    return DiTOptimumPipeline(transformer=transformer, vae=None, scheduler=DDIMScheduler(), id2label=ID2LABEL)


def sample(pipe, labels=(1, 7), seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_round_trip_through_plain_diffusion_pipeline_gives_the_same_images(tmp_path, attention_type):
    pipe = make_pipeline(attention_type=attention_type)
    before = sample(pipe, guidance_scale=3.0)
    pipe.save_pretrained(tmp_path / "pipe")
    files = {p.relative_to(tmp_path / "pipe").as_posix() for p in (tmp_path / "pipe").rglob("*") if p.is_file()}
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is DiTPipeline
    assert loaded.transformer.config.attention_type == attention_type
    np.testing.assert_array_equal(sample(loaded, guidance_scale=3.0), before)

    ours = DiTOptimumPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(ours, DiTOptimumPipeline) and isinstance(ours.vae, IdentityAutoencoder)
    np.testing.assert_array_equal(sample(ours, guidance_scale=3.0), before)


def test_id2label_is_saved_and_class_names_are_accepted(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["transformer"] == ["dit_optimum", "DiTOptimumTransformer2DModel"]
    assert index["id2label"] == {"0": "zero, null-digit", "1": "one", "7": "seven"}
    loaded = DiTOptimumPipeline.from_pretrained(tmp_path)
    assert loaded.labels == {"null-digit": 0, "one": 1, "seven": 7, "zero": 0}
    assert loaded.get_label_ids("seven") == [7]
    np.testing.assert_array_equal(sample(loaded, labels=("one", "seven")), sample(loaded, labels=(1, 7)))
    assert DiffusionPipeline.from_pretrained(tmp_path).labels == loaded.labels


def test_guidance_works_for_ten_classes_and_changes_the_result():
    pipe = make_pipeline()
    guided, unguided = sample(pipe, guidance_scale=4.0), sample(pipe, guidance_scale=1.0)
    assert guided.shape == unguided.shape == (2, 8, 8, 4)
    assert not np.allclose(guided, unguided)


def test_generator_seeding_is_reproducible():
    pipe = make_pipeline()
    np.testing.assert_array_equal(sample(pipe, seed=5), sample(pipe, seed=5))
    assert not np.allclose(sample(pipe, seed=5), sample(pipe, seed=6))


def test_output_types():
    pipe = make_pipeline(in_channels=3, out_channels=6)
    images = pipe([1, 2], num_inference_steps=2, output_type="pil").images
    assert len(images) == 2 and images[0].size == (8, 8) and images[0].mode == "RGB"
    tensor = sample(pipe, output_type="pt")
    assert tensor.shape == (2, 3, 8, 8) and tensor.min() >= 0 and tensor.max() <= 1
    latents = sample(pipe, output_type="latent")
    torch.testing.assert_close((latents / 2 + 0.5).clamp(0, 1), tensor)
    numpy = sample(pipe, output_type="np")
    np.testing.assert_allclose(numpy, tensor.permute(0, 2, 3, 1).numpy())


def test_latent_mode_with_a_vae_round_trips(tmp_path):
    vae = tiny_autoencoder(channels=3)
    pipe = DiTOptimumPipeline(transformer=tiny_model(), vae=vae, scheduler=DDIMScheduler())
    assert not pipe.is_pixel_space
    before = sample(pipe)
    assert before.shape == (2, 16, 16, 3)
    pipe.save_pretrained(tmp_path)
    np.testing.assert_array_equal(sample(DiffusionPipeline.from_pretrained(tmp_path)), before)


BAD_CALLS = [
    ({"class_labels": [10]}, r"class_labels.*0\.\.9"),
    ({"class_labels": [-1]}, "class_labels"),
    ({"class_labels": ["eight"]}, r"Unknown class name.*eight"),
    ({"class_labels": []}, "empty"),
    ({"class_labels": [1], "guidance_scale": 0.5}, "guidance_scale"),
    ({"class_labels": [1], "guidance_scale": float("nan")}, "guidance_scale"),
    ({"class_labels": [1], "num_inference_steps": 0}, r"num_inference_steps.*1\.\.1000"),
    ({"class_labels": [1], "num_inference_steps": 1001}, "num_inference_steps"),
    ({"class_labels": [1], "output_type": "jpeg"}, r"output_type.*pil, np, pt, latent"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CALLS, ids=[str(c[0]) for c in BAD_CALLS])
def test_bad_pipeline_inputs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pipeline()(**kwargs)


def test_guidance_without_a_null_class_is_refused_and_bad_id2label_too():
    pipe = make_pipeline(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        pipe([1], guidance_scale=2.0)
    assert sample(pipe, guidance_scale=1.0).shape == (2, 8, 8, 4)
    with pytest.raises(ValueError, match="id2label"):
        DiTOptimumPipeline(transformer=tiny_model(), id2label={12: "twelve"})
