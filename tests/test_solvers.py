"""Fewer sampling steps: a pipeline's recorded sampling defaults (saved, reloaded, used by calls), the solver
techniques (each samples with its scheduler at its steps and reloads with them), the benchmark measuring a solver
cell at its own steps, and the card's loading code passing them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler

from conftest import TinyFeatureExtractor, tiny_autoencoder, tiny_model, tiny_pixel_pipeline
from dit_optimum import DiTOptimumError, DiTOptimumPipeline
from dit_optimum.benchmark import load_results, run_benchmark
from dit_optimum.evaluation import efficiency
from dit_optimum.evaluation.efficiency import SpeedSettings, efficiency_metrics
from dit_optimum.evaluation.sampling import sampling_options
from dit_optimum.hub.cards import loading_code
from dit_optimum.models.transformer import is_quantized
from dit_optimum.pipelines.dit import check_scheduler, scheduler_config_problem
from dit_optimum.techniques.registry import SOLVER_TECHNIQUES, get_technique
from dit_optimum.techniques.solvers import SOLVERS, scales_initial_noise, solver_scheduler, with_solver
from test_benchmark import tiny_settings

LABELS = [1, 7, 3]


def latent_pipeline() -> DiTOptimumPipeline:
    """A pipeline diffusers' own classes can hold (a diffusers VAE): it saves in the stock format."""
    pipe = DiTOptimumPipeline(
        transformer=tiny_model(), vae=tiny_autoencoder(channels=3, levels=1, sample_size=16), scheduler=DDIMScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **options) -> np.ndarray:
    generators = [torch.Generator().manual_seed(index) for index in range(len(LABELS))]
    return pipe(LABELS, generator=generators, output_type="np", **options).images


