"""What a pipeline accepts from its files and its callers: scheduler and VAE configs (validated key by key at
construction, at loading and at each call), call arguments (generators, guidance scale, class labels, step counts),
``id2label``, and mutations (``to``, step caching) asked for while another thread's call is running."""

from __future__ import annotations

import json
import shutil
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from conftest import tiny_model, tiny_pixel_pipeline, tiny_vae
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, enable_step_cache
from dit_optimum.models.lora import lora_config
from dit_optimum.pipelines.dit import MAX_TRAIN_TIMESTEPS, check_scheduler
from dit_optimum.techniques.caching import disable_step_cache


def images(pipe, labels=(1, 2), steps: int = 2, guidance: float = 1.0, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    out = pipe(list(labels), num_inference_steps=steps, guidance_scale=guidance, output_type="pt", **kwargs)
    return out.images


@pytest.fixture(scope="module")
def saved_pixel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pixel") / "pipe"
    tiny_pixel_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_latent(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    vae = AutoencoderKL.from_pretrained(tiny_vae(root / "vae", channels=1))
    model = tiny_model(sample_size=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.25)
    DiTOptimumPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler()).save_pretrained(root / "pipe")
    return root / "pipe"


def edited(source: Path, destination: Path, file: str, change: dict) -> Path:
    shutil.copytree(source, destination)
    path = destination / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return destination


# --- scheduler configs -------------------------------------------------------------------------------------------

BAD_SCHEDULER_CONFIGS = [
    ({"num_train_timesteps": 10**8}, "num_train_timesteps", r"1\.\.100000"),
    ({"num_train_timesteps": 10**12}, "num_train_timesteps", r"1\.\.100000"),
    ({"clip_sample": True, "clip_sample_range": 0}, "clip_sample_range", "> 0"),
    ({"clip_sample": True, "clip_sample_range": -1.0}, "clip_sample_range", "> 0"),
    ({"prediction_type": "bogus"}, "prediction_type", "epsilon, sample, v_prediction"),
    ({"steps_offset": 1000000}, "steps_offset", r"0\.\.999"),
    ({"steps_offset": -5}, "steps_offset", r"0\.\.999"),
    ({"trained_betas": [0.01] * 10}, "trained_betas", "list of 1000"),
    ({"trained_betas": [[0.01] * 10] * 100}, "trained_betas", "flat list of 1000"),
    ({"beta_schedule": "bogus"}, "beta_schedule", "linear, scaled_linear, squaredcos_cap_v2"),
    ({"thresholding": True, "dynamic_thresholding_ratio": 5}, "dynamic_thresholding_ratio", r"\[0, 1\]"),
    ({"thresholding": True, "sample_max_value": 0}, "sample_max_value", "> 0"),
    ({"clip_sample": "yes"}, "clip_sample", "true or false"),
    ({"timestep_spacing": "sideways"}, "timestep_spacing", "leading, linspace, trailing"),
    ({"solver_order": 100}, "solver_order", "1, 2 or 3"),
]


@pytest.mark.parametrize(("change", "key", "allowed"), BAD_SCHEDULER_CONFIGS, ids=lambda v: str(v)[:30])
def test_a_saved_scheduler_config_is_refused_before_diffusers_builds_it(saved_pixel, tmp_path, change, key, allowed):
    folder = edited(saved_pixel, tmp_path / "pipe", "scheduler/scheduler_config.json", change)
    # the file's path in the message: refused by the check before loading, not after diffusers built the tables
    pattern = rf"scheduler_config\.json\) has `{key}`=.*allowed values: .*{allowed}"
    started = time.perf_counter()
    with pytest.raises(DiTOptimumError, match=pattern):
        DiTOptimumPipeline.from_pretrained(folder)
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"num_train_timesteps": MAX_TRAIN_TIMESTEPS + 1}, "num_train_timesteps"),
        ({"clip_sample_range": 0.0}, "clip_sample_range"),
        ({"prediction_type": "bogus"}, "prediction_type"),
        ({"steps_offset": 1000000}, "steps_offset"),
        ({"trained_betas": [0.01] * 999}, "trained_betas"),
        ({"thresholding": True, "dynamic_thresholding_ratio": 5.0}, "dynamic_thresholding_ratio"),
        ({"thresholding": True, "sample_max_value": 0.0}, "sample_max_value"),
    ],
)
def test_a_built_scheduler_is_refused_at_construction_and_when_swapped_in(options, key):
    with pytest.raises(DiTOptimumError, match=rf"scheduler \(scheduler\) has `{key}`=.*allowed values"):
        DiTOptimumPipeline(transformer=tiny_model(in_channels=1, out_channels=2), scheduler=DDIMScheduler(**options))
    pipe = tiny_pixel_pipeline()
    before = images(pipe)
    pipe.scheduler = DDIMScheduler(**options)
    with pytest.raises(DiTOptimumError, match=rf"DDIMScheduler\) cannot set 2 timesteps .*`{key}`=.*allowed values"):
        images(pipe)
    pipe.scheduler = DDIMScheduler()
    assert torch.equal(images(pipe), before)


