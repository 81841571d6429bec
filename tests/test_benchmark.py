"""The technique registry and the benchmark matrix: every technique builds, a tiny matrix writes its table, report
and plots, resumes after an interruption without redoing finished cells, and bad arguments fail clearly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TinyFeatureExtractor, tiny_pixel_pipeline
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel
from dit_optimum.benchmark import BenchmarkSettings, TrainingRecipe, load_results, preset_settings, run_benchmark
from dit_optimum.benchmark.contexts import VariantContext
from dit_optimum.benchmark.report import baseline_deltas, markdown_table, pareto_front, write_report
from dit_optimum.benchmark.settings import DEFAULT_TECHNIQUES
from dit_optimum.cli import main as cli
from dit_optimum.evaluation.efficiency import SpeedSettings
from dit_optimum.evaluation.quality import QualitySettings
from dit_optimum.models.transformer import is_quantized
from dit_optimum.techniques.quantization import SUPPORTED
from dit_optimum.techniques.registry import TECHNIQUES, Technique, get_technique, register_technique


class UntrainedContext:
    """A TechniqueContext that builds untrained models instead of training them (for registry tests)."""

    def __init__(self):
        self.base = tiny_pixel_pipeline(num_layers=4)
        self.requests = []

    def baseline(self):
        return DiTOptimumPipeline(
            transformer=DiTOptimumTransformer2DModel.from_config(self.base.transformer.config),
            vae=None,
            scheduler=self.base.scheduler,
        )

    def baseline_config(self):
        return self.base.transformer.config

    def finetune(self, name, pipeline, *, distill=True):
        self.requests.append((name, "finetune", distill, {}))
        return pipeline

    def trained_path(self, name):
        return name  # a label: `train` below builds untrained models whatever they train from

    def train(self, name, model_overrides=None, *, distill=False, **options):
        self.requests.append((name, dict(model_overrides or {}), distill, options))
        # drop diffusers' private keys: `_use_default_values` would reset overridden defaults
        config = {k: v for k, v in self.base.transformer.config.items() if not k.startswith("_")}
        config.update(model_overrides or {})
        return DiTOptimumPipeline(
            transformer=DiTOptimumTransformer2DModel.from_config(config), vae=None, scheduler=self.base.scheduler
        )


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_every_registered_technique_builds_a_working_pipeline(name):
    context = UntrainedContext()
    options = get_technique(name).options
    if name == "optimized":  # a search judged by quality measurements: this stand-in has none (tests/test_optimize.py)
        with pytest.raises(DiTOptimumError, match="needs a benchmark run that measures quality"):
            get_technique(name).build(context)
        return
    needs_gpu = SUPPORTED.get((options.get("backend"), options.get("weights"), options.get("activations")), (0, None))
    if needs_gpu[1] is not None and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            get_technique(name).build(context)
        return
    pipeline = get_technique(name).build(context)
    assert isinstance(pipeline, DiTOptimumPipeline)
    model, base = pipeline.transformer, context.base.transformer
    if name.startswith("attention-"):
        assert model.config.attention_type == name.removeprefix("attention-")
        assert context.requests[0][0] == name and not context.requests[0][2]
    elif name == "moe":
        assert model.config.moe_num_experts == 4
    elif name == "distill":
        assert model.config.num_layers == 2
        assert context.requests[0][2] and context.requests[0][3] == {"feature_blocks": [1]}
    elif name in ("int8", "int8-dynamic") or name.startswith("quanto"):
        assert is_quantized(model)
    elif name == "bf16":
        assert model.dtype == torch.bfloat16
    elif "distill-steps-" in name:  # a step-distillation round from its declared teacher (the stand-in trains none)
        student = get_technique(options.get("base", name))  # a stack's student is its base
        request = context.requests[-1]
        steps = request[3]["student_steps"]
        assert request[0] == student.options["run_name"] and student.name.endswith(f"distill-steps-{steps}")
        assert request[3]["pretrained"] == student.options.get("teacher", "baseline")
    elif name.startswith("prune-"):
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())
        if name.endswith("-recover"):  # fine-tuned from the pruned model with distillation from the baseline
            assert context.requests == [(name, "finetune", True, {})]
    images = pipeline([0, 3], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_registry_rejects_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match="Unknown technique 'nope'; allowed values: baseline, attention-gqa"):
        get_technique("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_technique("baseline", lambda context: None, "again")


def tiny_settings(output_dir: Path, techniques=("baseline", "prune-depth-50")) -> BenchmarkSettings:
    return BenchmarkSettings(
        output_dir=str(output_dir),
        variants=("DiT-XS/4",),
        techniques=techniques,
        image_size=8,
        training=TrainingRecipe(steps=3, batch_size=8, checkpoint_every=2, recovery_steps=2),
        quality=QualitySettings(
            num_samples=11,
            reference_samples=20,
            batch_size=7,
            num_inference_steps=2,
            metrics=("fid", "kid"),
            bootstrap=10,
        ),
        speed=SpeedSettings(batch_size=2, forward_batch_size=2, num_inference_steps=2, warmup=0, repeats=1),
        grid_size=10,
    )


class CountingTrainer:
    def __init__(self):
        self.calls = []

    def __call__(self, config):
        from dit_optimum.training import train

        self.calls.append(Path(config.output_dir).name)
        return train(config)


def test_tiny_matrix_writes_table_report_plots_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    interrupted = Technique(
        "interrupted", lambda context: (_ for _ in ()).throw(KeyboardInterrupt()), "killed mid-cell"
    )
    monkeypatch.setitem(TECHNIQUES, "interrupted", interrupted)
    trainer, seen = CountingTrainer(), []
    settings = tiny_settings(out, ("baseline", "interrupted", "prune-depth-50"))
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(settings, TinyFeatureExtractor(), on_cell=seen.append, trainer=trainer)
    # the finished cell survived the interruption in a valid file; the killed one left nothing
    stored = load_results(out)
    assert [row["technique"] for row in stored["rows"]] == ["baseline"]
    assert trainer.calls == ["baseline"]

    settings = tiny_settings(out)
    rows = run_benchmark(settings, TinyFeatureExtractor(), on_cell=seen.append, trainer=trainer)
    assert [row["technique"] for row in seen] == ["baseline", "prune-depth-50"]  # baseline not redone
    assert trainer.calls == ["baseline"]  # the trained baseline was loaded, not trained again
    assert [row["technique"] for row in rows] == ["baseline", "prune-depth-50"]
    base, pruned = rows
    for row in rows:
        assert row["status"] == "ok" and row["num_samples"] == 11 and row["reference_samples"] == 20
        # the tiny extractor's pool features are 8-d (Frechet needs N >= 9)
        assert row["fid"] > 0 and "sfid" not in row and row["kid"] is not None
        assert row["fid_interval"][0] <= row["fid_interval"][1] and row["fid_real"] is not None
        assert (out / "features" / f"DiT-XS-4__{row['technique']}.npz").is_file()
        assert row["gflops"] > 0 and row["size_bytes"] > 0 and row["sampling_images_per_s"] > 0
        assert row["hardware"]["torch"] == torch.__version__ and row["sampler"] == "DDIMScheduler"
        assert Image.open(out / row["sample_grid"]).size == (10 * 64, 64)
    assert base["train_steps"] == 3 and base["train_final_loss"] > 0
    assert pruned["gflops"] < base["gflops"] and pruned["size_bytes"] < base["size_bytes"]
    assert (out / "models" / "DiT-XS-4" / "baseline" / "pipeline" / "model_index.json").is_file()
    assert len((out / "results.csv").read_text().strip().splitlines()) == 3

    report = write_report(rows, out)
    text = report.read_text()
    assert "| DiT-XS/4 | prune-depth-50 |" in text and "## Change against each variant's baseline" in text
    assert "samples/DiT-XS-4__baseline.png" in text
    for plot in ("pareto.png", "gflops.png", "memory.png"):
        assert Image.open(out / "plots" / plot).size[0] > 100
    deltas = {entry["technique"]: entry for entry in baseline_deltas(rows)}
    assert deltas["prune-depth-50"]["gflops"]["percent"] == pytest.approx(
        100 * (pruned["gflops"] - base["gflops"]) / base["gflops"]
    )
    assert deltas["baseline"]["kid"]["percent"] == 0 and deltas["baseline"]["size_bytes"]["percent"] == 0
    # speed deltas are the paired ratios measured in the cell, not absolute numbers from different moments
    assert deltas["prune-depth-50"]["forward_images_per_s"]["percent"] == pytest.approx(
        100 * (pruned["forward_speedup"] - 1)
    )
    assert pruned["sampling_speedup"] > 0 and pruned["latency_ratio"] > 0
    # the pruned cell is compared with the baseline on the same samples: a difference with its interval
    assert set(pruned["vs_baseline"]) == {"fid", "kid"} and pruned["quality_verdict"] in (
        "costs quality",
        "no significant change",
        "better quality",
    )
    assert base["vs_baseline"]["fid"]["difference"] == 0 and not base["vs_baseline"]["fid"]["significant"]

    # a third run has nothing left to do
    again = run_benchmark(settings, TinyFeatureExtractor(), on_cell=seen.append, trainer=trainer)
    assert [row["kid"] for row in again] == [row["kid"] for row in rows] and len(seen) == 2

    # results measured with other settings are not mixed into the same table
    changed = replace(settings, quality=replace(settings.quality, num_samples=12))
    with pytest.raises(
        ValueError,
        match=r"other settings \(results.json -> this run: quality.num_samples: 11 -> 12\).*another output folder",
    ):
        run_benchmark(changed, TinyFeatureExtractor())


def test_a_failing_cell_is_recorded_and_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    broken = Technique("broken", lambda context: (_ for _ in ()).throw(RuntimeError("no kernel")), "always fails")
    monkeypatch.setitem(TECHNIQUES, "broken", broken)
    monkeypatch.setitem(TECHNIQUES, "cheap", Technique("cheap", lambda context: tiny_pixel_pipeline(), "untrained"))
    settings = tiny_settings(tmp_path / "bench", ("cheap", "broken"))
    rows = run_benchmark(settings, TinyFeatureExtractor())
    assert [row["status"] for row in rows] == ["ok", "failed"]
    assert rows[1]["error"] == "RuntimeError: no kernel"
    report = write_report(rows, tmp_path / "bench").read_text()
    assert "- DiT-XS/4 / broken: RuntimeError: no kernel" in report
    assert "| DiT-XS/4 | cheap |" in markdown_table(rows) and "broken" not in markdown_table(rows)
    seen = []
    run_benchmark(settings, TinyFeatureExtractor(), on_cell=seen.append)
    assert [row["technique"] for row in seen] == ["broken"]


def test_pareto_front_keeps_the_undominated_points():
    # (throughput, quality): higher x and lower y are better
    points = [(1.0, 5.0), (2.0, 6.0), (2.0, 4.0), (3.0, 9.0), (0.5, 3.0)]
    assert pareto_front(points) == [4, 2, 3]


def test_bad_benchmark_arguments_fail_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match="Unknown `techniques` \\['nope'\\]; allowed values: baseline"):
        tiny_settings(tmp_path, ("baseline", "nope")).validate()
    with pytest.raises(ValueError, match="Unknown DiT preset `name`='DiT-M/2'"):
        replace(tiny_settings(tmp_path), variants=("DiT-M/2",)).validate()
    with pytest.raises(ValueError, match="Unknown `preset`='huge'; allowed values: default, study, paper"):
        preset_settings("huge")
    with pytest.raises(ValueError, match="pretrained"):
        replace(tiny_settings(tmp_path), pretrained={"DiT-S/2": "x"}).validate()
    assert cli(["benchmark", "--techniques", "baseline,nope", "--output-dir", str(tmp_path)]) == 2
    assert "Unknown `techniques` ['nope']" in capsys.readouterr().err
    assert cli(["benchmark", "--preset", "paper", "--output-dir", str(tmp_path)]) == 2
    assert "needs `--data`" in capsys.readouterr().err
    assert cli(["benchmark", "--pretrained", "DiT-XS/4", "--output-dir", str(tmp_path)]) == 2
    assert "VARIANT=PIPELINE" in capsys.readouterr().err
    assert (
        cli(
            [
                "benchmark",
                "--metrics",
                "fid",
                "--num-samples",
                "100",
                "--techniques",
                "baseline",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "fid needs N >= 2049" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
    assert cli(["benchmark", "--list"]) == 0
    assert "quanto-w8a8" in capsys.readouterr().out


def test_recovery_fine_tunes_the_pruned_baseline_with_distillation(tmp_path):
    settings = tiny_settings(tmp_path / "bench", ("baseline", "prune-depth-50", "prune-depth-50-recover"))
    rows = {row["technique"]: row for row in run_benchmark(settings, inception=TinyFeatureExtractor())}
    assert all(row["status"] == "ok" for row in rows.values()), [row.get("error") for row in rows.values()]
    recovered = rows["prune-depth-50-recover"]
    assert recovered["train_steps"] == 2 and recovered["params_m"] == rows["prune-depth-50"]["params_m"]
    models = tmp_path / "bench" / "models" / "DiT-XS-4"
    start = DiTOptimumPipeline.from_pretrained(models / "prune-depth-50-recover-start").transformer
    tuned = DiTOptimumPipeline.from_pretrained(models / "prune-depth-50-recover" / "pipeline").transformer
    assert start.config.num_layers == tuned.config.num_layers == 3  # half of the tiny preset's 6 blocks
    assert not torch.equal(start.proj_out_2.weight, tuned.proj_out_2.weight)
    record = json.loads((models / "prune-depth-50-recover" / "train_log.config.json").read_text())["config"]
    assert record["pretrained"] == str(models / "prune-depth-50-recover-start") and record["teacher"]
    assert record["steps"] == 2


def test_presets_describe_the_default_and_the_paper_runs():
    default, paper = preset_settings("default"), preset_settings("paper")
    assert default == BenchmarkSettings() and default.variants == ("DiT-XS/4",) and default.data == "digits"
    assert default.quality.metrics == ("class_accuracy", "fd_domain") and default.training.mixed_precision == "bf16"
    assert paper.quality.metrics == ("fid", "sfid", "kid") and paper.training.learning_rate == 1e-4
    assert paper.variants == ("DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4")
    assert set(paper.techniques) == set(TECHNIQUES) and paper.quality.num_samples == 50_000
    assert json.loads(json.dumps(default.comparable())) == default.comparable()
    assert default.techniques == DEFAULT_TECHNIQUES


def test_the_paper_preset_validates_for_a_cost_only_run_and_names_channels_for_a_quality_run():
    # a cost-only run reads no reference: the preset's 50K reference images are not checked against the digits
    replace(preset_settings("paper"), speed_only=True).validate()
    with pytest.raises(DiTOptimumError, match="`channels`=4 is not allowed"):
        preset_settings("paper").validate()


def test_speed_only_run_measures_cost_on_untrained_latent_models(tmp_path):
    def no_training(config):
        raise AssertionError("a speed-only run must not train")

    settings = BenchmarkSettings(
        output_dir=str(tmp_path),
        variants=("DiT-XS/8",),
        techniques=("baseline", "bf16", "distill"),
        image_size=8,
        channels=4,
        speed=SpeedSettings(batch_size=1, forward_batch_size=2, num_inference_steps=2, warmup=0, repeats=1),
        speed_only=True,
    )
    rows = run_benchmark(settings, trainer=no_training)
    base, half, student = rows
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"]
    assert "kid" not in base and "num_samples" not in base and "sample_grid" not in base
    assert half["dtype"] == "bfloat16" and half["size_bytes"] < 0.6 * base["size_bytes"]
    assert 0.4 * base["gflops"] < student["gflops"] < 0.6 * base["gflops"]  # half the blocks
    assert "Cost only" in write_report(rows, tmp_path).read_text()
    assert not (tmp_path / "plots" / "pareto.png").exists()


def test_variant_context_reads_a_pretrained_baseline_config_without_loading_weights(tmp_path):
    from dit_optimum.configs import dit_config

    config = dit_config("DiT-XS/4", sample_size=8, in_channels=1, num_classes=10)
    DiTOptimumPipeline(transformer=DiTOptimumTransformer2DModel(**config)).save_pretrained(tmp_path / "pipe")
    settings = replace(tiny_settings(tmp_path / "bench"), pretrained={"DiT-XS/4": str(tmp_path / "pipe")})
    context = VariantContext(settings, "DiT-XS/4")
    assert context.baseline_config()["num_layers"] == 6
    assert context.baseline().transformer.config.num_layers == 6
    assert not (tmp_path / "bench" / "models").exists()  # nothing trained for a pretrained baseline
    # another architecture or image size under the preset's name would be reported as that preset: refused
    tiny_pixel_pipeline(num_layers=3).save_pretrained(tmp_path / "other")
    settings = replace(settings, pretrained={"DiT-XS/4": str(tmp_path / "other")})
    with pytest.raises(DiTOptimumError, match=r"not a DiT-XS/4 at image size 8: num_layers=3 \(expected 6\)"):
        VariantContext(settings, "DiT-XS/4").baseline()
    with pytest.raises(DiTOptimumError, match=r"image size 8 \(expected 16\)"):
        VariantContext(
            replace(settings, image_size=16, pretrained={"DiT-XS/4": str(tmp_path / "pipe")}), "DiT-XS/4"
        ).baseline()
    with pytest.raises(DiTOptimumError, match="names one preset twice"):
        replace(settings, variants=("DiT-XS/4", "dit-xs/4"), pretrained={}).validate()


def test_a_default_style_run_scores_domain_metrics_with_floors_and_verdicts(tmp_path, monkeypatch):
    from dit_optimum.evaluation.domain import ClassifierRecipe, domain_classifier
    from dit_optimum.evaluation.reference import real_split

    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    settings = tiny_settings(tmp_path / "bench", ("baseline", "prune-depth-50"))
    settings.quality = replace(
        settings.quality, num_samples=66, reference_samples=66, metrics=("class_accuracy", "fd_domain"), bootstrap=20
    )
    real = real_split("digits", "train", 66, 66)
    stand_in = domain_classifier(real, 8, ClassifierRecipe(epochs=2))  # a quickly trained stand-in
    rows = run_benchmark(settings, classifier=stand_in)
    pruned = rows[1]
    for row in rows:
        assert 0 <= row["class_accuracy"] <= 1 and row["fd_domain"] > 0
        low, high = row["class_accuracy_interval"]
        assert low <= row["class_accuracy"] <= high
        assert row["fd_domain_real"] < row["fd_domain"]  # an untrained 3-step model is far from real digits
        assert row["classifier_accuracy"] == stand_in.held_out_accuracy and row["floor_samples"] == 66
    assert set(pruned["vs_baseline"]) == {"class_accuracy", "fd_domain"}
    # an untrained 3-step baseline is far below the real digits' floors: no comparison with it means anything
    assert "below 80% of the real-vs-real floor" in rows[0]["baseline_weak"]
    assert pruned["quality_verdict"] == "weak baseline"
    text = write_report(rows, tmp_path / "bench").read_text()
    assert "## Weak baseline" in text and "`--train-steps`" in text
    assert "Floor (real vs real: 66 held-out real images" in text and "quality vs baseline" in text
    assert "class acc (%)" in text and "FD_domain" in text