class Forwards:
    """Counts the transformer's forward calls (and the batch of each) while active."""

    def __init__(self, pipe):
        self.batches = []
        self.handle = pipe.transformer.register_forward_hook(lambda m, args, out: self.batches.append(len(args[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class SolverContext:
    """A TechniqueContext whose baseline is a tiny random pixel pipeline (a fresh copy each time)."""

    def __init__(self):
        self.base = tiny_pixel_pipeline()

    def baseline(self):
        return DiTOptimumPipeline(
            transformer=self.base.transformer, vae=None, scheduler=DDIMScheduler.from_config(self.base.scheduler.config)
        )

    def baseline_config(self):
        return self.base.transformer.config


# --- the pipeline's recorded sampling defaults ---------------------------------------------------------------------


@pytest.mark.parametrize("stock_format", [None, False])
def test_sampling_defaults_survive_both_loaders_with_the_same_images(tmp_path, stock_format):
    pipe = latent_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_sampling_defaults(num_inference_steps=4, guidance_scale=2.0)
    assert pipe.sampling_defaults == {"num_inference_steps": 4, "guidance_scale": 2.0}
    pipe.save_pretrained(tmp_path, stock_format=stock_format)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["num_inference_steps"] == 4 and index["guidance_scale"] == 2.0
    assert (index["transformer"][0] == "diffusers") == (stock_format is None)
    expected = sample(pipe)

    ours = DiTOptimumPipeline.from_pretrained(tmp_path)
    ours.set_progress_bar_config(disable=True)
    assert ours.sampling_defaults == {"num_inference_steps": 4, "guidance_scale": 2.0}
    assert isinstance(ours.scheduler, DPMSolverMultistepScheduler)
    np.testing.assert_array_equal(sample(ours), expected)  # the recorded steps and guidance, not 50 and 4.0

    # plain diffusers tolerates the extra keys (it logs that DiTPipeline ignores them): pass them explicitly
    plain = DiffusionPipeline.from_pretrained(tmp_path)
    plain.set_progress_bar_config(disable=True)
    assert type(plain).__name__ == "DiTPipeline" and isinstance(plain.scheduler, DPMSolverMultistepScheduler)
    np.testing.assert_array_equal(sample(plain, num_inference_steps=4, guidance_scale=2.0), expected)


def test_a_pipeline_without_defaults_writes_no_sampling_keys(tmp_path):
    pipe = tiny_pixel_pipeline()
    assert pipe.sampling_defaults == {}
    pipe.set_sampling_defaults(num_inference_steps=3)
    pipe.set_sampling_defaults()  # records exactly what it is given: nothing
    assert pipe.sampling_defaults == {}
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert "num_inference_steps" not in index and "guidance_scale" not in index
    assert DiTOptimumPipeline.from_pretrained(tmp_path).sampling_defaults == {}


def test_a_call_without_steps_or_guidance_uses_the_recorded_ones():
    pipe = tiny_pixel_pipeline()
    with Forwards(pipe) as forwards:
        pipe([0, 1], output_type="np")
    assert forwards.batches == [4] * 50  # diffusers' DiTPipeline defaults: 50 steps, guidance 4.0 (batch doubled)

    pipe.set_sampling_defaults(num_inference_steps=4, guidance_scale=1.0)
    with Forwards(pipe) as forwards:
        pipe([0, 1], output_type="np")
    assert forwards.batches == [2] * 4  # 4 steps, unguided
    with Forwards(pipe) as forwards:
        pipe([0, 1], num_inference_steps=2, guidance_scale=3.0, output_type="np")
    assert forwards.batches == [4] * 2  # a call's own values win

    pipe.set_sampling_defaults(num_inference_steps=3)  # guidance not recorded: diffusers' 4.0
    with Forwards(pipe) as forwards:
        pipe([0, 1], output_type="np")
    assert forwards.batches == [4] * 3

    copied = __import__("copy").deepcopy(pipe)
    assert copied.sampling_defaults == {"num_inference_steps": 3}


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"num_inference_steps": 0}, r"`num_inference_steps`=0 .*integer in 1\.\.1000"),
        ({"num_inference_steps": 1001}, r"`num_inference_steps`=1001 .*integer in 1\.\.1000"),
        ({"num_inference_steps": 2.5}, r"`num_inference_steps`=2\.5"),
        ({"num_inference_steps": True}, r"`num_inference_steps`=True"),
        ({"num_inference_steps": "5"}, r"`num_inference_steps`='5'"),
        ({"guidance_scale": 0.5}, r"`guidance_scale`=0\.5 .*finite number in \[1, 65504\]"),
        ({"guidance_scale": math.nan}, r"`guidance_scale`=nan"),
        ({"guidance_scale": math.inf}, r"`guidance_scale`=inf"),
        ({"guidance_scale": 1e9}, r"`guidance_scale`=1000000000\.0"),
        ({"guidance_scale": "2"}, r"`guidance_scale`='2'"),
    ],
)
def test_bad_sampling_defaults_are_refused_naming_the_parameter(options, pattern):
    pipe = tiny_pixel_pipeline()
    pipe.set_sampling_defaults(num_inference_steps=7)
    with pytest.raises(DiTOptimumError, match=pattern):
        pipe.set_sampling_defaults(**options)
    assert pipe.sampling_defaults == {"num_inference_steps": 7}  # unchanged
    with pytest.raises(DiTOptimumError, match=pattern):
        DiTOptimumPipeline(transformer=pipe.transformer, vae=None, **options)


@pytest.mark.parametrize(
    ("key", "value"), [("num_inference_steps", 0), ("guidance_scale", 0.5), ("guidance_scale", "x")]
)
def test_a_saved_folder_with_a_bad_default_is_refused_as_it_loads(tmp_path, key, value):
    tiny_pixel_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, key: value}))
    with pytest.raises(DiTOptimumError, match=f"`{key}`={value!r} cannot be a sampling default"):
        DiTOptimumPipeline.from_pretrained(tmp_path)


def test_guidance_above_1_needs_a_null_class():
    pipe = DiTOptimumPipeline(transformer=tiny_model(class_dropout_prob=0.0), vae=None)
    with pytest.raises(DiTOptimumError, match=r"`guidance_scale`=2\.0 .*null class.*allowed values: None or 1"):
        pipe.set_sampling_defaults(guidance_scale=2.0)
    pipe.set_sampling_defaults(guidance_scale=1.0)
    assert pipe.sampling_defaults == {"guidance_scale": 1.0}


def test_sampling_options_prefer_the_recorded_values():
    pipe = tiny_pixel_pipeline()
    assert sampling_options(pipe, 10, 2.0) == (10, 2.0)
    pipe.set_sampling_defaults(num_inference_steps=4)
    assert sampling_options(pipe, 10, 2.0) == (4, 2.0)
    pipe.set_sampling_defaults(num_inference_steps=4, guidance_scale=1.0)
    assert sampling_options(pipe, 10, 2.0) == (4, 1.0)


