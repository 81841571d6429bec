"""A baseline far from its real-vs-real floors makes every verdict against it "weak baseline" (with what to do) in
the results, the report, the command line and the model cards; the training recipe scales to the user's data; the
quality-vs-steps plot; the upscaled-digits test folder."""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit_optimum.benchmark.report import (
    markdown_table,
    steps_rows,
    table_columns,
    table_rows,
    weak_baseline_lines,
    write_report,
)
from dit_optimum.benchmark.settings import (
    DEFAULT_TECHNIQUES,
    RECIPE_IMAGES,
    STUDY_TECHNIQUES,
    TrainingRecipe,
    add_benchmark_arguments,
    preset_settings,
    recipe_variant,
    settings_from_arguments,
    training_images,
)
from dit_optimum.benchmark.significance import (
    WEAK_BASELINE,
    WEAK_BASELINE_FACTORS,
    compare_with_baselines,
    features_path,
    save_features,
    weak_baseline,
)
from dit_optimum.cli import main as cli
from dit_optimum.errors import DiTOptimumError
from dit_optimum.evaluation.quality import QualityEvaluation
from dit_optimum.schemas import RESULTS, validate

REPO = Path(__file__).resolve().parents[1]
N = 40


def _row(variant: str, technique: str, accuracy: float, fd: float, **extra) -> dict:
    return {
        "variant": variant,
        "technique": technique,
        "status": "ok",
        "class_accuracy": accuracy,
        "class_accuracy_interval": [max(0.0, accuracy - 0.05), min(1.0, accuracy + 0.05)],
        "class_accuracy_real": 0.97,
        "fd_domain": fd,
        "fd_domain_interval": [0.8 * fd, 1.2 * fd],
        "fd_domain_real": 71.0,
        "sampler": "DDIMScheduler",
        "quality_settings": {"num_inference_steps": 10},
        "sampling_images_per_s": 10.0,
        "gflops": 0.1,
        "forward_peak_memory_bytes": 1000,
        **extra,
    }


def _save_cell(out: Path, variant: str, technique: str, correct: int, seed: int) -> None:
    """Per-sample features of one cell: ``correct`` of N samples classified as asked."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % 10
    logits = np.zeros((N, 10), dtype=np.float32)
    predicted = np.where(np.arange(N) < correct, labels, (labels + 1) % 10)
    logits[np.arange(N), predicted] = 1.0
    features = {"domain.logits": logits, "domain.features": rng.normal(size=(N, 4)).astype(np.float32)}
    reference = {"domain.features": np.random.default_rng(99).normal(size=(N, 4)).astype(np.float32)}
    evaluation = QualityEvaluation(metrics={}, features=features, labels=labels, reference=reference)
    save_features(features_path(out, variant, technique), evaluation)


@pytest.fixture
def compared(tmp_path):
    """Two variants: DiT-XS/4's baseline draws 28.7% of its classes (the user's case), DiT-XS/2's 96%."""
    rows = [
        _row("DiT-XS/4", "baseline", 0.287, 1698.0),
        _row("DiT-XS/4", "bf16", 0.29, 1700.0),
        _row("DiT-XS/4", "int8", 0.2, 1800.0),
        _row("DiT-XS/2", "baseline", 0.96, 90.0),
        _row("DiT-XS/2", "bf16", 0.96, 91.0),
    ]
    for variant, technique, correct in (
        ("DiT-XS/4", "baseline", 12),
        ("DiT-XS/4", "bf16", 12),
        ("DiT-XS/4", "int8", 2),  # significantly worse: would read "costs quality" against a sound baseline
        ("DiT-XS/2", "baseline", 38),
        ("DiT-XS/2", "bf16", 38),
    ):
        _save_cell(tmp_path, variant, technique, correct, seed=0)
    compare_with_baselines(rows, tmp_path, resamples=200)
    return rows


def test_a_weak_baseline_turns_every_verdict_of_its_variant_and_no_other(compared):
    weak_base, bf16, int8, good_base, good_bf16 = compared
    assert weak_base["baseline_weak"] == (
        "class acc (%) 28.7 is below 80% of the real-vs-real floor 97.0; "
        "FD_domain 1698.00 is above 3x the real-vs-real floor 71.00"
    )
    assert [row["quality_verdict"] for row in (weak_base, bf16, int8)] == [WEAK_BASELINE] * 3
    assert int8["vs_baseline"]["class_accuracy"]["significant"]  # the comparison is kept, only the verdict says why
    assert "baseline_weak" not in good_base
    assert good_bf16["quality_verdict"] == "no significant change"
    validate({"rows": compared}, RESULTS, "results")  # the new field and verdict read back


