"""Trainer: overfitting, exact resume after a kill, two processes, MoE and distillation, data errors."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from conftest import tiny_vae
from dit_optimum import DiTOptimumPipeline
from dit_optimum.data import load_training_data
from dit_optimum.training import TrainConfig, train
from dit_optimum.training.cli import main as train_cli
from dit_optimum.training.diffusion import GaussianDiffusion

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_layers": 2}


def cli_args(*extra: str) -> list[str]:
    """Command-line options of a tiny run (2-block DiT-XS/4 on 8x8 digits) plus ``extra``."""
    tiny = ["--model", "DiT-XS/4", "--model-config", '{"num_layers": 2}', "--image-size", "8", "--batch-size", "8"]
    return [*tiny, "--lr", "1e-3", "--log-every", "1", "--ema-decay", "0.9", *extra]


def tiny_run(output_dir, **overrides) -> TrainConfig:
    options = {
        "output_dir": str(output_dir),
        "model": "DiT-XS/4",
        "model_overrides": dict(TINY),
        "image_size": 8,
        "steps": 60,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "log_every": 1,
        "checkpoint_every": 1000,
        "max_samples": 8,
        "ema_decay": 0.9,
    }
    return TrainConfig(**{**options, **overrides})


def losses(output_dir, column="loss") -> list[float]:
    with (Path(output_dir) / "train_log.csv").open() as stream:
        return [float(row[column]) for row in csv.DictReader(stream)]


def decreased(values: list[float]) -> bool:
    return sum(values[-10:]) / 10 < 0.6 * sum(values[:10]) / 10


def test_base_training_overfits_a_fixed_batch_and_saves_a_loadable_pipeline(tmp_path):
    pipeline_dir = train(tiny_run(tmp_path))
    assert decreased(losses(tmp_path))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    assert pipe.labels["7"] == 7
    images = pipe([1, 2], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_moe_training_overfits_and_logs_routing(tmp_path):
    overrides = {**TINY, "moe_num_experts": 4, "moe_top_k": 2, "moe_router_z_loss_weight": 0.001}
    pipeline_dir = train(tiny_run(tmp_path, model_overrides=overrides))
    assert decreased(losses(tmp_path))
    loads = losses(tmp_path, "block_0/max_over_mean_load")
    assert all(1 <= value <= 4 for value in loads)
    statistics = (pipeline_dir / "routing_statistics.json").read_text()
    assert "cumulative_load" in statistics
    model = DiTOptimumPipeline.from_pretrained(pipeline_dir).transformer
    assert model.transformer_blocks[0].ff.routing_counts.sum() > 0


def test_distillation_reduces_the_teacher_gap_with_feature_loss(tmp_path):
    teacher_dir = train(tiny_run(tmp_path / "teacher", steps=20))
    student = tiny_run(
        tmp_path / "student",
        model="DiT-XS/4",
        model_overrides={"num_layers": 1, "attention_head_dim": 32},
        teacher=str(teacher_dir),
        alpha=0.3,
        feature_blocks=[0],
        steps=40,
    )
    train(student)
    assert decreased(losses(tmp_path / "student", "distill"))
    assert losses(tmp_path / "student", "feature")[-1] < losses(tmp_path / "student", "feature")[0]


def test_feature_distillation_needs_the_teachers_patch_size(tmp_path):
    # block outputs of patch 2 and patch 4 have other token counts: refused naming both, before any step
    from dit_optimum import DiTOptimumError, DiTOptimumTransformer2DModel
    from dit_optimum.training.distillation import Distillation

    sizes = {"sample_size": 8, "in_channels": 1, "num_classes": 10}
    teacher = DiTOptimumTransformer2DModel.from_preset("DiT-XS/2", num_layers=2, **sizes)
    DiTOptimumPipeline(transformer=teacher).save_pretrained(tmp_path / "teacher")
    student = DiTOptimumTransformer2DModel.from_preset("DiT-XS/4", num_layers=1, **sizes)
    config = tiny_run(tmp_path / "student", teacher=str(tmp_path / "teacher"), feature_blocks=[0])
    with pytest.raises(DiTOptimumError, match=r"`patch_size`=4 .* `patch_size`=2"):
        Distillation(config, student)
    outputs_only = Distillation(tiny_run(tmp_path / "outputs", teacher=str(tmp_path / "teacher")), student)
    assert outputs_only.student_taps is None


def test_diffusion_loss_terms():
    diffusion = GaussianDiffusion()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, noise)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float()
    torch.testing.assert_close(
        x_t, alpha_bar.sqrt()[:, None, None, None] * x0 + (1 - alpha_bar).sqrt()[:, None, None, None] * noise
    )
    perfect = diffusion.losses(torch.cat([noise, torch.zeros_like(noise)], 1), x0, x_t, t, noise)
    assert torch.all(perfect["mse"] == 0) and torch.all(perfect["vb"] >= 0)
    eps_only = diffusion.losses(noise + 1, x0, x_t, t, noise)
    torch.testing.assert_close(eps_only["loss"], torch.ones(4))


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before the checkpoint appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    common = cli_args("--max-samples", "24", "--checkpoint-every", "10")
    assert train_cli("base", ["--output-dir", str(tmp_path / "reference"), "--steps", "40", *common]) == 0
    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--output-dir",
        str(tmp_path / "killed"),
        "--steps",
        "100000",
        *common,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(tmp_path / "killed" / "checkpoints" / "step_10", process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    latest = max(int(p.name[5:]) for p in (tmp_path / "killed" / "checkpoints").glob("step_*"))
    assert latest < 40 and not list((tmp_path / "killed" / "checkpoints").glob(".*tmp"))
    assert train_cli("base", ["--output-dir", str(tmp_path / "killed"), "--steps", "40", "--resume", *common]) == 0
    reference = DiTOptimumPipeline.from_pretrained(tmp_path / "reference" / "pipeline").transformer.state_dict()
    resumed = DiTOptimumPipeline.from_pretrained(tmp_path / "killed" / "pipeline").transformer.state_dict()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")


def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
    common = cli_args("--max-samples", "16", "--steps", "12")
    assert train_cli("base", ["--output-dir", str(tmp_path / "one"), *common]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, str(ROOT / "scripts" / "train.py"), "--output-dir", str(tmp_path / "two"), *common],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 12
    # same global batches, timesteps and noise: the curves agree up to floating-point reduction order
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 1e-3
    assert (tmp_path / "two" / "pipeline" / "model_index.json").is_file()


def test_image_folder_errors_name_the_file_and_skip_counts(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (12, 12), color=(10, 200, 30)).save(tmp_path / label / "ok.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Unreadable image .*broken\.png"):
        load_training_data(str(tmp_path), image_size=8, channels=3)
    data = load_training_data(str(tmp_path), image_size=8, channels=3, skip_corrupt=True)
    assert data.skipped == 1 and data.samples.shape == (2, 3, 8, 8) and data.id2label == {0: "cat", 1: "dog"}
    assert data.samples.min() >= -1 and data.samples.max() <= 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": -2}, "batch_size"),
        ({"mixed_precision": "fp8"}, r"mixed_precision.*no, bf16, fp16"),
        ({"alpha": 1.5}, "alpha"),
        ({"feature_blocks": [0]}, "teacher"),
        ({"channels": 2}, "channels"),
        ({"max_samples": 0}, "max_samples"),
    ],
)
def test_bad_training_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_run(tmp_path, **overrides))


def test_latent_training_via_extracted_features(tmp_path):
    from dit_optimum.training.cli import extract_main

    tiny_vae(tmp_path / "vae")
    code = extract_main(
        [
            "--data",
            "digits",
            "--vae",
            str(tmp_path / "vae"),
            "--output-dir",
            str(tmp_path / "latents"),
            "--image-size",
            "16",
            "--channels",
            "1",
        ]
    )
    assert code == 0
    pipeline_dir = train(tiny_run(tmp_path / "run", data=str(tmp_path / "latents"), steps=3, model="DiT-XS/2"))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    assert type(pipe.vae).__name__ == "AutoencoderKL" and pipe.transformer.config.in_channels == 4
    images = pipe([3], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1)


def test_bf16_mixed_precision_and_gradient_checkpointing_run(tmp_path):
    train(tiny_run(tmp_path, steps=3, mixed_precision="bf16", gradient_checkpointing=True))
    assert len(losses(tmp_path)) == 3 and all(value == value for value in losses(tmp_path))


def test_a_finished_run_continues_with_resume_and_is_not_overwritten_without(tmp_path):
    train(tiny_run(tmp_path, steps=3))
    with pytest.raises(ValueError, match=r"already holds checkpoints \(step_3\).*resume"):
        train(tiny_run(tmp_path, steps=4))
    train(tiny_run(tmp_path, steps=5, resume=True))  # continues from the final checkpoint at step 3
    assert [int(v) for v in losses(tmp_path, "step")] == [1, 2, 3, 4, 5]


def test_ema_follows_the_weights_with_warmup():
    from dit_optimum.training import EMA

    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    initial = ema.model.weight.clone()
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.1 * initial + 0.9)
    assert ema.updates == 1 and ema.current_decay() == pytest.approx(2 / 11)
    constant = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    constant.update(model)
    assert torch.allclose(constant.model.weight, torch.full((2, 2), 2.0))
    state = constant.state_dict()
    restored = EMA(torch.nn.Linear(2, 2), decay=0.9)
    restored.load_state_dict(state)
    assert restored.decay == 0.5 and not restored.warmup and torch.equal(restored.model.weight, constant.model.weight)