# --- the solver techniques -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOLVER_TECHNIQUES))
def test_each_solver_technique_samples_at_its_steps_and_reloads_with_them(tmp_path, name):
    solver_name, steps = SOLVER_TECHNIQUES[name]
    solver = SOLVERS[solver_name]
    technique = get_technique(name)
    assert f"{steps} steps" in technique.description and solver.scheduler in technique.description
    context = SolverContext()
    pipe = technique.build(context)
    assert type(pipe.scheduler).__name__ == solver.scheduler
    assert pipe.sampling_defaults == {"num_inference_steps": steps}
    # the baseline's noise schedule, the solver's options
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert pipe.scheduler.config[key] == context.base.scheduler.config[key]
    for key, value in solver.options.items():
        assert pipe.scheduler.config[key] == value, key
    assert isinstance(context.base.scheduler, DDIMScheduler)  # the baseline's own scheduler is untouched
    check_scheduler(pipe.scheduler)

    pipe.set_progress_bar_config(disable=True)
    with Forwards(pipe) as forwards:
        images = sample(pipe, guidance_scale=2.0)
    assert len(forwards.batches) == solver.evaluations(steps)  # Heun: 2 per step, 1 on the last
    if name.startswith("solver-heun"):
        assert len(forwards.batches) == 2 * steps - 1
    assert np.isfinite(images).all() and images.std() > 0

    pipe.save_pretrained(tmp_path)
    loaded = DiTOptimumPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.sampling_defaults == {"num_inference_steps": steps}
    for key, value in solver.options.items():
        assert loaded.scheduler.config[key] == value, key
    np.testing.assert_allclose(sample(loaded, guidance_scale=2.0), images, atol=1e-6)


