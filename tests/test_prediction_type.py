"""What a trained network predicts: noise (DiT's) or velocity, learned, saved as the scheduler's `prediction_type`,
kept by fine-tunes and distilled students, and chosen by the benchmark's recipe from the size of its tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from dit_optimum import DiTOptimumError, DiTOptimumPipeline
from dit_optimum.benchmark.settings import (
    LARGE_TOKEN_PREDICTION,
    BenchmarkSettings,
    TrainingRecipe,
    choose_recipe_prediction,
)
from dit_optimum.training import train
from dit_optimum.training.diffusion import GaussianDiffusion, clean_and_noise
from test_training import decreased, losses, tiny_run


def _noised(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    diffusion = GaussianDiffusion()
    return diffusion, x0, noise, t, diffusion.q_sample(x0, t, noise)


def _velocity(diffusion, x0, noise, t):
    alpha = diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_and_noise_reads_a_prediction_as_diffusers_ddim_does(prediction_type):
    diffusion, x0, noise, t, x_t = _noised()
    output = {"epsilon": noise, "v_prediction": _velocity(diffusion, x0, noise, t), "sample": x0}[prediction_type]
    alpha = diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    clean, eps = clean_and_noise(output, x_t, alpha, prediction_type)
    torch.testing.assert_close(clean, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps[1:], noise[1:], atol=2e-3, rtol=1e-3)  # at t=0 the noise is barely in x_t
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    for index in range(len(t)):
        step = scheduler.step(output[index : index + 1], int(t[index]), x_t[index : index + 1])
        torch.testing.assert_close(step.pred_original_sample, clean[index : index + 1], atol=1e-4, rtol=1e-4)


def test_v_prediction_loss_is_zero_at_the_true_velocity_and_shares_the_variance_bound():
    diffusion, x0, noise, t, x_t = _noised(1)
    variance = torch.rand_like(noise) * 2 - 1
    by_noise = diffusion.losses(torch.cat([noise, variance], 1), x0, x_t, t, noise, "epsilon")
    velocity = _velocity(diffusion, x0, noise, t)
    by_velocity = diffusion.losses(torch.cat([velocity, variance], 1), x0, x_t, t, noise, "v_prediction")
    assert torch.all(by_velocity["mse"] == 0)
    torch.testing.assert_close(by_velocity["vb"], by_noise["vb"], atol=1e-3, rtol=1e-3)  # the same image and variance
    off = diffusion.losses(velocity + 0.5, x0, x_t, t, noise, "v_prediction")
    torch.testing.assert_close(off["loss"], torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="sample"):
        diffusion.losses(x0, x0, x_t, t, noise, "sample")


@pytest.fixture(scope="module")
def velocity_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("velocity")
    return folder, train(tiny_run(folder, prediction_type="v_prediction"))


def test_a_v_prediction_run_learns_and_saves_its_parametrisation(velocity_run):
    folder, pipeline_dir = velocity_run
    assert decreased(losses(folder))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = pipe([1, 2], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_a_finetune_and_a_distilled_student_keep_their_sources_parametrisation(velocity_run, tmp_path):
    _, source = velocity_run
    finetuned = train(tiny_run(tmp_path / "finetune", pretrained=str(source), model_overrides={}, steps=3))
    student = train(tiny_run(tmp_path / "student", teacher=str(source), model_overrides={"num_layers": 1}, steps=3))
    for folder in (finetuned, student):
        assert DiTOptimumPipeline.from_pretrained(folder).scheduler.config.prediction_type == "v_prediction"
    eps_run = train(tiny_run(tmp_path / "eps", steps=3))
    assert DiTOptimumPipeline.from_pretrained(eps_run).scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prediction_type": "epsilon"}, r"`pretrained` v_prediction, `prediction_type` epsilon"),
        ({"teacher": "EPS"}, r"`pretrained` v_prediction, `teacher` epsilon"),
    ],
)
def test_a_parametrisation_other_than_the_sources_is_refused_before_training(velocity_run, tmp_path, options, message):
    _, source = velocity_run
    eps_teacher = tmp_path / "eps-teacher"
    if options.get("teacher") == "EPS":
        train(tiny_run(eps_teacher, steps=2))
        options = {**options, "teacher": str(eps_teacher / "pipeline")}
    with pytest.raises(DiTOptimumError, match=message):
        train(tiny_run(tmp_path / "run", pretrained=str(source), model_overrides={}, steps=3, **options))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "pipeline").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prediction_type": "sample"}, r"Unknown `prediction_type`='sample'; allowed values: epsilon, v_prediction"),
        (
            {"prediction_type": "v_prediction", "pretrained": "x", "student_steps": 2, "model_overrides": {}},
            r"`student_prediction`",
        ),
    ],
)
def test_bad_prediction_options_are_refused_naming_them(tmp_path, options, message):
    with pytest.raises(DiTOptimumError, match=message):
        train(tiny_run(tmp_path / "run", **options))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ({"prediction_type": "sample"}, r"predicts 'sample' \(scheduler/scheduler_config.json\); .* epsilon or v_pred"),
        ({"prediction_type": 123}, r"predicts 123 \(scheduler/scheduler_config.json\)"),
        (
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000},
            r"samples with 'FlowMatchEulerDiscreteScheduler' \(scheduler/scheduler_config.json\)",
        ),
    ],
)
def test_a_source_that_is_not_a_noise_or_velocity_model_is_refused_naming_its_scheduler(
    velocity_run, tmp_path, scheduler, message
):
    _, source = velocity_run
    shutil.copytree(source, tmp_path / "other")
    config_file = tmp_path / "other" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config = {**config, **scheduler} if "_class_name" not in scheduler else scheduler
    config_file.write_text(json.dumps(config))
    for role in ({"pretrained": str(tmp_path / "other"), "model_overrides": {}}, {"teacher": str(tmp_path / "other")}):
        with pytest.raises(DiTOptimumError, match=message):
            train(tiny_run(tmp_path / "run", steps=2, **role))
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("variants", "channels", "expected"),
    [
        (("DiT-XS/4",), 1, "epsilon"),  # the tuned data's 16 values per token
        (("DiT-XS/2",), 3, "epsilon"),  # 12 values
        (("DiT-XS/8",), 1, LARGE_TOKEN_PREDICTION),  # the 32x32 recipe variant: 64 values
        (("DiT-XS/4",), 3, LARGE_TOKEN_PREDICTION),  # 48 values
        (("DiT-XS/2", "DiT-XS/8"), 1, LARGE_TOKEN_PREDICTION),  # one recipe for every variant: the largest tokens
    ],
)
def test_the_recipe_predicts_velocity_for_tokens_larger_than_the_tuned_ones(variants, channels, expected):
    settings = BenchmarkSettings(variants=variants, channels=channels, image_size=32)
    note = choose_recipe_prediction(settings)
    assert settings.training.prediction_type == expected
    assert (LARGE_TOKEN_PREDICTION in note) == (expected != "epsilon")
    assert choose_recipe_prediction(settings) == ""  # chosen once


def test_the_recipe_sets_new_networks_only(tmp_path):
    recipe = TrainingRecipe(prediction_type="v_prediction")
    fresh = recipe.train_config(str(tmp_path), "DiT-XS/8", "digits", 32, 1)
    assert fresh.prediction_type == "v_prediction"
    for source in ({"pretrained": "base"}, {"teacher": "base"}):
        assert recipe.train_config(str(tmp_path), "DiT-XS/8", "digits", 32, 1, **source).prediction_type is None


def test_a_finetune_samples_as_its_base_does(velocity_run, tmp_path):
    # a step-distilled student (trailing grid, 2 unguided steps) and a solver pipeline, each fine-tuned with LoRA
    from dit_optimum.techniques.solvers import with_solver
    from dit_optimum.training.step_distillation import record_student_defaults, student_scheduler

    _, source = velocity_run
    student = DiTOptimumPipeline.from_pretrained(source)
    student.scheduler = student_scheduler(student.scheduler.config, "v_prediction")
    record_student_defaults(student, 2)
    student.save_pretrained(tmp_path / "student")
    with_solver(DiTOptimumPipeline.from_pretrained(source), "dpmpp-2m", 5).save_pretrained(tmp_path / "solver")
    for base in ("student", "solver"):
        tuned = train(
            tiny_run(tmp_path / f"{base}-lora", pretrained=str(tmp_path / base), model_overrides={}, finetune="lora")
        )
        original, result = (
            DiTOptimumPipeline.from_pretrained(tmp_path / base),
            DiTOptimumPipeline.from_pretrained(tuned),
        )
        assert type(result.scheduler) is type(original.scheduler)
        assert dict(result.scheduler.config) == dict(original.scheduler.config)
        assert result.sampling_defaults == original.sampling_defaults
    assert DiTOptimumPipeline.from_pretrained(tmp_path / "student-lora" / "pipeline").sampling_defaults == {
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
    }
