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


# --- every cache method of dit_optimum.enable_step_cache, on every attention type and MoE -----------------------

STEPS = 6
# options under which a method never reuses anything, and options under which it reuses as much as it can
NEVER_REUSE = {
    "first-block": {"threshold": 0.0},
    "pab": {"skip_range": 1},
    "faster": {"skip_range": 1, "unconditional_skip_range": 1},
    "taylorseer": {"cache_interval": 1},
    "magcache": {"threshold": 0.0, "num_inference_steps": STEPS},
    "block-schedule": {"reuse_fraction": 0.0, "num_inference_steps": STEPS},
}
MOST_REUSE = {
    "first-block": {"threshold": 10.0},
    "pab": {"skip_range": 3, "timestep_range": (-1, 1001)},
    "faster": {"skip_range": 3, "timestep_range": (-1, 1001), "unconditional_skip_range": 2},
    "taylorseer": {"cache_interval": 3, "warmup_steps": 1},
    "magcache": {"threshold": 10.0, "num_inference_steps": STEPS, "retention_ratio": 0.0},
    "block-schedule": {"reuse_fraction": 0.5, "num_inference_steps": STEPS},
}


def processor_calls(pipe, block: int = -1) -> list:
    """Count the attention maths actually run in a block (cache hooks replace the module's forward)."""
    calls, attn = [], pipe.transformer.transformer_blocks[block].attn1
    processor = attn.processor
    attn.processor = lambda *args, **kwargs: (calls.append(1), processor(*args, **kwargs))[1]
    return calls


def test_every_method_is_declared_with_its_never_and_most_reuse_options():
    from dit_optimum import CACHE_METHODS

    assert set(NEVER_REUSE) == set(MOST_REUSE) == set(CACHE_METHODS)


@pytest.mark.parametrize("method", list(NEVER_REUSE))
@pytest.mark.parametrize("overrides", MODEL_KINDS, ids=kind_id)
def test_every_cache_method_on_every_kind(overrides, method):
    from dit_optimum import enable_step_cache

    reference = sample_images(tiny_pixel_pipeline(**overrides), STEPS)
    never = enable_step_cache(tiny_pixel_pipeline(**overrides), method, **NEVER_REUSE[method])
    never_calls = processor_calls(never)
    assert (sample_images(never, STEPS) == reference).all()
    assert len(never_calls) == STEPS
    cached = enable_step_cache(tiny_pixel_pipeline(**overrides), method, **MOST_REUSE[method])
    calls = processor_calls(cached)
    images = sample_images(cached, STEPS)
    assert len(calls) < STEPS  # the last block's attention ran on fewer steps than there are
    assert images.shape == reference.shape and not (images == reference).all()
    assert abs(images - reference).max() < 0.25  # an approximation of the same samples, not other images
    cached.transformer.disable_cache()
    assert (sample_images(cached, STEPS) == reference).all()


def test_block_schedule_respects_its_budget_and_runs_of_reuse():
    from dit_optimum.techniques import calibrate_block_schedule

    pipe = tiny_pixel_pipeline(num_layers=4)
    schedule = calibrate_block_schedule(pipe, 8, reuse_fraction=0.5, max_consecutive=1)
    assert schedule.num_inference_steps == 8 and schedule.reuse[0] == ()
    reused = {(step, block) for step, row in enumerate(schedule.reuse) for block in row}
    # at most the budget (14 of 28): a greedy pick under the no-two-in-a-row rule may fall a little short of it
    assert 10 <= len(reused) <= round(0.5 * 7 * 4) and schedule.reuse_fraction(4) == pytest.approx(len(reused) / 28)
    assert not any((step + 1, block) in reused for step, block in reused)  # never twice in a row
    longer = calibrate_block_schedule(pipe, 8, reuse_fraction=0.6, max_consecutive=2)
    runs = [sum((s + k, b) in {(s, b) for s, r in enumerate(longer.reuse) for b in r} for k in range(3)) for s in
            range(8) for b in range(4)]  # fmt: skip
    assert max(runs) <= 2
    # a run with another step count uses the nearest scheduled step
    assert schedule.reused_at(0, 4) == () and schedule.reused_at(3, 4) == schedule.reuse[7]


def test_block_schedule_is_saved_with_the_pipeline_and_reloads(tmp_path):
    from diffusers import DiffusionPipeline

    import dit_optimum  # noqa: F401
    from dit_optimum import DiTOptimumPipeline, enable_step_cache

    reference = sample_images(tiny_pixel_pipeline(), STEPS)
    pipe = enable_step_cache(tiny_pixel_pipeline(), "block-schedule", reuse_fraction=0.5, num_inference_steps=STEPS)
    cached = sample_images(pipe, STEPS)
    pipe.save_pretrained(tmp_path / "cached")
    loaded = DiTOptimumPipeline.from_pretrained(tmp_path / "cached")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.is_cache_enabled
    assert loaded.transformer.config.block_cache_schedule == pipe.transformer.config.block_cache_schedule
    calls = processor_calls(loaded, 0) if 0 in {b for r in loaded.transformer._cache_config.reuse for b in r} else None
    assert (sample_images(loaded, STEPS) == cached).all()
    assert calls is None or len(calls) < STEPS
    # diffusers' stock DiTPipeline sets no cache context: the schedule stays off and the samples are uncached ones
    stock = DiffusionPipeline.from_pretrained(tmp_path / "cached")
    stock.set_progress_bar_config(disable=True)
    assert type(stock).__name__ == "DiTPipeline"
    generator = torch.manual_seed(0)
    stock_images = stock([1, 2, 3], num_inference_steps=STEPS, guidance_scale=2.0, generator=generator,
                         output_type="np").images  # fmt: skip
    assert abs(stock_images - reference).max() < 1e-5
    # disabling removes it from the config: saved again, the model loads uncached
    loaded.transformer.disable_cache()
    loaded.save_pretrained(tmp_path / "plain")
    again = DiTOptimumPipeline.from_pretrained(tmp_path / "plain")
    again.set_progress_bar_config(disable=True)
    assert not again.transformer.is_cache_enabled and (sample_images(again, STEPS) == reference).all()


