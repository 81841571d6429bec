"""Finite numbers at every boundary (weights, sampling, schedulers, LoRA scales, the training loss, benchmark rows),
the resource checks the Python API shares with the command line, and concurrent calls to one pipeline."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

from conftest import tiny_model, tiny_pixel_pipeline, tiny_vae
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel, enable_step_cache
from dit_optimum.models.lora import lora_config
from dit_optimum.models.resources import MAX_SEED, check_resources
from dit_optimum.training import TrainConfig
from dit_optimum.training.cli import main as train_cli
from dit_optimum.training.diffusion import GaussianDiffusion

WEIGHTS = "diffusion_pytorch_model.safetensors"
BAD_NUMBERS = [float("nan"), float("inf"), -float("inf")]


def poison(path: Path, value: float) -> str:
    """Put ``value`` into one entry of one tensor of a safetensors file; returns the tensor's name."""
    state = load_file(path)
    name = sorted(key for key, tensor in state.items() if tensor.is_floating_point())[-1]
    state[name].view(-1)[0] = value
    save_file(state, path)
    return name


# --- loading weights -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=["nan", "inf", "-inf"])
def test_a_transformer_with_non_finite_weights_is_refused_naming_the_file_and_tensor(tmp_path, value):
    tiny_model().save_pretrained(tmp_path)
    name = poison(tmp_path / WEIGHTS, value)
    with pytest.raises(DiTOptimumError, match=rf"{WEIGHTS}.*not finite.*{name}"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path)


def test_a_pipeline_with_non_finite_weights_is_refused(tmp_path):
    tiny_pixel_pipeline().save_pretrained(tmp_path)
    name = poison(tmp_path / "transformer" / WEIGHTS, float("nan"))
    with pytest.raises(DiTOptimumError, match=rf"transformer.*{WEIGHTS}.*{name}"):
        DiTOptimumPipeline.from_pretrained(tmp_path)


def test_a_vae_with_non_finite_weights_is_refused(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae(tmp_path / "vae_source", channels=1))
    model = tiny_model(in_channels=4, out_channels=8)
    DiTOptimumPipeline(transformer=model, vae=vae).save_pretrained(tmp_path / "pipe")
    name = poison(tmp_path / "pipe" / "vae" / WEIGHTS, float("inf"))
    with pytest.raises(DiTOptimumError, match=rf"vae.*not finite.*{name}"):
        DiTOptimumPipeline.from_pretrained(tmp_path / "pipe")


# --- sampling --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, 10**400, 0.5, -1e300, True])
def test_guidance_scale_must_be_finite_and_representable(value):
    with pytest.raises(DiTOptimumError, match=r"`guidance_scale`=.*finite number in \[1, 3\.40282e\+38\]"):
        tiny_pixel_pipeline()([1], guidance_scale=value, num_inference_steps=2)


@pytest.mark.parametrize("value", [1e300, 1e5, float("nan")])
def test_evaluation_and_speed_options_bound_guidance_scale_before_any_work(value):
    from dit_optimum.evaluation.efficiency import SpeedSettings
    from dit_optimum.evaluation.quality import QualitySettings

    for settings in (QualitySettings(guidance_scale=value), SpeedSettings(guidance_scale=value)):
        with pytest.raises(DiTOptimumError, match=r"`guidance_scale`=.* must be a finite number in \[1, 65504\]"):
            settings.validate()


def test_samples_that_come_out_non_finite_raise_naming_the_causes():
    pipe = tiny_pixel_pipeline()
    with pytest.raises(DiTOptimumError, match=r"samples are not finite.*`guidance_scale`=1e\+30.*weights.*scheduler"):
        pipe([1, 2], guidance_scale=1e30, num_inference_steps=2, output_type="latent")
    with torch.no_grad():
        pipe.transformer.proj_out_2.bias.fill_(float("nan"))  # weights gone bad in memory
    with pytest.raises(DiTOptimumError, match="samples are not finite"):
        pipe([1], guidance_scale=1.0, num_inference_steps=2)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"beta_end": float("nan")}, "beta_end"),
        ({"beta_start": float("inf")}, "beta_start"),
        ({"beta_end": 1.5}, "beta_end"),
        ({"beta_start": -0.1}, "beta_start"),
        ({"trained_betas": [0.01, float("nan")] * 5, "num_train_timesteps": 10}, "trained_betas"),
        ({"trained_betas": [1.0] * 10, "num_train_timesteps": 10}, "trained_betas"),
    ],
)
def test_a_scheduler_with_bad_betas_is_refused_at_construction_and_at_each_call(config, key):
    with pytest.raises(DiTOptimumError, match=f"`?{key}"):
        DiTOptimumPipeline(transformer=tiny_model(in_channels=1, out_channels=2), scheduler=DDIMScheduler(**config))
    pipe = tiny_pixel_pipeline()
    pipe.scheduler = DDIMScheduler(**config)  # swapped after construction: refused before set_timesteps
    with pytest.raises(DiTOptimumError, match=f"`?{key}"):
        pipe([1], num_inference_steps=2)


