"""The evaluation functions refuse inputs that would give a silently wrong number or a raw NumPy/SciPy error:
non-finite or empty features, labels of another length or not integral, resample counts / seeds out of range,
non-positive batch sizes, empty images; MoE routing statistics of zero tokens are zeros, not NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TinyFeatureExtractor, tiny_model
from dit_optimum import DiTOptimumError
from dit_optimum.evaluation.domain import class_accuracy
from dit_optimum.evaluation.features import extract_features, to_uint8
from dit_optimum.evaluation.fid import fid, kid
from dit_optimum.evaluation.intervals import bootstrap_interval, paired_comparison
from dit_optimum.evaluation.metrics import kernel_inception_distance
from dit_optimum.models.moe import MoEFeedForward

RNG = np.random.default_rng(0)
REFERENCE = RNG.normal(size=(20, 4))
LOGITS = RNG.normal(size=(6, 3))


def _pool(features: np.ndarray) -> dict[str, np.ndarray]:
    return {"inception.pool": features}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("metric", [fid, kid])
def test_distances_refuse_non_finite_features_naming_them(metric, bad):
    generated = RNG.normal(size=(20, 4))
    generated[3, 1] = bad
    with pytest.raises(DiTOptimumError, match=r"`generated features` has 1 samples with NaN or infinite.*finite"):
        metric(_pool(generated), _pool(REFERENCE), np.zeros(20, np.int64))


@pytest.mark.parametrize("metric", [fid, kid])
def test_distances_refuse_features_that_overflow_float64(metric):
    with pytest.raises(DiTOptimumError, match=r"too large|not finite"):
        metric(_pool(RNG.normal(size=(20, 4)) * 1e200), _pool(REFERENCE), np.zeros(20, np.int64))


def test_distances_of_finite_features_are_unchanged():
    assert fid(_pool(REFERENCE), _pool(REFERENCE.copy()), np.zeros(20, np.int64)) == pytest.approx(0.0, abs=1e-6)
    same = kid(_pool(REFERENCE), _pool(RNG.normal(size=(20, 4))), np.zeros(20, np.int64))
    shifted = kid(_pool(REFERENCE + 5), _pool(RNG.normal(size=(20, 4))), np.zeros(20, np.int64))
    assert np.isfinite(same) and shifted > 10 * abs(same)


def test_class_accuracy_counts_matching_predictions():
    labels = LOGITS.argmax(axis=1)
    assert class_accuracy({"domain.logits": LOGITS}, {}, labels) == 1.0
    assert class_accuracy({"domain.logits": LOGITS}, {}, (labels + 1) % 3) == 0.0
    # integral float labels are accepted as their integers
    assert class_accuracy({"domain.logits": LOGITS}, {}, labels.astype(np.float64)) == 1.0


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.full((4, 3), np.nan), np.zeros(4, np.int64), r"`generated domain\.logits` has 4 samples with NaN"),
        (LOGITS, np.zeros(1, np.int64), r"`labels` must be 1-D with one label per sample \(6\), got shape \(1,\)"),
        (LOGITS, np.zeros(2, np.int64), r"one label per sample \(6\), got shape \(2,\)"),
        (LOGITS, np.zeros((6, 1), np.int64), r"one label per sample \(6\), got shape \(6, 1\)"),
        (LOGITS, np.full(6, 0.5), r"`labels` must be integral class labels, got dtype float64"),
        (np.zeros((0, 3)), np.zeros(0, np.int64), r"`generated domain\.logits` has N=0 samples: it needs at least 1"),
    ],
)
def test_class_accuracy_refuses_wrong_inputs(logits, labels, match):
    with pytest.raises(DiTOptimumError, match=match):
        class_accuracy({"domain.logits": logits}, {}, labels)


def test_bootstrap_interval_of_valid_inputs_contains_the_estimate():
    labels = LOGITS.argmax(axis=1)
    labels[:2] = (labels[:2] + 1) % 3
    low, high = bootstrap_interval(class_accuracy, {"domain.logits": LOGITS}, {}, labels, 50, seed=2**64 - 1)
    assert 0 <= low <= 4 / 6 <= high <= 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"resamples": 0}, r"`resamples`=0 must be an integer >= 2"),
        ({"resamples": 1}, r"`resamples`=1 must be an integer >= 2"),
        ({"resamples": 2.5}, r"`resamples`=2\.5 must be an integer >= 2"),
        ({"resamples": True}, r"`resamples`=True must be an integer >= 2"),
        ({"confidence": float("nan")}, r"`confidence`=nan must be a finite number in \(0, 1\)"),
        ({"confidence": 1.0}, r"`confidence`=1\.0 must be a finite number in \(0, 1\)"),
        ({"seed": -1}, r"`seed`=-1 must be an integer in 0\.\.18446744073709551615"),
        ({"seed": 1.5}, r"`seed`=1\.5 must be an integer"),
    ],
)
def test_bootstrap_and_paired_comparison_refuse_counts_and_seeds(options, match):
    generated, labels = {"domain.logits": LOGITS}, LOGITS.argmax(axis=1)
    arguments = {"resamples": 10, **options}
    with pytest.raises(DiTOptimumError, match=match):
        bootstrap_interval(class_accuracy, generated, {}, labels, **arguments)
    with pytest.raises(DiTOptimumError, match=match):
        paired_comparison(class_accuracy, generated, generated, {}, labels, **arguments)


def test_bootstrap_refuses_no_samples_and_labels_of_another_length():
    with pytest.raises(DiTOptimumError, match="`generated` has no samples"):
        bootstrap_interval(class_accuracy, {"domain.logits": np.zeros((0, 3))}, {}, np.zeros(0, np.int64), 10)
    with pytest.raises(DiTOptimumError, match=r"one label per sample \(6\), got shape \(2,\)"):
        bootstrap_interval(class_accuracy, {"domain.logits": LOGITS}, {}, np.zeros(2, np.int64), 10)
    with pytest.raises(DiTOptimumError, match=r"one label per sample \(6\), got shape \(2,\)"):
        paired_comparison(class_accuracy, {"domain.logits": LOGITS}, {"domain.logits": LOGITS}, {}, np.zeros(2), 10)


def test_paired_comparison_of_identical_cells_is_zero():
    generated, labels = {"domain.logits": LOGITS}, LOGITS.argmax(axis=1)
    result = paired_comparison(class_accuracy, generated, generated, {}, labels, 10)
    assert (result.difference, result.low, result.high, result.significant) == (0.0, 0.0, 0.0, False)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_subsets": 1.5}, r"`num_subsets`=1\.5 must be a positive integer"),
        ({"num_subsets": 0}, r"`num_subsets`=0 must be a positive integer"),
        ({"subset_size": 0}, r"`subset_size`=0 must be a positive integer"),
        ({"seed": -1}, r"`seed`=-1 must be an integer in 0\.\."),
    ],
)
def test_kernel_inception_distance_refuses_counts_and_seeds(options, match):
    with pytest.raises(DiTOptimumError, match=match):
        kernel_inception_distance(REFERENCE, REFERENCE, **options)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_extract_features_refuses_a_non_positive_batch_size(batch_size):
    with pytest.raises(DiTOptimumError, match=rf"`batch_size`={batch_size!r} must be a positive integer"):
        extract_features(np.zeros((2, 8, 8, 3), np.uint8), TinyFeatureExtractor(), batch_size=batch_size)


def test_extract_features_refuses_empty_images_and_keeps_zero_images_empty():
    with pytest.raises(DiTOptimumError, match=r"H, W >= 1, got uint8 \(2, 0, 0, 3\)"):
        extract_features(np.zeros((2, 0, 0, 3), np.uint8), TinyFeatureExtractor())
    assert extract_features(np.zeros((0, 8, 8, 3), np.uint8), TinyFeatureExtractor()) == {}
    features = extract_features(np.zeros((3, 8, 8, 3), np.uint8), TinyFeatureExtractor(), batch_size=2)
    assert all(len(value) == 3 and np.isfinite(value).all() for value in features.values())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_to_uint8_refuses_non_finite_images(bad):
    images = np.full((1, 2, 2, 3), 0.5, np.float32)
    images[0, 1, 1, 2] = bad
    with pytest.raises(DiTOptimumError, match="`images` has 1 NaN or infinite values"):
        to_uint8(images)
    with pytest.raises(DiTOptimumError, match="`images` has 1 NaN or infinite values"):
        to_uint8(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert (to_uint8(np.full((1, 2, 2, 3), 0.5, np.float32)) == 128).all()


def test_moe_routing_of_zero_tokens_is_zero_not_nan():
    layer = MoEFeedForward(8, 4, 16, top_k=2, router_z_loss_weight=0.1)
    output = layer(torch.zeros(0, 5, 8))
    assert output.shape == (0, 5, 8)
    assert layer.aux_loss.item() == 0.0
    assert {name: value.tolist() for name, value in layer.last_stats.items()} == {
        "load": [0.0] * 4,
        "load_entropy": 0.0,
        "max_over_mean_load": 0.0,
        "dropped_fraction": 0.0,
        "balance_loss": 0.0,
    }
    layer(torch.randn(2, 5, 8))  # a real batch afterwards still routes every token
    assert layer.last_stats["load"].sum().item() == pytest.approx(1.0)
    assert torch.isfinite(layer.aux_loss)


def test_moe_model_forward_of_a_batch_of_zero_is_empty():
    model = tiny_model(moe_num_experts=4, moe_top_k=2).eval()
    with torch.no_grad():
        sample = model(torch.zeros(0, 4, 8, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert sample.sample.shape[0] == 0 and sample.sample.shape[2:] == (8, 8)
