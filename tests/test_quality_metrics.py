"""Domain metrics, intervals and significance on known cases: real vs real near the floor, noise far above it,
shifted classes lower conditional accuracy, bootstrap intervals against the closed form, cache keys, paired
comparisons and the report's marks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_optimum.benchmark.report import baseline_deltas, markdown_deltas, markdown_table, table_columns
from dit_optimum.benchmark.significance import quality_verdict
from dit_optimum.evaluation import domain as domain_module
from dit_optimum.evaluation.declarations import Metric, all_metrics, declare_metric
from dit_optimum.evaluation.domain import (
    ClassifierRecipe,
    class_accuracy,
    classifier_cache_path,
    domain_classifier,
    domain_frechet_distance,
    train_classifier,
)
from dit_optimum.evaluation.features import extract_features
from dit_optimum.evaluation.intervals import bootstrap_interval, paired_comparison
from dit_optimum.evaluation.reference import real_images, real_split

FAST = ClassifierRecipe(epochs=15)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A classifier on 12x12 digits (trained once for the module) and the real reference / floor sets."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path_factory.mktemp("cache")))
        real = real_split("digits", "train", 300, 300, seed=0)
        classifier = domain_classifier(real, 12, FAST)
        sets = {role: real_images(real, role, 12) for role in ("reference", "floor")}
        features = {
            role: {f"domain.{k}": v for k, v in extract_features(part.images, classifier.model).items()}
            for role, part in sets.items()
        }
        yield real, classifier, sets, features


def test_the_classifier_is_accurate_on_held_out_real_digits(digits):
    real, classifier, _, _ = digits
    assert classifier.held_out_samples == 600 and classifier.num_classes == 10
    assert classifier.held_out_accuracy >= 0.95  # the default recipe (60 epochs, 16 px) reaches 98% here
    assert len(real.fit) == 1797 - 600


def test_real_against_real_sits_at_the_floor_and_noise_far_above(digits):
    _, _, sets, features = digits
    floor, reference = features["floor"], features["reference"]
    labels = sets["floor"].labels
    real_fd = domain_frechet_distance(floor, reference, labels)
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 12, 12, 3), dtype=np.uint8)
    _, classifier, _, _ = digits
    noise_features = {f"domain.{k}": v for k, v in extract_features(noise, classifier.model).items()}
    assert domain_frechet_distance(noise_features, reference, labels) > 10 * real_fd
    assert class_accuracy(floor, reference, labels) >= 0.95
    assert class_accuracy(noise_features, reference, labels) < 0.3


def test_a_shifted_class_distribution_lowers_conditional_accuracy(digits):
    _, _, sets, features = digits
    labels = sets["floor"].labels
    shifted = labels.copy()
    shifted[::2] = (shifted[::2] + 1) % 10  # half the samples asked for another class than they show
    exact = class_accuracy(features["floor"], features["reference"], labels)
    assert class_accuracy(features["floor"], features["reference"], shifted) == pytest.approx(exact / 2, abs=0.05)


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    count, probability = 2000, 0.8
    hits = (rng.random(count) < probability).astype(np.int64)
    logits = np.stack([1 - hits, hits], axis=1).astype(np.float32)  # class 1 predicted for the hits
    generated, labels = {"domain.logits": logits}, np.ones(count, dtype=np.int64)
    low, high = bootstrap_interval(class_accuracy, generated, {}, labels, resamples=2000, seed=0)
    mean = hits.mean()
    half = 1.96 * np.sqrt(mean * (1 - mean) / count)
    assert low == pytest.approx(mean - half, abs=0.004) and high == pytest.approx(mean + half, abs=0.004)


def test_paired_comparison_sees_a_real_difference_and_not_an_identical_cell(digits):
    _, _, sets, features = digits
    labels = sets["floor"].labels
    same = paired_comparison(class_accuracy, features["floor"], features["floor"], {}, labels, resamples=200)
    assert same.difference == 0 and not same.significant
    worse = dict(features["floor"])
    logits = worse["domain.logits"].copy()
    logits[::3] = np.roll(logits[::3], 1, axis=1)  # a third of the samples now show the wrong class
    worse["domain.logits"] = logits
    drop = paired_comparison(class_accuracy, worse, features["floor"], {}, labels, resamples=200)
    assert drop.difference < -0.2 and drop.significant and drop.high < 0
    fd = paired_comparison(
        domain_frechet_distance, features["floor"], features["floor"], features["reference"], labels, resamples=50
    )
    assert fd.difference == 0 and not fd.significant


def test_the_classifier_is_cached_by_data_split_and_recipe(digits, monkeypatch):
    real, classifier, _, _ = digits
    path = classifier_cache_path(real, 12, FAST)
    assert path.is_file() and path.with_suffix(".json").is_file()
    monkeypatch.setattr(domain_module, "train_classifier", lambda *a, **k: pytest.fail("retrained from cache"))
    again = domain_classifier(real, 12, FAST)
    assert again.held_out_accuracy == classifier.held_out_accuracy and again.model.weights_hash
    images = real_images(real, "floor", 12).images[:20]
    np.testing.assert_array_equal(
        domain_module.predictions(again.model, images), domain_module.predictions(classifier.model, images)
    )
    assert classifier_cache_path(real_split("digits", "train", 301, 300), 12, FAST) != path
    assert classifier_cache_path(real, 16, FAST) != path
    assert classifier_cache_path(real, 12, ClassifierRecipe(epochs=16)) != path
    path.write_bytes(path.read_bytes()[:50])  # damaged: trained again, with a warning naming it
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="Domain classifier cache .* unreadable"):
        domain_classifier(real, 12, FAST)


def test_unlabelled_references_are_refused_for_the_domain_metrics(tmp_path):
    from PIL import Image

    for index in range(40):
        Image.new("RGB", (8, 8), (index, index, index)).save(tmp_path / f"{index}.png")
    real = real_split(str(tmp_path), "train", 10, 10)
    with pytest.raises(ValueError, match="no class labels"):
        domain_classifier(real, 8, FAST, use_cache=False)


def test_metrics_are_declared_once_with_their_direction():
    keys = [metric.key for metric in all_metrics()]
    assert len(keys) == len(set(keys))
    quality = {metric.key: metric for metric in all_metrics("quality")}
    assert quality["class_accuracy"].better == "higher" and quality["fd_domain"].better == "lower"
    assert all(metric.statistic is not None for metric in quality.values())
    with pytest.raises(ValueError, match="already declared"):
        declare_metric(Metric("fid", "FID", "quality", statistic=lambda g, r, y: 0.0))
    with pytest.raises(ValueError, match="carry a statistic"):
        Metric("x", "x", "quality")


def report_rows():
    base = {
        "variant": "DiT-XS/4",
        "technique": "baseline",
        "status": "ok",
        "class_accuracy": 0.9,
        "class_accuracy_interval": [0.87, 0.93],
        "class_accuracy_real": 0.98,
        "class_accuracy_real_interval": [0.96, 0.99],
        "gflops": 0.08,
        "forward_images_per_s": 900.0,
        "forward_speedup": 1.0,
        "forward_speedup_range": [0.97, 1.04],
    }
    worse = {
        **base,
        "technique": "prune-depth-50",
        "class_accuracy": 0.5,
        "class_accuracy_interval": [0.45, 0.55],
        "gflops": 0.04,
        "forward_speedup": 1.9,
        "forward_speedup_range": [1.8, 2.0],
        "vs_baseline": {"class_accuracy": {"difference": -0.4, "interval": [-0.45, -0.35], "significant": True}},
    }
    same = {
        **base,
        "technique": "bf16",
        "class_accuracy": 0.89,
        "forward_speedup": 1.02,
        "forward_speedup_range": [0.95, 1.1],
        "vs_baseline": {"class_accuracy": {"difference": -0.01, "interval": [-0.03, 0.01], "significant": False}},
    }
    worse["quality_verdict"] = quality_verdict(worse["vs_baseline"])
    same["quality_verdict"] = quality_verdict(same["vs_baseline"])
    return [base, worse, same]


def test_the_report_marks_changes_outside_the_noise_and_gives_a_verdict():
    rows = report_rows()
    assert rows[1]["quality_verdict"] == "costs quality" and rows[2]["quality_verdict"] == "no significant change"
    assert table_columns(rows)[:4] == ["variant", "technique", "class acc (%)", "GFLOPs"]
    table = markdown_table(rows)
    assert "| DiT-XS/4 | baseline | 90.0 [87.0, 93.0] |" in table
    deltas = {entry["technique"]: entry for entry in baseline_deltas(rows)}
    assert deltas["prune-depth-50"]["class_accuracy"] == {
        "percent": pytest.approx(-44.444, abs=0.01),
        "significant": True,
    }
    assert deltas["prune-depth-50"]["forward_images_per_s"]["significant"] is True  # every round faster
    assert deltas["bf16"]["forward_images_per_s"]["significant"] is False  # rounds on both sides of 1
    text = markdown_deltas(rows)
    assert "| DiT-XS/4 | prune-depth-50 | costs quality | **-44.4%** |" in text
    assert "| DiT-XS/4 | bf16 | no significant change | -1.1% |" in text
    better = {"class_accuracy": {"difference": 0.05, "interval": [0.02, 0.08], "significant": True}}
    assert quality_verdict(better) == "better quality"
    mixed = {**better, "fd_domain": {"difference": 3.0, "interval": [1.0, 5.0], "significant": True}}
    assert quality_verdict(mixed) == "costs quality"


def test_the_classifier_trains_at_most_max_steps_batches_however_large_the_fit_set():
    recipe = ClassifierRecipe()
    assert recipe.epochs_for(997) == 60  # the digits' fit set: the 60 epochs the recipe was chosen with
    assert recipe.epochs_for(10_000) == 12  # 157 batches an epoch: 12 epochs stay within 2,000 batches
    assert recipe.epochs_for(10**6) == 1 and ClassifierRecipe(max_steps=10).epochs_for(640) == 1
    images = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(40) % 2
    steps = []
    original = torch.optim.Adam.step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
        train_classifier(images, labels, 2, ClassifierRecipe(epochs=50, batch_size=8, max_steps=12))
    assert len(steps) == 10  # 5 batches an epoch, 12 // 5 = 2 epochs
