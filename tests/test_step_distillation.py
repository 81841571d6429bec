"""Step distillation (progressive, guidance distilled in): the round's target is what the student's one DDIM step must
predict to land on the teacher's two guided steps (checked against diffusers' own scheduler steps), a short run saves a
student that samples at its steps unguided, resumes exactly, refuses bad options by name, and the benchmark chains
the rounds (distill-steps-2 learns from distill-steps-4's pipeline, trained once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from dit_optimum import DiTOptimumError, DiTOptimumPipeline
from dit_optimum.benchmark import BenchmarkSettings, TrainingRecipe
from dit_optimum.benchmark.contexts import UntrainedContext, VariantContext
from dit_optimum.techniques.registry import STEP_DISTILLATION_ROUND, get_technique
from dit_optimum.training import TrainConfig, train
from dit_optimum.training.cli import build_parser
from dit_optimum.training.cli import main as train_cli
from dit_optimum.training.step_distillation import StepDistillation
from test_training import losses, tiny_run


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny pipeline trained a few steps on the digits (learned sigma, a null class, DDIM with clipping)."""
    return train(tiny_run(tmp_path_factory.mktemp("teacher") / "run", steps=5))


def round_config(output_dir, teacher, **options) -> TrainConfig:
    return tiny_run(output_dir, **{"pretrained": str(teacher), "model_overrides": {}, "student_steps": 2, **options})


def guided_teacher_steps(pipeline, x, t, y, steps, scale):
    """Two of diffusers' DDIM steps of the teacher at 2 x ``steps`` on the trailing grid from ``t``, guided as the
    pipeline guides (the independent reference the closed form must meet)."""
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(2 * steps)
    grid = scheduler.timesteps.tolist()
    model, channels = pipeline.transformer, x.shape[1]
    null = torch.full_like(y, model.null_class_label)
    for time in grid[grid.index(t) : grid.index(t) + 2]:
        times = torch.full((2 * len(x),), time)
        output = model(torch.cat([x, x]), times, torch.cat([y, null])).sample[:, :channels]
        cond, uncond = output.chunk(2)
        x = scheduler.step(uncond + scale * (cond - uncond), time, x).prev_sample
    return x


@torch.no_grad()
@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_one_student_step_at_the_target_lands_on_the_teachers_two_guided_steps(teacher, tmp_path, prediction):
    config = round_config(tmp_path, teacher, teacher_guidance_scale=1.5, student_prediction=prediction)
    pipeline = DiTOptimumPipeline.from_pretrained(teacher)
    step = StepDistillation(config, pipeline.transformer)
    assert step.teacher_scheduler.config.clip_sample  # the baseline's DDIM clips: reproduced in the teacher's steps
    student = step.scheduler
    student.set_timesteps(2)
    assert student.timesteps.tolist() == [999, 499] == step.grid.tolist()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=generator) * 2
    y = torch.tensor([0, 3, 10])  # 10: the null class (a dropped label) learns the unconditional steps
    for t in (999, 499):  # the last student step ends at the final alpha (1): the target is the teacher's image
        times = torch.full((3,), t)
        target = step.target(x, times, y)
        expected = guided_teacher_steps(pipeline, x, t, y, 2, 1.5)
        # the student output whose image is the target, in its own parametrisation
        a = student.alphas_cumprod[t]
        output = (a.sqrt() * x - target) / (1 - a).sqrt() if prediction == "v_prediction" else None
        if prediction == "epsilon":
            output = (x - a.sqrt() * target) / (1 - a).sqrt()
        landed = student.step(output, t, x).prev_sample
        torch.testing.assert_close(landed, expected, rtol=1e-4, atol=1e-4)
        if t == 499:
            torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)
        padded = torch.cat([output, torch.randn_like(output)], 1)  # the variance channels do not count
        assert step.loss(padded, x, times, y)[0] < 1e-8
        assert step.loss(torch.randn_like(padded), x, times, y)[0] > 1e-2


def test_timesteps_fall_on_the_students_grid_each_equally_often(teacher, tmp_path):
    step = StepDistillation(
        round_config(tmp_path, teacher, student_steps=4), DiTOptimumPipeline.from_pretrained(teacher).transformer
    )
    mapped = step.student_timesteps(torch.arange(1000), 1000)
    assert sorted(set(mapped.tolist())) == [249, 499, 749, 999]
    assert all((mapped == point).sum() == 250 for point in (249, 499, 749, 999))