def test_a_scheduler_config_value_diffusers_cannot_use_is_named_not_a_traceback():
    pipe = tiny_pixel_pipeline()
    pipe.scheduler = DDIMScheduler(timestep_spacing="sideways")
    with pytest.raises(DiTOptimumError, match=r"scheduler \(DDIMScheduler\) cannot set 2 timesteps.*sideways"):
        pipe([1], num_inference_steps=2)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": -5}, "num_train_timesteps"),
        ({"num_train_timesteps": 1.5}, "num_train_timesteps"),
        ({"beta_end": 1.5}, "beta_end"),
        ({"beta_start": -0.1}, "beta_start"),
        ({"beta_end": float("nan")}, None),  # a NaN token: not even strict JSON
        ({"beta_start": float("inf")}, None),
    ],
)
def test_a_saved_scheduler_config_with_bad_values_is_refused_naming_the_file_and_key(tmp_path, change, key):
    tiny_pixel_pipeline().save_pretrained(tmp_path)
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))  # NaN/Infinity tokens, as json writes
    with pytest.raises(DiTOptimumError, match=rf"scheduler_config\.json.*{f'`{key}`' if key else ''}"):
        DiTOptimumPipeline.from_pretrained(tmp_path)


# --- LoRA scales -----------------------------------------------------------------------------------------------


@pytest.fixture
def adapted():
    pipe = tiny_pixel_pipeline()
    pipe.transformer.add_adapter(lora_config(pipe.transformer, ["attention"], rank=2), adapter_name="a")
    return pipe


@pytest.mark.parametrize("value", [*BAD_NUMBERS, 1e300, 10**400, [float("nan")], {"transformer": float("inf")}, "1"])
def test_adapter_weights_must_be_finite_numbers(adapted, value):
    with pytest.raises(DiTOptimumError, match=r"LoRA `weights`=.*finite number"):
        adapted.transformer.set_adapters("a", weights=value)
    with pytest.raises(DiTOptimumError, match=r"LoRA `weights`=.*finite number"):
        adapted.set_adapters("a", adapter_weights=value)


@pytest.mark.parametrize("value", [*BAD_NUMBERS, 1e300, -(10**400)])
def test_lora_scale_must_be_finite(adapted, value):
    with pytest.raises(DiTOptimumError, match=r"LoRA `lora_scale`=.*finite number"):
        adapted.transformer.fuse_lora(lora_scale=value)
    with pytest.raises(DiTOptimumError, match=r"LoRA `lora_scale`=.*finite number"):
        adapted.fuse_lora(lora_scale=value)
    adapted.set_adapters("a", adapter_weights=0.5)  # finite values still work
    adapted.fuse_lora(lora_scale=0.5)
    assert all(torch.isfinite(p).all() for p in adapted.transformer.parameters())


@pytest.mark.parametrize("rank", [10**6, 33])
def test_a_lora_rank_beyond_the_layer_width_is_refused(rank):
    from peft import LoraConfig

    model = tiny_model()  # width 4 x 8 = 32
    with pytest.raises(DiTOptimumError, match=rf"LoRA rank `r`={rank} must be an integer in 1\.\.32"):
        model.add_adapter(LoraConfig(r=rank, target_modules=["to_q"]))
    with pytest.raises(DiTOptimumError, match=r"`lora_alpha`=nan"):
        model.add_adapter(LoraConfig(r=4, lora_alpha=float("nan"), target_modules=["to_q"]))
    model.add_adapter(LoraConfig(r=32, target_modules=["to_q"]))  # the width itself is allowed


# --- resource checks shared with the CLI -----------------------------------------------------------------------


def test_class_labels_are_bounded_before_they_are_read():
    pipe = tiny_pixel_pipeline()
    with pytest.raises(DiTOptimumError, match=r"`class_labels`=100000000 images.*allowed here: 1\.\.\d+.*batches"):
        pipe([1] * 10**8, num_inference_steps=2)
    huge = torch.ones(1, dtype=torch.long).expand(10**12)  # 10**12 labels, no memory behind them
    with pytest.raises(DiTOptimumError, match=r"`class_labels`=1000000000000 images"):
        pipe(huge, num_inference_steps=2)