def test_a_baseline_replaced_by_a_sound_one_loses_its_weak_marks(compared, tmp_path):
    weak_base, bf16 = compared[0], compared[1]
    weak_base.update(class_accuracy=0.95, fd_domain=100.0)
    del bf16["vs_baseline"]
    (tmp_path / "features" / "DiT-XS-4__bf16.npz").unlink()  # no features: no comparison possible
    compare_with_baselines(compared, tmp_path, resamples=50)
    assert "baseline_weak" not in weak_base and "quality_verdict" not in bf16


def test_rows_scored_by_another_classifier_than_their_baseline_get_no_verdict(compared, tmp_path):
    """A resumed run whose domain classifier was trained again scores new cells in another feature space: pairing
    them with the baseline's features would be noise presented as a verdict."""
    good_base, good_bf16 = compared[3], compared[4]
    good_base["feature_extractors"] = {"domain": "domain_classifier:aaaaaaaaaaaa"}
    good_bf16["feature_extractors"] = {"domain": "domain_classifier:bbbbbbbbbbbb"}
    compare_with_baselines(compared, tmp_path, resamples=50)
    assert "quality_verdict" not in good_bf16 and "vs_baseline" not in good_bf16
    assert "not comparable" in good_bf16["comparison_problem"] and "bbbbbbbbbbbb" in good_bf16["comparison_problem"]
    validate({"rows": compared}, RESULTS, "results")
    good_bf16["feature_extractors"] = dict(good_base["feature_extractors"])  # scored alike again: compared again
    compare_with_baselines(compared, tmp_path, resamples=50)
    assert good_bf16["quality_verdict"] == "no significant change" and "comparison_problem" not in good_bf16


@pytest.mark.parametrize(
    ("accuracy", "fd", "weak"),
    [
        (0.8, 150.0, None),  # exactly 80% of the floor and exactly 3x: not below, not above
        (0.7999, 150.0, "class acc (%) 80.0 is below 80% of the real-vs-real floor 100.0"),
        (0.8, 150.01, "FD_domain 150.01 is above 3x the real-vs-real floor 50.00"),
    ],
)
def test_thresholds_at_the_boundary(accuracy, fd, weak):
    assert WEAK_BASELINE_FACTORS == {"class_accuracy": 0.8, "fd_domain": 3.0}
    row = {"class_accuracy": accuracy, "class_accuracy_real": 1.0, "fd_domain": fd, "fd_domain_real": 50.0}
    assert weak_baseline(row) == weak


def test_a_metric_without_a_floor_is_not_judged():
    assert weak_baseline({"class_accuracy": 0.1, "fd_domain": 5000.0}) is None
    assert weak_baseline({"class_accuracy": 0.1, "class_accuracy_real": 0.97}).startswith("class acc (%) 10.0")


def test_the_report_and_the_command_line_say_it_with_what_to_do(compared, tmp_path, monkeypatch, capsys):
    text = write_report(compared, tmp_path).read_text()
    assert "## Weak baseline" in text
    assert "- DiT-XS/4: the baseline is weak (class acc (%) 28.7 is below 80%" in text
    assert "`--train-steps`" in text and "`--pretrained VARIANT=PIPELINE`" in text
    assert "- **weak baseline**: DiT-XS/4 bf16, DiT-XS/4 int8" in text
    assert "| DiT-XS/4 | baseline | (the baseline, weak) |" in text
    assert "| DiT-XS/2 | bf16 | no significant change |" in text
    assert "DiT-XS/2: the baseline is weak" not in text
    assert len(weak_baseline_lines(compared)) == 1

    import dit_optimum.benchmark as benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", lambda settings, on_cell=None: compared)
    status = cli(["benchmark", "--techniques", "baseline,bf16", "--output-dir", str(tmp_path / "cli")])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert status == 0
    assert "Weak baseline DiT-XS/4: the baseline is weak (class acc (%) 28.7 is below 80%" in out
    assert "--train-steps" in out and "--pretrained VARIANT=PIPELINE" in out
    assert "Training recipe: 1600 steps, batch 32, lr 0.002 constant" in out


def test_a_model_card_of_a_weak_baseline_run_says_so(monkeypatch):
    from dit_optimum.hub.cards import model_card

    results = json.loads((REPO / "model_cards" / "dit_optimum_results.json").read_text())
    baseline, int8 = results["rows"]
    baseline.update(class_accuracy=0.287, baseline_weak="class acc (%) 28.7 is below 80% of the floor 99.0")
    int8["quality_verdict"] = WEAK_BASELINE
    for row, repo in ((int8, "org/dit-xs4-int8"), (baseline, "org/dit-xs4-baseline")):
        text = str(model_card(results, row, repo))
        assert "- Weak baseline: this run's baseline is far from its real-vs-real floors (class acc (%) 28.7" in text
        assert "`--train-steps`" in text and "`--pretrained VARIANT=PIPELINE`" in text
    assert "Quality verdict: **weak baseline**" in str(model_card(results, int8, "org/dit-xs4-int8"))
    sound = json.loads((REPO / "model_cards" / "dit_optimum_results.json").read_text())
    assert "Weak baseline" not in str(model_card(sound, sound["rows"][1], "org/dit-xs4-int8"))