def count_forwards(pipeline):
    batches = []
    pipeline.transformer.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    return batches


def test_a_round_trains_and_saves_a_student_that_samples_at_its_steps_unguided(teacher, tmp_path):
    pipeline_dir = train(round_config(tmp_path / "run", teacher, teacher_guidance_scale=2.0, steps=40))
    values = losses(tmp_path / "run")
    assert sum(values[-10:]) < 0.8 * sum(values[:10])  # the student approaches the teacher's two-step map
    assert losses(tmp_path / "run", "x0_mse")[-1] > 0
    student = DiTOptimumPipeline.from_pretrained(pipeline_dir)
    config = student.scheduler.config
    assert isinstance(student.scheduler, DDIMScheduler)
    assert (config.prediction_type, config.timestep_spacing, config.clip_sample) == ("v_prediction", "trailing", False)
    student.scheduler.set_timesteps(2)
    assert student.scheduler.timesteps.tolist() == [999, 499]  # the grid it was trained on
    assert student.sampling_defaults == {"num_inference_steps": 2, "guidance_scale": 1.0}
    base = DiTOptimumPipeline.from_pretrained(teacher).transformer
    assert student.transformer.config.out_channels == base.config.out_channels  # same network, variance kept
    assert not all(torch.equal(a, b) for a, b in zip(student.transformer.parameters(), base.parameters()))
    batches = count_forwards(student)
    images = student([1, 2, 3], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (3, 8, 8, 1) and batches == [3, 3]  # two steps, one unguided forward each
    # the next round: the 2-step student is the unguided teacher of a 1-step one
    second = train(round_config(tmp_path / "second", pipeline_dir, student_steps=1, steps=2))
    assert DiTOptimumPipeline.from_pretrained(second).sampling_defaults["num_inference_steps"] == 1


def test_an_interrupted_round_resumes_to_the_same_weights(teacher, tmp_path):
    options = {"steps": 4, "checkpoint_every": 2, "teacher_guidance_scale": 1.5}
    straight = train(round_config(tmp_path / "straight", teacher, **options))
    train(round_config(tmp_path / "resumed", teacher, **{**options, "steps": 2}))
    resumed = train(round_config(tmp_path / "resumed", teacher, resume=True, **options))
    first = DiTOptimumPipeline.from_pretrained(straight).transformer.state_dict()
    second = DiTOptimumPipeline.from_pretrained(resumed).transformer.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert DiTOptimumPipeline.from_pretrained(resumed).sampling_defaults["num_inference_steps"] == 2
    # the teacher is fingerprinted: other weights at the same path are refused on resume
    copy = shutil.copytree(teacher, tmp_path / "copy")
    train(round_config(tmp_path / "changed", copy, **{**options, "steps": 2}))
    other = train(tiny_run(tmp_path / "other-teacher", steps=2))
    shutil.rmtree(copy)
    shutil.copytree(other, copy)
    with pytest.raises(DiTOptimumError, match="different content"):
        train(round_config(tmp_path / "changed", copy, resume=True, **options))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"student_steps": 0}, r"`student_steps`=0 must be an integer >= 1.*allowed values: 1, 2, 4, 5, 10"),
        ({"student_steps": 3}, r"`student_steps`=3 .*double divides the 1000"),
        ({"student_steps": "4"}, r"`student_steps`='4'"),
        ({"pretrained": None}, r"`student_steps` needs `pretrained`"),
        ({"finetune": "lora"}, r"`finetune`='lora' is not allowed with it; allowed values: full"),
        ({"teacher": "x"}, r"`student_steps` and `teacher` cannot be combined"),
        ({"teacher_guidance_scale": 0.5}, r"`teacher_guidance_scale`=0.5 must be a finite number in \[1"),
        (
            {"student_prediction": "sample"},
            r"Unknown `student_prediction`='sample'; allowed values: epsilon, v_prediction",
        ),
        ({"student_steps": None, "teacher_guidance_scale": 2.0}, r"`teacher_guidance_scale`=2.0 is a step-distil"),
    ],
)
def test_bad_step_distillation_options_are_refused_naming_them(tmp_path, options, message):
    config = tiny_run(tmp_path, **{"pretrained": "x", "model_overrides": {}, "student_steps": 2, **options})
    with pytest.raises(DiTOptimumError, match=message):
        train(config)
    assert not (tmp_path / "checkpoints").exists()