def test_calibration_images_and_seeds_of_a_step_cache_are_bounded():
    pipe = tiny_pixel_pipeline()
    with pytest.raises(DiTOptimumError, match=r"`calibration_images`=100000000 images.*allowed here: 1\.\.\d+"):
        enable_step_cache(pipe, "block-schedule", num_inference_steps=2, calibration_images=10**8)
    with pytest.raises(DiTOptimumError, match=rf"`seed`={2**70} must be an integer in 0\.\.{MAX_SEED}"):
        enable_step_cache(pipe, "magcache", num_inference_steps=2, seed=2**70)
    assert not pipe.transformer.is_cache_enabled


@pytest.mark.parametrize("seed", [2**70, MAX_SEED + 1, -1, 1.5])
def test_seeds_outside_torch_range_are_refused_by_name(seed):
    with pytest.raises(DiTOptimumError, match=r"`seed`=.* must be an integer in 0\.\."):
        check_resources(seed=seed)
    check_resources(seed=MAX_SEED)  # torch's largest seed is fine
    torch.Generator().manual_seed(MAX_SEED)


def test_evaluation_seeds_leave_room_for_one_per_sample():
    from dit_optimum.evaluation.quality import QualitySettings

    with pytest.raises(DiTOptimumError, match=r"`seed`=.*seed \+ i seeds each of the 250 samples"):
        QualitySettings(seed=MAX_SEED - 10).validate()
    with pytest.raises(DiTOptimumError, match="`seed`"):
        QualitySettings(seed=2**70).validate()


def test_the_demo_refuses_a_seed_beyond_torch_range_by_name():
    from dit_optimum.hub.demo import DemoModels

    with pytest.raises(DiTOptimumError, match=r"`seed`=1180591620717411303424 must be an integer in 0\.\."):
        DemoModels(["unused"]).generate("1", 2, 1.0, 2**70, ["unused"])


def test_the_cli_batch_checks_and_the_api_checks_are_one_function():
    from dit_optimum.models.transformer import check_activation_memory

    config = tiny_model().config
    with pytest.raises(DiTOptimumError, match=r"`batch_size`=10000000000 images.*GiB of activations.*allowed here"):
        check_activation_memory(config, 10**10, "batch_size")
    with pytest.raises(DiTOptimumError, match=r"`image_size` \(--image-size\)=1000000 .*allowed here: 2\.\.\d+"):
        check_resources(config, image_size=10**6, images=8, training=True, parameter="image_size (--image-size)")


# --- training --------------------------------------------------------------------------------------------------


def tiny_args(output: Path, *extra: str) -> list[str]:
    tiny = ["--model", "DiT-XS/4", "--model-config", '{"num_layers": 2}', "--image-size", "8", "--batch-size", "8"]
    return ["--output-dir", str(output), *tiny, "--max-samples", "8", "--log-every", "1", "--ema-decay", "0.9", *extra]


@pytest.mark.parametrize("lr", ["1e30", "nan", "inf", "0", "-1e-3", "1.5"])
def test_the_learning_rate_is_bounded_naming_the_option(tmp_path, capsys, lr):
    assert train_cli("base", tiny_args(tmp_path / "run", f"--lr={lr}", "--steps", "1")) == 2
    assert "`learning_rate` (--lr)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_huge_image_size_is_refused_before_data_is_read(tmp_path, capsys):
    argv = tiny_args(tmp_path / "run", "--steps", "1")
    argv[argv.index("--image-size") + 1] = "1000000"
    assert train_cli("base", argv) == 2
    assert "`image_size` (--image-size)=1000000" in capsys.readouterr().err
    with pytest.raises(DiTOptimumError, match=r"image_size.*allowed here"):
        TrainConfig(output_dir=str(tmp_path / "x"), image_size=10**6).validate()


def test_a_lora_rank_beyond_the_base_width_is_refused_by_the_script(tmp_path, capsys):
    tiny_pixel_pipeline().save_pretrained(tmp_path / "base")
    argv = ["--output-dir", str(tmp_path / "run"), "--pretrained", str(tmp_path / "base"), "--image-size", "8"]
    argv += ["--batch-size", "8", "--steps", "1", "--max-samples", "8", "--lora-rank", "1000000"]
    assert train_cli("lora", argv) == 2
    assert "LoRA rank `r`=1000000 must be an integer in 1..32" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pipeline").exists()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_diverged_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    common = ["--lr", "1e-3", "--checkpoint-every", "2"]
    assert train_cli("base", tiny_args(run, *common, "--steps", "2")) == 0
    good, saved = digest(run / "checkpoints" / "step_2"), digest(run / "pipeline" / "transformer")

    original = GaussianDiffusion.losses
    calls = itertools.count(1)

    def diverging(self, *args, **kwargs):  # the loss turns NaN at the 2nd step of the resumed run: step 4
        terms = original(self, *args, **kwargs)
        if next(calls) >= 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianDiffusion, "losses", diverging)
    capsys.readouterr()
    assert train_cli("base", tiny_args(run, *common, "--steps", "6", "--resume")) == 2
    error = capsys.readouterr().err
    assert "loss is not finite" in error and "at step 4" in error and "`learning_rate` (--lr)" in error
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]  # nothing saved after the NaN
    assert digest(run / "checkpoints" / "step_2") == good
    assert digest(run / "pipeline" / "transformer") == saved  # the NaN pipeline was not saved over the good one
    with (run / "train_log.csv").open() as stream:  # no NaN row logged
        assert all(math.isfinite(float(row["loss"])) for row in csv.DictReader(stream))

    monkeypatch.setattr(GaussianDiffusion, "losses", original)
    assert train_cli("base", tiny_args(run, *common, "--steps", "4", "--resume")) == 0  # the checkpoint loads
    pipe = DiTOptimumPipeline.from_pretrained(run / "pipeline")
    assert torch.isfinite(pipe([1], num_inference_steps=2, output_type="pt").images).all()


