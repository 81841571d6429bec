"""Step caching through diffusers' cache hooks: the model is a CacheMixin, the pipeline sets a cache context per
step, a never-reusing cache equals the uncached pipeline, and reuse skips the later blocks' work (counted)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FirstBlockCacheConfig

from conftest import MODEL_KINDS, kind_id, tiny_pixel_pipeline


def sample_images(pipe, steps):
    generator = torch.manual_seed(0)
    return pipe([1, 2, 3], num_inference_steps=steps, guidance_scale=2.0, generator=generator, output_type="np").images


def attention_calls(pipe, block: int = -1) -> list:
    calls = []
    pipe.transformer.transformer_blocks[block].attn1.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("overrides", MODEL_KINDS, ids=kind_id)
def test_first_block_cache_on_every_kind(overrides):
    reference = sample_images(tiny_pixel_pipeline(**overrides), 6)
    never = tiny_pixel_pipeline(**overrides)
    never.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never reuses
    assert (sample_images(never, 6) == reference).all()
    cached = tiny_pixel_pipeline(**overrides)
    cached.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # reuses whenever it can
    tail, head = attention_calls(cached, -1), attention_calls(cached, 0)
    images = sample_images(cached, 6)
    assert len(head) == 6 and len(tail) == 1  # the first step computes everything, the others reuse
    assert images.shape == reference.shape and not (images == reference).all()
    cached.transformer.disable_cache()
    assert (sample_images(cached, 6) == reference).all()


def test_the_pipeline_sets_a_context_per_step_and_resets_between_calls():
    pipe = tiny_pixel_pipeline()
    seen = []
    original = pipe.transformer.cache_context

    def recording(name, **kwargs):
        seen.append((name, kwargs["step_index"], kwargs["num_inference_steps"], pipe.current_timestep))
        return original(name, **kwargs)

    pipe.transformer.cache_context = recording
    sample_images(pipe, 3)
    assert [entry[:3] for entry in seen] == [("cond_uncond", i, 3) for i in range(3)]
    assert [int(entry[3]) for entry in seen] == [int(t) for t in pipe.scheduler.timesteps]
    assert pipe.current_timestep is None
    cached = tiny_pixel_pipeline()
    cached.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    first, second = sample_images(cached, 4), sample_images(cached, 4)
    assert (first == second).all()  # the state of one call does not leak into the next


def test_the_benchmark_cell_measures_a_whole_forward():
    from dit_optimum.evaluation.efficiency import SpeedSettings, efficiency_metrics

    pipe = tiny_pixel_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    calls = attention_calls(pipe, -1)
    settings = SpeedSettings(batch_size=2, forward_batch_size=2, num_inference_steps=2, warmup=0, repeats=2)
    metrics = efficiency_metrics(pipe, settings)
    assert metrics["forward_images_per_s"] > 0
    # forward timing (2 repeats) computed every block every time; sampling and latency reused after step 1
    assert len(calls) >= 2