def test_a_guided_round_needs_a_teacher_with_a_null_class(tmp_path):
    overrides = {**tiny_run(tmp_path).model_overrides, "class_dropout_prob": 0.0}
    unguided = train(tiny_run(tmp_path / "no-null", steps=1, model_overrides=overrides))
    with pytest.raises(DiTOptimumError, match=r"`teacher_guidance_scale`=2 needs a teacher with a null class"):
        train(round_config(tmp_path / "a", unguided, teacher_guidance_scale=2.0))


def test_the_steps_script_offers_the_options_and_trains(teacher, tmp_path, capsys):
    help_text = build_parser("steps").format_help()
    for flag in ("--student-steps", "--teacher-guidance-scale", "--student-prediction", "--pretrained"):
        assert flag in help_text
    args = ["--output-dir", str(tmp_path), "--pretrained", str(teacher), "--student-steps", "4", "--steps", "2"]
    args += ["--image-size", "8", "--batch-size", "8", "--max-samples", "8", "--teacher-guidance-scale", "1.5"]
    assert train_cli("steps", args) == 0
    assert DiTOptimumPipeline.from_pretrained(tmp_path / "pipeline").sampling_defaults["num_inference_steps"] == 4
    assert train_cli("steps", [*args[:4], "--student-steps", "3"]) == 2
    assert "`student_steps`=3" in capsys.readouterr().err


def test_the_benchmark_chains_the_rounds_and_trains_each_once(teacher, tmp_path):
    configs = []

    def recording_trainer(config):
        configs.append(config)
        return train(config)

    settings = BenchmarkSettings(
        output_dir=str(tmp_path), image_size=8, pretrained={"DiT-XS/4": str(teacher)}, training=TrainingRecipe(steps=2)
    )
    context = VariantContext(settings, "DiT-XS/4", trainer=recording_trainer)
    # the tiny teacher is not a real DiT-XS/4 (baseline() would refuse it): only its path is used here
    two = get_technique("distill-steps-2").build(context)
    four = get_technique("distill-steps-4").build(context)
    root = tmp_path / "models" / "DiT-XS-4"
    assert [Path(config.output_dir).name for config in configs] == ["distill-steps-4", "distill-steps-2"]
    first, second = configs
    assert first.pretrained == str(teacher) and (first.student_steps, first.teacher_guidance_scale) == (4, 2.0)
    assert second.pretrained == str(root / "distill-steps-4" / "pipeline") and second.student_steps == 2
    assert second.teacher_guidance_scale == 1.0 and first.steps == STEP_DISTILLATION_ROUND["steps"]
    assert two.sampling_defaults["num_inference_steps"] == 2 and four.sampling_defaults["num_inference_steps"] == 4
    assert context.trained["distill-steps-2"]["train_steps"] == STEP_DISTILLATION_ROUND["steps"]


def test_cost_only_students_carry_their_scheduler_and_sampling_defaults():
    context = UntrainedContext(BenchmarkSettings(image_size=8), "DiT-XS/4", num_classes=10)
    for name, steps in (("distill-steps-4", 4), ("distill-steps-2", 2), ("distill-steps-4+int8", 4)):
        pipeline = get_technique(name).build(context)
        assert pipeline.sampling_defaults == {"num_inference_steps": steps, "guidance_scale": 1.0}
        assert pipeline.scheduler.config.prediction_type == "v_prediction"
        batches = count_forwards(pipeline)
        pipeline([0, 1], output_type="np")
        assert batches == [2] * steps


def test_a_run_never_writes_into_the_model_it_reads(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for output in (teacher, teacher / "round"):
        config = TrainConfig(output_dir=str(output), pretrained=str(teacher), student_steps=4)
        with pytest.raises(DiTOptimumError, match=r"`output_dir`=.* is inside `pretrained`"):
            config.validate()
    assert sorted(teacher.iterdir()) == []  # nothing written