def test_a_scheduler_reconfigured_in_place_is_refused_at_the_call():
    pipe = tiny_pixel_pipeline()
    pipe.scheduler.register_to_config(clip_sample=True, clip_sample_range=-1.0)
    with pytest.raises(DiTOptimumError, match=r"`clip_sample_range`=-1\.0; allowed values: a finite number > 0"):
        images(pipe)


def test_a_schedule_without_noise_is_refused():
    with pytest.raises(DiTOptimumError, match=r"`betas` that are all 0"):
        DiTOptimumPipeline(
            transformer=tiny_model(in_channels=1, out_channels=2), scheduler=DDIMScheduler(beta_start=0, beta_end=0)
        )


def test_timesteps_beyond_the_training_steps_are_refused_before_sampling():
    pipe = tiny_pixel_pipeline()
    pipe.scheduler = DDIMScheduler(num_train_timesteps=10, steps_offset=1)  # "leading": 10 steps reach timestep 10
    with pytest.raises(DiTOptimumError, match=r"timesteps 1\.\.10 .*outside its 10 training steps.*`steps_offset`=1"):
        images(pipe, steps=10)
    assert torch.isfinite(images(pipe, steps=5)).all()  # fewer steps stay inside


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(),
        DDPMScheduler(),
        DPMSolverMultistepScheduler(),
        EulerDiscreteScheduler(),
        DDPMScheduler(beta_schedule="sigmoid"),
        DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++", thresholding=True),
        EulerDiscreteScheduler(prediction_type="v_prediction", interpolation_type="log_linear"),
        DDIMScheduler(trained_betas=np.linspace(1e-4, 0.02, 1000)),
    ],
    ids=lambda s: type(s).__name__,
)
def test_the_schedulers_dit_samples_with_are_accepted_with_their_own_values(scheduler):
    check_scheduler(scheduler)
    pipe = DiTOptimumPipeline(transformer=tiny_model(in_channels=1, out_channels=2), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler is scheduler


def test_other_schedulers_choices_are_theirs_but_their_numbers_are_checked():
    from dit_optimum.pipelines.dit import scheduler_config_problem

    assert scheduler_config_problem({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2"}) is None
    problem = scheduler_config_problem({"_class_name": "UniPCMultistepScheduler", "steps_offset": -1})
    assert problem is not None and problem.startswith("`steps_offset`=-1; allowed values: an integer in 0..999")


# --- VAE configs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"scaling_factor": 1e-320}, "scaling_factor"),
        ({"scaling_factor": 0}, "scaling_factor"),
        ({"scaling_factor": -1}, "scaling_factor"),
        ({"scaling_factor": "abc"}, "scaling_factor"),
        ({"scaling_factor": None}, "scaling_factor"),
        ({"scaling_factor": True}, "scaling_factor"),
        ({"scaling_factor": 1e6}, "scaling_factor"),
        ({"shift_factor": "x"}, "shift_factor"),
        ({"shift_factor": 1e9}, "shift_factor"),
        ({"norm_num_groups": 0}, "norm_num_groups"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_a_saved_vae_config_is_refused_naming_the_file_key_and_allowed_values(saved_latent, tmp_path, change, key):
    folder = edited(saved_latent, tmp_path / "pipe", "vae/config.json", change)
    with pytest.raises(DiTOptimumError, match=rf"vae/config\.json\) has `{key}`=.*; allowed values: "):
        DiTOptimumPipeline.from_pretrained(folder)


def test_a_saved_vae_with_sane_factors_loads(saved_latent, tmp_path):
    folder = edited(
        saved_latent, tmp_path / "pipe", "vae/config.json", {"scaling_factor": 1.5305, "shift_factor": 0.06}
    )
    pipe = DiTOptimumPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(images(pipe)).all()


@pytest.mark.parametrize("value", [1e-320, 0.0, float("nan"), float("inf"), "abc", None, True])
def test_a_vae_scaling_factor_is_checked_at_construction_and_at_each_call(saved_latent, value):
    vae = AutoencoderKL.from_pretrained(saved_latent / "vae")
    vae.register_to_config(scaling_factor=value)
    with pytest.raises(DiTOptimumError, match=r"The VAE \(vae\) has `scaling_factor`=.*allowed values: a finite"):
        DiTOptimumPipeline(transformer=tiny_model(sample_size=4), vae=vae)
    pipe = DiTOptimumPipeline.from_pretrained(saved_latent)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.register_to_config(scaling_factor=value)
    with pytest.raises(DiTOptimumError, match=r"`scaling_factor`="):
        images(pipe)


# --- finite outputs, and messages that name this call's causes ------------------------------------------------


def test_nan_from_the_vae_is_refused_blaming_the_vae_not_guidance(saved_latent):
    pipe = DiTOptimumPipeline.from_pretrained(saved_latent)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe([1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
    assert torch.isfinite(latents).all()
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    for output_type in ("np", "pt", "pil"):
        with pytest.raises(DiTOptimumError, match=r"decoded samples are not finite.*VAE's `scaling_factor`") as info:
            pipe([1, 2], num_inference_steps=2, guidance_scale=1.0, output_type=output_type)
        assert "guidance_scale" not in str(info.value) and "LoRA" not in str(info.value)
    # the latents it returns are still checked and finite: only what is returned is judged
    assert torch.isfinite(pipe([1], num_inference_steps=2, guidance_scale=1.0, output_type="latent").images).all()


def test_non_finite_latents_name_guidance_only_when_guided_and_lora_only_when_attached():
    pipe = tiny_pixel_pipeline()
    with torch.no_grad():
        pipe.transformer.proj_out_2.bias.fill_(float("nan"))
    with pytest.raises(DiTOptimumError, match=r"samples are not finite.*transformer weights.*scheduler") as info:
        pipe([1], guidance_scale=1.0, num_inference_steps=2)
    assert "guidance_scale" not in str(info.value) and "LoRA" not in str(info.value)
    with pytest.raises(DiTOptimumError, match=r"samples are not finite.*`guidance_scale`=2\.0 too large"):
        pipe([1], guidance_scale=2.0, num_inference_steps=2)
    pipe.transformer.add_adapter(lora_config(pipe.transformer, ["attention"], rank=2), adapter_name="style")
    with pytest.raises(DiTOptimumError, match=r"samples are not finite.*LoRA adapter\(s\) 'style'") as info:
        pipe([1], guidance_scale=1.0, num_inference_steps=2)
    assert "guidance_scale" not in str(info.value)


# --- call arguments --------------------------------------------------------------------------------------------


class _CudaGenerator(torch.Generator):
    @property
    def device(self) -> torch.device:  # a generator on another device than the (CPU) pipeline's
        return torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("generator", "pattern"),
    [
        (lambda: [torch.Generator().manual_seed(0)] * 3, r"list of 3 generators for 2 image\(s\)"),
        (lambda: [torch.Generator().manual_seed(0)], r"list of 1 generators for 2 image\(s\)"),
        (lambda: [], r"list of 0 generators for 2 image\(s\)"),
        (lambda: 5, r"`generator`=5;"),
        (lambda: [1, 2], r"`generator` holds 1"),
        (lambda: [torch.Generator(), None], r"`generator` holds None"),
        (lambda: "seed", r"`generator`='seed';"),
        (_CudaGenerator, r"`generator` is on the cuda device"),
    ],
    ids=["long", "short", "empty", "int", "ints", "none-entry", "str", "other-device"],
)
def test_a_bad_generator_is_refused_naming_the_allowed_values(generator, pattern):
    pipe = tiny_pixel_pipeline()
    allowed = r"allowed values: None, a torch\.Generator, or a list of 2 torch\.Generators \(one per image\)"
    for guidance in (1.0, 2.0):
        with pytest.raises(DiTOptimumError, match=f"{pattern}.*{allowed}"):
            images(pipe, guidance=guidance, generator=generator())


def test_a_generator_list_of_one_per_image_is_accepted_as_list_or_tuple():
    pipe = tiny_pixel_pipeline()
    listed = images(pipe, generator=[torch.Generator().manual_seed(seed) for seed in (4, 5)])
    tupled = images(pipe, generator=tuple(torch.Generator().manual_seed(seed) for seed in (4, 5)))
    first = images(pipe, labels=[1], generator=torch.Generator().manual_seed(4))
    assert torch.equal(listed, tupled)
    assert torch.allclose(listed[:1], first, atol=1e-4)  # image 0 from generator 0 (batched: same up to rounding)


def test_guidance_scale_numbers_are_used_as_floats():
    pipe = tiny_pixel_pipeline()
    expected = images(pipe, guidance=1.5)
    assert torch.equal(images(pipe, guidance=Fraction(3, 2)), expected)
    assert torch.equal(images(pipe, guidance=np.float64(1.5)), expected)
    assert torch.equal(images(pipe, guidance=np.float32(1.5)), expected)


def test_num_inference_steps_accepts_numpy_integers():
    pipe = tiny_pixel_pipeline()
    expected = images(pipe, steps=2)
    assert torch.equal(images(pipe, steps=np.int64(2)), expected)
    assert torch.equal(images(pipe, steps=np.int32(2)), expected)
    for bad in (2.0, True, np.float64(2.0), "2"):
        with pytest.raises(DiTOptimumError, match=r"`num_inference_steps`=.* must be an integer in 1\.\.1000"):
            images(pipe, steps=bad)


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (lambda: torch.empty(2, dtype=torch.long, device="meta"), r"is on the meta device \(it holds no values\)"),
        (lambda: torch.tensor([float("nan"), 1.0]), r"has dtype torch\.float32"),
        (lambda: torch.tensor([1.0, 2.0]), r"has dtype torch\.float32"),
        (lambda: torch.tensor([True, False]), r"has dtype torch\.bool"),
        (lambda: torch.tensor([1 + 0j]), r"has dtype torch\.complex64"),
        (lambda: np.array([np.nan]), "has dtype float64"),
        (lambda: np.array([True]), "has dtype bool"),
    ],
    ids=["meta", "nan", "float", "bool", "complex", "np-nan", "np-bool"],
)
def test_class_label_tensors_must_hold_integer_indices(labels, pattern):
    pipe = tiny_pixel_pipeline()
    with pytest.raises(DiTOptimumError, match=rf"`class_labels` {pattern}; allowed values: class indices in 0\.\.9"):
        pipe(labels(), num_inference_steps=2, guidance_scale=1.0)


def test_integer_class_label_tensors_and_arrays_give_the_same_images_as_lists():
    pipe = tiny_pixel_pipeline()
    expected = images(pipe, labels=[1, 2])
    generator = torch.Generator().manual_seed(0)
    tensor = pipe(
        torch.tensor([1, 2]), num_inference_steps=2, guidance_scale=1.0, generator=generator, output_type="pt"
    )
    generator = torch.Generator().manual_seed(0)
    array = pipe(
        np.array([1, 2], np.int32), num_inference_steps=2, guidance_scale=1.0, generator=generator, output_type="pt"
    )
    assert torch.equal(tensor.images, expected) and torch.equal(array.images, expected)


# --- id2label ----------------------------------------------------------------------------------------------------


def build(id2label):
    return DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler(), id2label=id2label)


@pytest.mark.parametrize(
    ("id2label", "pattern"),
    [
        ({"1": "x", "01": "y"}, r"names class 1 twice \(keys '1' and '01'\)"),
        ({1: "x", "1": "y"}, r"names class 1 twice"),
        ({True: "x"}, r"key True is not a class index; allowed values: integers or strings of digits in 0\.\.9"),
        ({1.9: "x"}, r"key 1\.9 is not a class index"),
        ({float("nan"): "x"}, r"key nan is not a class index"),
        ({"1.0": "x"}, r"key '1\.0' is not a class index"),
        ({"-1": "x"}, r"key '-1' is not a class index"),
        ({"0": None}, r"name of class 0 is None; allowed values: a string"),
        ({"0": "a" * 1001}, r"name of class 0 is 1001 characters long; allowed values: names of at most 1000"),
        (["a", "b"], r"must be a mapping of class index to name .*got list"),
    ],
    ids=["01", "int-and-str", "bool", "fraction", "nan", "float-str", "negative", "none", "long", "list"],
)
def test_bad_id2label_is_refused_at_construction(id2label, pattern):
    with pytest.raises(DiTOptimumError, match=rf"`id2label` {pattern}"):
        build(id2label)


def test_id2label_normalises_integral_keys_and_what_it_saves_loads(tmp_path):
    longest = "n" * 1000
    pipe = build({1.0: "one", np.int64(2): "two", " 3 ": 3, "004": longest})
    assert pipe.config.id2label == {"1": "one", "2": "two", "3": "3", "4": longest}
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiTOptimumPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.id2label == pipe.config.id2label and loaded.labels[longest] == 4


# --- mutations while another thread's call runs ------------------------------------------------------------------


def run_while_sampling(pipe, mutate, guidance: float = 1.0, steps: int = 20) -> torch.Tensor:
    """Thread A samples; thread B calls ``mutate`` once A's first denoising step has run (A then pauses briefly so
    that B gets to ask during the call). Returns A's images (raising what A raised)."""
    started, results = threading.Event(), {}

    def first_step(_module, _inputs):
        if not started.is_set():
            started.set()
            time.sleep(0.3)

    handle = pipe.transformer.register_forward_pre_hook(first_step)

    def call() -> None:
        try:
            results["images"] = images(pipe, steps=steps, guidance=guidance)
        except BaseException as error:
            results["error"] = error

    thread = threading.Thread(target=call)
    try:
        thread.start()
        assert started.wait(timeout=60)
        mutate()
        thread.join(timeout=120)
    finally:
        handle.remove()
    assert not thread.is_alive()
    if "error" in results:
        raise results["error"]
    return results["images"]


def test_to_waits_for_a_running_call():
    pipe = tiny_pixel_pipeline()
    alone = images(pipe, steps=20)
    during = run_while_sampling(pipe, lambda: pipe.to(torch.float64))
    assert torch.equal(during, alone) and during.dtype == torch.float32
    assert pipe.transformer.dtype == torch.float64  # applied after the call
    assert torch.isfinite(images(pipe)).all()


def test_enabling_and_disabling_a_step_cache_waits_for_a_running_call():
    pipe = tiny_pixel_pipeline()
    alone = images(pipe, steps=20, guidance=2.0)
    during = run_while_sampling(pipe, lambda: enable_step_cache(pipe, "first-block", threshold=1e9), guidance=2.0)
    assert torch.equal(during, alone)
    assert pipe.transformer.is_cache_enabled
    cached = images(pipe, steps=20, guidance=2.0)
    during = run_while_sampling(pipe, lambda: disable_step_cache(pipe), guidance=2.0)
    assert torch.equal(during, cached)  # the whole call ran with the cache
    assert not pipe.transformer.is_cache_enabled
    assert torch.equal(images(pipe, steps=20, guidance=2.0), alone)


def test_the_lock_is_re_entrant_for_the_thread_holding_it():
    pipe = tiny_pixel_pipeline()
    with pipe.call_lock:
        pipe.to(torch.float32)
        enable_step_cache(pipe, "first-block")
        disable_step_cache(pipe)
        assert torch.isfinite(images(pipe)).all()