def test_mag_ratios_come_from_diffusers_calibration(capsys):
    from dit_optimum.techniques import calibrate_block_schedule
    from dit_optimum.techniques.caching import calibrate_mag_ratios

    pipe = tiny_pixel_pipeline()
    ratios = calibrate_mag_ratios(pipe, STEPS)
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(0.2 < r < 5 for r in ratios)
    assert "MagCache" not in capsys.readouterr().out  # diffusers' print is kept out of the user's output
    assert not pipe.transformer.is_cache_enabled
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="cache off"):
        calibrate_block_schedule(pipe, STEPS)


BAD_OPTIONS = [
    ("lru", {}, r"Unknown cache `method`='lru'; allowed values: first-block, pab"),
    ("pab", {"threshold": 0.1}, r"Unknown option\(s\) \['threshold'\] for cache method 'pab'; allowed: skip_range"),
    ("magcache", {}, r"needs `num_inference_steps`"),
    ("pab", {"skip_range": 0}, r"`skip_range`=0 .* must be an integer >= 1"),
    ("pab", {"timestep_range": (800, 100)}, r"`timestep_range`=\(800, 100\) must be two numbers"),
    ("block-schedule", {"num_inference_steps": 4, "reuse_fraction": 1.5}, r"`reuse_fraction`=1.5 .* \[0, 1\)"),
    ("first-block", {"threshold": "high"}, r"`threshold`='high' .* must be a finite number"),
    ("first-block", {"threshold": float("nan")}, r"`threshold`=nan .* must be a finite number"),
]


@pytest.mark.parametrize(("method", "options", "message"), BAD_OPTIONS, ids=[b[0] + str(i) for i, b in
                                                                            enumerate(BAD_OPTIONS)])  # fmt: skip
def test_bad_cache_options_are_refused_naming_them(method, options, message):
    from dit_optimum import enable_step_cache

    pipe = tiny_pixel_pipeline()
    with pytest.raises(ValueError, match=message):
        enable_step_cache(pipe, method, **options)
    assert not pipe.transformer.is_cache_enabled


def test_a_bad_saved_schedule_is_refused_naming_the_key():
    from conftest import tiny_config
    from dit_optimum import DiTOptimumTransformer2DModel

    bad = {"num_inference_steps": 2, "reuse": [[], [7]]}
    with pytest.raises(ValueError, match=r"block_cache_schedule.reuse\[1\]`=\[7\] must list block indices 0..1"):
        DiTOptimumTransformer2DModel(**tiny_config(block_cache_schedule=bad))


@pytest.mark.parametrize("method", list(MOST_REUSE))
def test_every_cached_pipeline_gets_measured_and_keeps_its_cache(method):
    """The benchmark's cost measurement (unguided forwards, FLOP counting, batch-1 latency) works under every cache
    and leaves the same cache on: forwards outside sampling switch it off and back on."""
    from dit_optimum import enable_step_cache
    from dit_optimum.evaluation.efficiency import SpeedSettings, efficiency_metrics

    pipe = enable_step_cache(tiny_pixel_pipeline(), method, **MOST_REUSE[method])
    config = pipe.transformer._cache_config
    before = sample_images(pipe, STEPS)
    settings = SpeedSettings(batch_size=2, forward_batch_size=3, num_inference_steps=STEPS, warmup=0, repeats=1)
    metrics = efficiency_metrics(pipe, settings, reference=tiny_pixel_pipeline())
    assert metrics["forward_images_per_s"] > 0 and metrics["gflops"] > 0
    assert pipe.transformer._cache_config == config
    assert (sample_images(pipe, STEPS) == before).all()


def test_a_run_time_cache_is_not_saved(tmp_path):
    from dit_optimum import DiTOptimumPipeline, enable_step_cache

    reference = sample_images(tiny_pixel_pipeline(), STEPS)
    pipe = enable_step_cache(tiny_pixel_pipeline(), "taylorseer", **MOST_REUSE["taylorseer"])
    pipe.save_pretrained(tmp_path / "saved")
    assert pipe.transformer.is_cache_enabled  # saving leaves the cache on
    loaded = DiTOptimumPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert not loaded.transformer.is_cache_enabled
    assert "block_cache_schedule" not in loaded.transformer.config or not loaded.transformer.config.block_cache_schedule
    assert (sample_images(loaded, STEPS) == reference).all()