def _arguments(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_benchmark_arguments(parser)
    return parser.parse_args(list(options))


def test_the_recipe_scales_to_the_data_and_an_explicit_option_wins(tmp_path):
    default = TrainingRecipe()
    assert default.scaled(RECIPE_IMAGES, 16, 4) == default  # the data the recipe was tuned on: unchanged
    assert default.scaled(500, 16, 4) == default  # less data never trains less
    scaled = default.scaled(10_000, 32, 4)  # 64 tokens an image: capped at 3x the tuned compute
    assert (scaled.steps, scaled.recovery_steps, scaled.checkpoint_every) == (1200, 300, 300)
    assert (scaled.batch_size, scaled.learning_rate, scaled.ema_decay) == (32, 2e-3, 0.999)
    assert default.scaled(10_000, 16, 4).steps == 3800  # 1600 x sqrt(10,000 / 1,797), within the compute cap

    assert settings_from_arguments(_arguments("--output-dir", str(tmp_path / "a"))).training == default
    folder = tmp_path / "data"
    for label in range(10):  # 10 classes x 1,000 images (empty files: counted, not read)
        (folder / str(label)).mkdir(parents=True)
        for index in range(1000):
            (folder / str(label) / f"{index}.png").touch()
    assert training_images(str(folder)) == 10_000 and training_images("digits") == RECIPE_IMAGES
    options = ("--data", str(folder), "--image-size", "32", "--channels", "1", "--output-dir", str(tmp_path / "b"))
    # no --variants: 32x32 images train DiT-XS/8 (16 tokens, as the tuned default), 3,800 steps for 10,000 images
    settings = settings_from_arguments(_arguments(*options))
    # tokens of 8 x 8 values: the networks trained from scratch predict v
    assert settings.variants == ("DiT-XS/8",)
    assert settings.training == replace(default.scaled(10_000, 32, 8), prediction_type="v_prediction")
    assert settings.comparable()["training"]["steps"] == 3800  # recorded, so a rerun stays comparable
    assert settings.comparable()["training"]["prediction_type"] == "v_prediction"
    assert "scaled to 10,000 images of 16 tokens" in settings.recipe_note
    assert "predict v_prediction (tokens of 64 values" in settings.recipe_note
    assert "variant DiT-XS/8 for 32x32 images" in settings.recipe_note
    noise = settings_from_arguments(_arguments(*options, "--prediction-type", "epsilon"))  # an explicit option wins
    assert noise.training.prediction_type == "epsilon" and "predict" not in noise.recipe_note
    with pytest.raises(DiTOptimumError, match=r"Unknown `prediction_type`='sample'; allowed values: epsilon, v_pred"):
        settings_from_arguments(_arguments(*options, "--prediction-type", "sample"))
    pretrained = settings_from_arguments(_arguments(*options, "--pretrained", f"DiT-XS/4={folder}"))
    assert pretrained.variants == ("DiT-XS/4",)  # a --pretrained baseline names its variant
    named = settings_from_arguments(_arguments(*options, "--variants", "DiT-XS/4"))  # a named variant is kept
    assert named.variants == ("DiT-XS/4",) and named.training == scaled
    assert "scaled to 10,000 images of 64 tokens" in named.recipe_note and "variant" not in named.recipe_note
    explicit = settings_from_arguments(_arguments(*options, "--train-steps", "2000"))
    assert explicit.training.steps == 2000 and explicit.training.recovery_steps == 400
    assert explicit.training.prediction_type == "v_prediction"  # the tokens decide, whatever the steps
    assert explicit.recipe_note.startswith("as given on the command line") and explicit.variants == ("DiT-XS/8",)
    recovery = settings_from_arguments(_arguments(*options, "--recovery-steps", "100"))
    assert recovery.training.steps == 3800 and recovery.training.recovery_steps == 100


def test_the_default_variant_keeps_the_tuned_tokens_per_image():
    assert [recipe_variant(size) for size in (8, 16, 20, 28, 32, 64)] == [
        "DiT-XS/2",
        "DiT-XS/4",
        "DiT-XS/4",  # 20 / 4 = 5 tokens a side; 8 does not tile 20
        "DiT-XS/4",  # 28: 7 tokens a side, the nearest patch that tiles it
        "DiT-XS/8",
        "DiT-XS/8",  # the largest patch: 64 tokens
    ]
    assert recipe_variant(32, "DiT-S/2") == "DiT-S/8"


def test_the_study_preset_adds_the_study_families_after_the_default_cells(tmp_path):
    study = settings_from_arguments(_arguments("--preset", "study", "--output-dir", str(tmp_path)))
    assert study.techniques == DEFAULT_TECHNIQUES + STUDY_TECHNIQUES
    assert not set(STUDY_TECHNIQUES) & set(DEFAULT_TECHNIQUES) and study.training == TrainingRecipe()
    with pytest.raises(DiTOptimumError, match="allowed values: default, study, paper"):
        preset_settings("studdy")


def test_the_quality_vs_steps_plot_is_written_only_with_step_rows(tmp_path):
    base = _row("DiT-XS/4", "baseline", 0.96, 130.0)  # no sampling_steps: the run's 10 steps
    rows = [
        base,
        _row("DiT-XS/4", "bf16", 0.95, 131.0),
        _row("DiT-XS/4", "solver-dpm-4", 0.9, 200.0, sampling_steps=4, sampler="DPMSolverMultistepScheduler"),
        _row("DiT-XS/4", "solver-dpm-8", 0.94, 150.0, sampling_steps=8, sampler="DPMSolverMultistepScheduler"),
        _row("DiT-XS/4", "distill-steps-4", 0.85, 260.0, sampling_steps=4),
    ]
    assert [row["technique"] for row in steps_rows(rows)] == [
        "baseline",
        "solver-dpm-4",
        "solver-dpm-8",
        "distill-steps-4",
    ]
    text = write_report(rows, tmp_path / "with").read_text()
    plot = tmp_path / "with" / "plots" / "quality_vs_steps.png"
    assert Image.open(plot).size[0] > 600 and "![quality_vs_steps](plots/quality_vs_steps.png)" in text
    write_report(rows[:2], tmp_path / "without")
    assert not (tmp_path / "without" / "plots" / "quality_vs_steps.png").exists()
    assert (tmp_path / "without" / "plots" / "pareto.png").is_file()


def test_the_upscaled_digits_folder_is_an_imagefolder_the_benchmark_reads(tmp_path):
    spec = importlib.util.spec_from_file_location("upscaled_digits", REPO / "benchmarks" / "upscaled_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = module.write_upscaled_digits(tmp_path / "digits", variants=3, limit=30)
    files = sorted(folder.glob("*/*.png"))
    assert len(files) == 90 and sorted(p.name for p in folder.iterdir()) == [str(d) for d in range(10)]
    plain, augmented = Image.open(folder / "0" / "0000_0.png"), Image.open(folder / "0" / "0000_1.png")
    assert plain.mode == "L" and plain.size == (32, 32)
    pixels = np.asarray(plain)
    assert pixels[:4].max() == 0 and pixels[12:20, 12:20].max() > 100  # a border, the digit in the middle
    assert not np.array_equal(pixels, np.asarray(augmented))
    assert training_images(str(folder)) == 90

    from dit_optimum.data import load_training_data
    from dit_optimum.evaluation.reference import real_split

    data = load_training_data(str(folder), image_size=32, channels=1)
    assert tuple(data.samples.shape) == (90, 1, 32, 32) and data.num_classes == 10
    split = real_split(str(folder), "train", 20, 20)  # the --reference side reads the same folder
    assert len(split.reference) == 20 and split.available == 90


def test_the_results_table_shows_each_cells_steps_when_one_samples_with_its_own():
    base = _row("DiT-XS/4", "baseline", 0.96, 130.0, sampling_steps=10)
    student = _row(
        "DiT-XS/4",
        "distill-steps-2",
        0.95,
        150.0,
        sampling_steps=2,
        sampling_defaults={"num_inference_steps": 2, "guidance_scale": 1.0},
        quality_settings={"num_inference_steps": 2, "guidance_scale": 1.0},
    )
    assert "steps" not in table_columns([base])  # nobody samples with their own: the run's steps, said once
    columns, cells = table_columns([base, student]), table_rows([base, student])
    assert columns[:3] == ["variant", "technique", "steps"]
    assert [row[2] for row in cells] == ["10", "2 unguided"]
    assert "| DiT-XS/4 | distill-steps-2 | 2 unguided | 95.0 [90.0, 100.0] |" in markdown_table([base, student])


def test_a_data_folder_without_images_is_refused_naming_it(tmp_path):
    (tmp_path / "data" / "0").mkdir(parents=True)
    options = ("--data", str(tmp_path / "data"), "--image-size", "32", "--output-dir", str(tmp_path / "out"))
    with pytest.raises(DiTOptimumError, match=r"`data`=.*data' holds no images"):
        settings_from_arguments(_arguments(*options))