def test_sigma_schedulers_start_from_scaled_noise():
    # Euler / Heun start from noise of their largest sigma; without the scaling the images are the same as with
    # unscaled noise, which the stock pipeline would use (and which a trained model cannot denoise)
    assert scales_initial_noise("EulerDiscreteScheduler") and scales_initial_noise("HeunDiscreteScheduler")
    assert not scales_initial_noise("DDIMScheduler") and not scales_initial_noise("DPMSolverMultistepScheduler")
    assert not scales_initial_noise("NoSuchScheduler") and not scales_initial_noise("os.system")
    assert not scales_initial_noise("DiTPipeline")  # a name that is not a scheduler is never built
    pipe = with_solver(tiny_pixel_pipeline(), "euler", 3)
    pipe.set_progress_bar_config(disable=True)
    first = []
    with torch.no_grad():
        handle = pipe.transformer.register_forward_hook(lambda m, args, out: first.append(args[0].clone()))
        pipe.scheduler.set_timesteps(3)
        sigma = float(pipe.scheduler.init_noise_sigma)
        sample(pipe, guidance_scale=1.0)
        handle.remove()
    noise = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    # the transformer's first input is the scaled noise divided by sqrt(sigma^2 + 1) (scale_model_input)
    expected = noise * sigma / math.sqrt(sigma**2 + 1)
    assert sigma > 10
    torch.testing.assert_close(first[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp-2m"])
def test_solver_sampling_is_diffusers_reference_loop(name):
    # the loop every diffusers pipeline runs: noise scaled by init_noise_sigma, the model fed the scaled input,
    # `step` given the sample itself (Euler / Heun differ from DDIM in both)
    pipe = with_solver(tiny_pixel_pipeline(), name, 3)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    latents = pipe(LABELS, guidance_scale=1.0, generator=generator, output_type="latent").images
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    sample = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    labels = torch.tensor(LABELS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            scaled = scheduler.scale_model_input(sample, t)
            output = pipe.transformer(scaled, timestep=t[None].expand(3), class_labels=labels).sample[:, :1]
            sample = scheduler.step(output, t, sample).prev_sample
    torch.testing.assert_close(latents, sample, rtol=1e-5, atol=1e-5)


def test_a_clipping_schedule_gives_a_clipping_solver():
    clipping = DDIMScheduler(clip_sample=True).config
    for name in ("dpmpp-2m", "dpmpp-3m", "unipc", "deis"):
        scheduler = solver_scheduler(clipping, name)
        assert scheduler.config.thresholding and scheduler.config.sample_max_value == 1.0
        assert not solver_scheduler(DDIMScheduler(clip_sample=False).config, name).config.thresholding
    assert solver_scheduler(clipping, "heun").config.clip_sample  # Heun clips as DDIM does
    assert not solver_scheduler(clipping, "dpmpp-2m", thresholding=False).config.thresholding


def test_with_solver_shares_the_model_and_keeps_labels():
    base = DiTOptimumPipeline(transformer=tiny_model(), vae=None, id2label={0: "zero", 1: "one"})
    solved = with_solver(base, "dpmpp-2m", 5, guidance_scale=1.5)
    assert solved.transformer is base.transformer and solved.config.id2label == base.config.id2label
    assert solved.sampling_defaults == {"num_inference_steps": 5, "guidance_scale": 1.5}
    assert base.sampling_defaults == {} and isinstance(base.scheduler, DDIMScheduler)
    linspace = with_solver(base, "dpmpp-2m", 5, timestep_spacing="linspace")  # options replace the solver's
    assert linspace.scheduler.config.timestep_spacing == "linspace" and linspace.scheduler.config.solver_order == 2
    with pytest.raises(DiTOptimumError, match="Unknown solver 'nope'; allowed values: dpmpp-2m, dpmpp-3m"):
        with_solver(base, "nope", 5)
    with pytest.raises(DiTOptimumError, match="`num_inference_steps`=0"):
        with_solver(base, "unipc", 0)


def test_the_scheduler_validator_knows_every_solver():
    for solver in SOLVERS.values():
        scheduler = getattr(__import__("diffusers"), solver.scheduler)()
        assert scheduler_config_problem(scheduler.config, solver.scheduler) is None
    assert "`solver_type`='nope'" in scheduler_config_problem({"solver_type": "nope"}, "UniPCMultistepScheduler")
    assert "`algorithm_type`='nope'" in scheduler_config_problem({"algorithm_type": "nope"}, "DEISMultistepScheduler")
    assert "`beta_schedule`='nope'" in scheduler_config_problem({"beta_schedule": "nope"}, "HeunDiscreteScheduler")


def test_the_quantized_solver_stack_keeps_its_scheduler_and_steps(tmp_path):
    pipe = get_technique("int8+solver-dpmpp-2m-5").build(SolverContext())
    assert is_quantized(pipe.transformer) and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.sampling_defaults == {"num_inference_steps": 5}
    pipe.set_progress_bar_config(disable=True)
    with Forwards(pipe) as forwards:
        pipe([0, 1], guidance_scale=2.0, output_type="np")
    assert len(forwards.batches) == 5


# --- measuring and releasing a solver cell -------------------------------------------------------------------------


def test_speed_is_measured_at_the_cells_own_steps(monkeypatch):
    calls = []
    original = efficiency.generate_images

    def recording(pipe, indices, steps, guidance, seed):
        calls.append((type(pipe.scheduler).__name__, steps, guidance))
        return original(pipe, indices, steps, guidance, seed)

    monkeypatch.setattr(efficiency, "generate_images", recording)
    reference = tiny_pixel_pipeline()
    solved = with_solver(reference, "unipc", 3)
    solved.set_progress_bar_config(disable=True)
    settings = SpeedSettings(batch_size=2, forward_batch_size=2, num_inference_steps=6, guidance_scale=2.0, warmup=0)
    result = efficiency_metrics(solved, settings, reference)
    assert set(calls) == {("UniPCMultistepScheduler", 3, 2.0), ("DDIMScheduler", 6, 2.0)}
    assert result["speed_settings"]["num_inference_steps"] == 3 and result["sampler"] == "UniPCMultistepScheduler"
    assert settings.num_inference_steps == 6  # the run's settings are not changed


def test_a_benchmark_row_of_a_solver_cell_records_its_sampling(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    settings = tiny_settings(out, ("baseline", "solver-dpmpp-2m-3"))
    rows = run_benchmark(settings, TinyFeatureExtractor())
    assert [row["status"] for row in rows] == ["ok", "ok"], [row.get("error") for row in rows]
    base, solver = load_results(out)["rows"]  # read back through the results schema
    assert base["sampling_steps"] == 2 and "sampling_defaults" not in base
    assert base["quality_settings"]["num_inference_steps"] == 2 and base["sampler"] == "DDIMScheduler"
    assert solver["sampling_steps"] == 3 and solver["sampling_defaults"] == {"num_inference_steps": 3}
    assert solver["quality_settings"]["num_inference_steps"] == 3
    assert solver["quality_settings"]["guidance_scale"] == settings.quality.guidance_scale
    assert solver["speed_settings"]["num_inference_steps"] == 3 and solver["sampler"] == "DPMSolverMultistepScheduler"
    assert solver["quality_settings"]["seed"] == base["quality_settings"]["seed"]  # the paired test's samples
    assert set(solver["vs_baseline"]) == {"fid", "kid"}

    code = loading_code("org/x", solver)
    assert "num_inference_steps=3, guidance_scale=1.5" in code
    assert "# this release samples with DPMSolverMultistepScheduler at 3 steps, guidance 1.5" in code
    compile(code, "card", "exec")


def test_the_loading_code_of_a_sigma_solver_loads_the_package_pipeline():
    row = {"sampler": "HeunDiscreteScheduler", "sampling_defaults": {"num_inference_steps": 3}}
    row["quality_settings"] = {"num_inference_steps": 3, "guidance_scale": 2.0}
    code = loading_code("org/x", row, None)
    assert "import dit_optimum" in code and 'DiTOptimumPipeline.from_pretrained("org/x")' in code
    assert "HeunDiscreteScheduler at 3 steps" in code and "num_inference_steps=3, guidance_scale=2.0" in code
    compile(code, "card", "exec")
    plain = loading_code("org/x", {"sampler": "DDIMScheduler", "quality_settings": row["quality_settings"]}, None)
    assert "dit_optimum" not in plain and "# this release samples" not in plain
    with pytest.raises(DiTOptimumError, match="sampling_defaults"):
        loading_code("org/x", {"sampling_defaults": {"num_inference_steps": "3); import os"}})


def test_a_sigma_scaled_solver_is_not_saved_in_the_stock_format_where_diffusers_would_sample_it_wrongly(tmp_path):
    from dit_optimum.models.stock import stock_format_problem

    pipe = latent_pipeline()
    assert stock_format_problem(pipe) is None  # DDIM: diffusers' own format
    euler = with_solver(pipe, "euler", 5)
    assert "init_noise_sigma" in stock_format_problem(euler)
    with pytest.raises(DiTOptimumError, match="init_noise_sigma"):
        euler.save_pretrained(tmp_path / "stock", stock_format=True)
    euler.save_pretrained(tmp_path / "auto")  # the package's format instead
    index = json.loads((tmp_path / "auto" / "model_index.json").read_text())
    assert index["transformer"][0] == "dit_optimum" and index["scheduler"][1] == "EulerDiscreteScheduler"


def test_a_folder_whose_defaults_no_longer_fit_its_scheduler_is_not_written(tmp_path):
    pipe = latent_pipeline()
    pipe.set_sampling_defaults(num_inference_steps=900)
    pipe.scheduler = DDIMScheduler(num_train_timesteps=100)  # replaced after the defaults were recorded
    with pytest.raises(DiTOptimumError, match=r"Not saved: .*num_inference_steps.*1\.\.100"):
        pipe.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    pipe.set_sampling_defaults(num_inference_steps=50)
    pipe.save_pretrained(tmp_path / "out")
    assert DiTOptimumPipeline.from_pretrained(tmp_path / "out").sampling_defaults == {"num_inference_steps": 50}


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda pipe: with_solver(pipe, ["unipc"], 5), r"Unknown solver \['unipc'\]; allowed values: dpmpp-2m"),
        (
            lambda pipe: with_solver(pipe, "dpmpp-2m", 5, foo=1),
            r"takes no option 'foo'; allowed values: .*solver_order",
        ),
        (lambda pipe: with_solver(pipe, "dpmpp-2m", 5, algorithm_type="bogus"), "cannot be built with options"),
        (lambda pipe: with_solver(pipe, "dpmpp-2m", 5, prediction_type="v_prediction"), "noise schedule or prediction"),
        (lambda pipe: with_solver(pipe, "dpmpp-2m", None), r"`num_inference_steps`=None; allowed values"),
    ],
)
def test_with_solver_refuses_what_would_sample_something_else(call, pattern):
    with pytest.raises(DiTOptimumError, match=pattern):
        call(latent_pipeline())
