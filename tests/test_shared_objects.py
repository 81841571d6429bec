"""Pipelines that share objects (a transformer, a scheduler) or are copied: concurrent calls and copies give the
images each pipeline gives alone, and a FasterCache refuses the unguided calls it cannot run."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from diffusers import DDIMScheduler

import dit_optimum as do
from conftest import tiny_pixel_pipeline
from dit_optimum import DiTOptimumError


def sample(pipe, labels=(1, 2), steps=4, guidance=1.0, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        list(labels), guidance_scale=guidance, num_inference_steps=steps, generator=generator, output_type="pt"
    ).images


def concurrently(calls, rounds: int = 4) -> list[list]:
    """Run each ``call`` in its own thread ``rounds`` times (started together); the outcomes (image or error)."""
    outcomes: list[list] = [[] for _ in calls]

    def run(barrier: threading.Barrier, index: int) -> None:
        barrier.wait()
        for _ in range(rounds):
            try:
                outcomes[index].append(calls[index]())
            except Exception as error:  # recorded: the test shows it, instead of a silent thread death
                outcomes[index].append(error)

    barrier = threading.Barrier(len(calls))
    threads = [threading.Thread(target=run, args=(barrier, i)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def assert_all_equal(outcomes: list, reference: torch.Tensor) -> None:
    for outcome in outcomes:
        assert isinstance(outcome, torch.Tensor), f"a concurrent call failed: {outcome!r}"
        assert torch.equal(outcome, reference)


@pytest.mark.parametrize("technique", ["prune", "quantize"])
def test_a_pruned_or_quantized_pipeline_has_its_own_scheduler(technique):
    pipe = tiny_pixel_pipeline()
    made = do.prune(pipe, heads=0.5) if technique == "prune" else do.quantize(pipe)
    assert made.scheduler is not pipe.scheduler
    assert made.scheduler.config == pipe.scheduler.config
    assert made.vae is pipe.vae


def test_the_original_and_its_pruned_pipeline_called_from_two_threads_give_their_own_images():
    pipe = tiny_pixel_pipeline()
    pruned = do.prune(pipe, heads=0.5)
    alone = [sample(pipe, steps=12), sample(pruned, steps=3)]
    outcomes = concurrently([lambda: sample(pipe, steps=12), lambda: sample(pruned, steps=3)])
    for index in range(2):
        assert_all_equal(outcomes[index], alone[index])


def test_pipelines_sharing_a_transformer_share_one_call_lock():
    pipe = tiny_pixel_pipeline()
    other = do.DiTOptimumPipeline(transformer=pipe.transformer, vae=None, scheduler=DDIMScheduler())
    assert other.call_lock is pipe.call_lock
    assert pipe.call_lock is pipe.call_lock  # made once
    assert tiny_pixel_pipeline().call_lock is not pipe.call_lock
    with pipe.call_lock, other.call_lock:  # re-entrant
        pass


@pytest.mark.parametrize("method", [None, "first-block", "taylorseer"])
def test_pipelines_sharing_a_transformer_called_from_two_threads_give_their_own_images(method):
    pipe = tiny_pixel_pipeline()
    other = do.DiTOptimumPipeline(transformer=pipe.transformer, vae=None, scheduler=DDIMScheduler())
    other.set_progress_bar_config(disable=True)
    if method:
        do.enable_step_cache(pipe, method)
    calls = [lambda: sample(pipe, labels=(1, 2), steps=12), lambda: sample(other, labels=(3, 4), steps=5)]
    alone = [call() for call in calls]
    outcomes = concurrently(calls)
    for index in range(2):
        assert_all_equal(outcomes[index], alone[index])


@pytest.mark.parametrize("labels", [(1,), (1, 2), (1, 2, 3)])
def test_faster_cache_refuses_unguided_calls_and_runs_guided_ones(labels):
    pipe = tiny_pixel_pipeline()
    uncached = sample(pipe, labels=labels, guidance=2.0)
    do.enable_step_cache(pipe, "faster")
    with pytest.raises(DiTOptimumError, match=r"FasterCache needs `guidance_scale` > 1"):
        sample(pipe, labels=labels, guidance=1.0)
    cached = sample(pipe, labels=labels, guidance=2.0)
    assert (cached - uncached).abs().max() < 0.25  # the tolerance test_caching gives every method
    do.disable_step_cache(pipe)
    assert torch.equal(sample(pipe, labels=labels), sample(tiny_pixel_pipeline(), labels=labels))


CACHES = {
    "first-block": {},
    "taylorseer": {},
    "pab": {},
    "faster": {},
    "magcache": {"num_inference_steps": 6, "calibration_images": 2},
    "block-schedule": {"num_inference_steps": 6, "calibration_images": 2},
}


@pytest.mark.parametrize("method", sorted(CACHES))
def test_a_deep_copy_of_a_cached_pipeline_carries_the_cache(method):
    pipe = tiny_pixel_pipeline()
    uncached = sample(pipe, steps=6, guidance=2.0)
    do.enable_step_cache(pipe, method, **CACHES[method])
    cached = sample(pipe, steps=6, guidance=2.0)
    if method in ("first-block", "taylorseer", "magcache", "block-schedule"):  # these skip work on this model
        assert not torch.equal(cached, uncached)
    copied = copy.deepcopy(pipe)
    assert copied.transformer is not pipe.transformer and copied.scheduler is not pipe.scheduler
    assert copied.call_lock is not pipe.call_lock
    assert copied.transformer.is_cache_enabled and pipe.transformer.is_cache_enabled
    assert type(copied.transformer._cache_config) is type(pipe.transformer._cache_config)
    callback = getattr(copied.transformer._cache_config, "current_timestep_callback", None)
    if callback is not None:  # PAB / FasterCache read the copy's timestep, not the original's
        assert callback.pipeline is copied
    assert torch.equal(sample(copied, steps=6, guidance=2.0), cached)
    assert torch.equal(sample(pipe, steps=6, guidance=2.0), cached)
    assert torch.equal(sample(copied, steps=6, guidance=2.0), cached)  # repeatable: its hooks reset per call
    do.disable_step_cache(copied)
    assert torch.equal(sample(copied, steps=6, guidance=2.0), uncached)
    assert torch.equal(sample(pipe, steps=6, guidance=2.0), cached)  # the original keeps its cache


def test_a_deep_copy_and_its_original_called_from_two_threads_give_their_own_images():
    pipe = tiny_pixel_pipeline()
    do.enable_step_cache(pipe, "first-block")
    copied = copy.deepcopy(pipe)
    calls = [lambda: sample(pipe, labels=(1, 2), steps=10), lambda: sample(copied, labels=(3,), steps=4)]
    alone = [call() for call in calls]
    outcomes = concurrently(calls)
    for index in range(2):
        assert_all_equal(outcomes[index], alone[index])