# --- benchmark rows --------------------------------------------------------------------------------------------


def strict_json(text: str) -> dict:
    def refuse(token: str):
        raise ValueError(f"{token} is not strict JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_benchmark_cell_with_a_non_finite_metric_is_a_failed_cell_with_strict_json(tmp_path, monkeypatch):
    from dit_optimum.benchmark import runner
    from dit_optimum.benchmark.settings import BenchmarkSettings

    measured = {"class_accuracy": float("nan"), "latency_s": 0.1, "range": [1.0, float("inf")]}
    ran = []

    def stand_in_cell(settings, context, name, scorers, state):  # the runner's own checks and writes still run
        ran.append(name)
        return {"variant": context.variant, "technique": name, "status": "ok", **measured}

    monkeypatch.setattr(runner, "_run_cell", stand_in_cell)
    settings = BenchmarkSettings(output_dir=str(tmp_path / "b"), techniques=("baseline",), speed_only=True)
    (row,) = runner.run_benchmark(settings)
    assert row["status"] == "failed"
    assert "non-finite metric" in row["error"] and "class_accuracy=nan" in row["error"]
    assert "range[1]=inf" in row["error"]
    assert "class_accuracy" not in row and "range" not in row and row["latency_s"] == 0.1
    (stored,) = strict_json((tmp_path / "b" / "results.json").read_text())["rows"]
    assert stored["status"] == "failed" and "class_accuracy" not in stored

    # a finished row hand-edited to NaN is not finished: the cell runs again
    measured.update(class_accuracy=0.5, range=[1.0, 2.0])
    assert runner.run_benchmark(settings)[0]["status"] == "ok"
    path = tmp_path / "b" / "results.json"
    results = strict_json(path.read_text())
    results["rows"][0]["latency_s"] = float("nan")
    path.write_text(json.dumps(results))
    ran.clear()
    try:
        rows = runner.run_benchmark(settings)
    except DiTOptimumError as error:  # or the results file is refused as not strict JSON, naming it
        assert "results.json" in str(error)
    else:
        assert ran == ["baseline"] and rows[0]["status"] == "ok" and rows[0]["latency_s"] == 0.1
        strict_json(path.read_text())


# --- concurrency -----------------------------------------------------------------------------------------------


def sample(pipe, label: int, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(label)
    return pipe([label], guidance_scale=2.0, num_inference_steps=steps, generator=generator, output_type="pt").images


def test_two_threads_sharing_one_pipeline_get_the_images_they_would_get_alone():
    pipe = tiny_pixel_pipeline()
    requests = [(1, 3), (2, 9)]  # different step counts: the scheduler's state is per call
    alone = [sample(pipe, label, steps) for label, steps in requests]

    def request(barrier: threading.Barrier, results: dict, index: int, label: int, steps: int) -> None:
        barrier.wait()
        results[index] = sample(pipe, label, steps)

    for _round in range(3):
        barrier, results = threading.Barrier(len(requests)), {}
        threads = [threading.Thread(target=request, args=(barrier, results, i, *r)) for i, r in enumerate(requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert all(torch.equal(results[i], alone[i]) for i in range(len(requests)))


def test_two_demo_requests_sharing_one_pipeline_get_their_own_images(tmp_path):
    from dit_optimum.hub.demo import DemoModels

    tiny_pixel_pipeline().save_pretrained(tmp_path / "pipe")
    models = DemoModels([str(tmp_path / "pipe")])
    requests = [("3", 2, 1.0, 5), ("7", 8, 2.0, 6)]
    alone = [models.generate(*request, models.sources)[0][0][0] for request in requests]
    barrier, results = threading.Barrier(2), {}

    def request(index: int) -> None:
        barrier.wait()
        results[index] = models.generate(*requests[index], models.sources)[0][0][0]

    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [list(results[i].getdata()) for i in range(2)] == [list(image.getdata()) for image in alone]
