"""The benchmark refuses bad settings before its first cell, holds its output folder alone, and never locks itself
out of a corrected rerun."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import pytest

from conftest import TinyFeatureExtractor
from dit_optimum import DiTOptimumError
from dit_optimum.benchmark import TrainingRecipe, load_results, run_benchmark
from dit_optimum.cli import main as cli
from dit_optimum.utils import folder_lock
from test_benchmark import tiny_settings

BAD_ARGUMENTS = [
    (["--techniques", ","], "`--techniques` names no entry"),
    (["--variants", " , "], "`--variants` names no entry"),
    (["--metrics", ","], "`--metrics` names no metric"),
    (["--train-steps", "0"], "`steps`=0"),
    (["--learning-rate", "-1"], "learning_rate"),
    (["--learning-rate", "nan"], "learning_rate"),
    (["--channels", "2"], r"`channels`=2 is not allowed; allowed values: \(1, 3\)"),
    (["--image-size", "15"], "`sample_size`=15 must be a multiple of `patch_size`=4"),
    (["--image-size", "0"], "image_size"),
    (["--metrics", "kid", "--num-samples", "10000000"], r"`num_samples`=10000000 .* GiB"),
    (["--num-samples", "100000000"], r"`num_samples`=100000000 .* GiB"),
    (["--speed-batch-size", "100000000"], r"speed_batch_size.* GiB of activations"),
    (["--batch-size", "100000000"], r"`batch_size`=.* GiB of activations"),
    (["--image-size", "4096"], "GiB"),
    (["--steps", "1001"], "num_inference_steps"),
    (["--guidance-scale", "0.5"], "guidance_scale"),
    (["--pretrained", "DiT-XS/4=./no/such/pipeline"], "`pretrained`='./no/such/pipeline' does not exist"),
    (["--data", "./no/such/folder"], "`data`='./no/such/folder' does not exist"),
    (["--reference", "/no/such/images"], "`reference`='/no/such/images' does not exist"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_ARGUMENTS, ids=[" ".join(a[0]) for a in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, arguments, message):
    out = tmp_path / "bench"
    assert cli(["benchmark", *arguments, "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert __import__("re").search(message, error), error
    assert not out.exists()


def test_a_run_whose_cells_all_failed_does_not_lock_out_the_corrected_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))

    def failing_trainer(config):
        raise RuntimeError("no disk")

    settings = tiny_settings(tmp_path / "bench", techniques=("baseline",))
    rows = run_benchmark(settings, inception=TinyFeatureExtractor(), trainer=failing_trainer)
    assert rows[0]["status"] == "failed" and "no disk" in rows[0]["error"]
    corrected = replace(settings, training=TrainingRecipe(steps=2, batch_size=8, checkpoint_every=2))
    rows = run_benchmark(corrected, inception=TinyFeatureExtractor())
    assert rows[0]["status"] == "ok"
    changed = replace(settings, training=TrainingRecipe(steps=4, batch_size=8, checkpoint_every=2))
    with pytest.raises(DiTOptimumError, match=r"other settings \(results.json -> this run: training.steps: 2 -> 4\)"):
        run_benchmark(changed, inception=TinyFeatureExtractor())


def test_a_damaged_results_file_is_named(tmp_path):
    (tmp_path / "results.json").write_text('{"settings": {}, "rows": [')
    with pytest.raises(DiTOptimumError, match=r"results file .*results\.json.* is damaged"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(DiTOptimumError, match="not a dit-optimum results file"):
        load_results(tmp_path)


def test_a_second_run_on_one_folder_is_refused_and_a_dead_owner_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "bench"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dit_optimum.utils import folder_lock\n"
            f"with folder_lock({str(out)!r}, 'benchmark'):\n    print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli(["benchmark", "--techniques", "baseline", "--train-steps", "1", "--output-dir", str(out)]) == 2
        error = capsys.readouterr().err
        assert f"is in use by PID {holder.pid}" in error and "benchmark since" in error
        with pytest.raises(DiTOptimumError, match="in use"), folder_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's lock: the next run takes it over
        try:
            with folder_lock(out):
                break
        except DiTOptimumError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert not (out / "results.json").exists()


def test_a_results_folder_from_before_a_setting_existed_stays_usable(tmp_path):
    from dit_optimum.benchmark.runner import _check_comparable
    from dit_optimum.benchmark.settings import BenchmarkSettings

    settings = BenchmarkSettings(output_dir=str(tmp_path))
    stored = settings.comparable()
    del stored["training"]["recovery_steps"]  # written before recovery existed
    previous = {"settings": stored, "rows": [{"status": "ok"}]}
    _check_comparable(previous, settings)  # the missing setting had its default: comparable
    settings.training.recovery_steps = 50
    with pytest.raises(
        DiTOptimumError, match=r"other settings \(results.json -> this run: training.recovery_steps: 400 -> 50\)"
    ):
        _check_comparable(previous, settings)
    del stored["training"]["prediction_type"]  # written before the recipe chose what its networks predict
    settings.training.recovery_steps = 400
    _check_comparable(previous, settings)  # noise prediction, as every run before
    settings.training.prediction_type = "v_prediction"
    with pytest.raises(DiTOptimumError, match=r"training.prediction_type: \"epsilon\" -> \"v_prediction\""):
        _check_comparable(previous, settings)
