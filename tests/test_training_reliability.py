"""Trainer reliability: checkpoints without pickle, resume with changed settings, option checks, the folder lock."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit_optimum import DiTOptimumPipeline
from dit_optimum.errors import DiTOptimumError
from dit_optimum.training import train
from dit_optimum.training.cli import main as train_cli
from test_training import ROOT, cli_args, losses, tiny_run

CHECKPOINT_FILES = [
    "ema.safetensors",
    "model.safetensors",
    "optimizer.safetensors",
    "projections.safetensors",
    "rng_state_0.safetensors",
    "trainer_state.json",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run of 3 steps with its final checkpoint (step_3); copy it before changing it."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_run(folder, steps=3))
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return DiTOptimumPipeline.from_pretrained(output_dir / "pipeline").transformer.state_dict()


def same_weights(a: Path, b: Path) -> bool:
    first, second = weights(a), weights(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


class _Payload:
    """Unpickling this writes ``marker``: the code a hostile checkpoint file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


# --- checkpoints: safetensors and JSON only -------------------------------------------------------------------


def test_a_checkpoint_holds_only_safetensors_and_json(finished_run):
    checkpoint = finished_run / "checkpoints" / "step_3"
    assert sorted(os.listdir(checkpoint)) == CHECKPOINT_FILES
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["config"]["learning_rate"] == 1e-3
    assert load_file(checkpoint / "rng_state_0.safetensors")["cpu"].dtype == torch.uint8


def test_the_payload_used_below_really_runs_code_when_unpickled(tmp_path):
    pickle.loads(pickle.dumps(_Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").is_file()


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "notes.txt"])
def test_resume_refuses_a_planted_file_before_reading_anything(run_copy, tmp_path, name):
    marker = tmp_path / "marker"
    (run_copy / "checkpoints" / "step_3" / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DiTOptimumError, match=rf"{name}.*could run code"):
        train(tiny_run(run_copy, steps=5, resume=True))
    assert not marker.exists()


def test_resume_refuses_an_old_accelerate_checkpoint(run_copy, tmp_path):
    checkpoint = run_copy / "checkpoints" / "step_3"
    for name in os.listdir(checkpoint):
        (checkpoint / name).unlink()
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    (checkpoint / "trainer_state.json").write_text('{"step": 3}')
    with pytest.raises(DiTOptimumError, match=r"custom_checkpoint_0\.pkl.*could run code"):
        train(tiny_run(run_copy, steps=5, resume=True))
    assert not (tmp_path / "marker").exists()


def test_resume_never_unpickles(run_copy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on the resume path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    train(tiny_run(run_copy, steps=4, resume=True))
    assert [int(v) for v in losses(run_copy, "step")] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", [*CHECKPOINT_FILES])
def test_a_truncated_checkpoint_file_is_named(run_copy, name):
    path = run_copy / "checkpoints" / "step_3" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DiTOptimumError, match=rf"{name}"):
        train(tiny_run(run_copy, steps=5, resume=True))


@pytest.mark.parametrize("content", ["[]", '{"format": 1}', "null"])
def test_a_malformed_trainer_state_is_named(run_copy, content):
    (run_copy / "checkpoints" / "step_3" / "trainer_state.json").write_text(content)
    with pytest.raises(DiTOptimumError, match=r"trainer_state\.json"):
        train(tiny_run(run_copy, steps=5, resume=True))


@pytest.mark.parametrize(("key", "value"), [("history", []), ("processes", 10**12), ("step", 4), ("ema", None)])
def test_a_trainer_state_with_a_wrong_field_is_named(run_copy, key, value):
    path = run_copy / "checkpoints" / "step_3" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(DiTOptimumError, match=r"step_3"):
        train(tiny_run(run_copy, steps=5, resume=True))


@pytest.mark.parametrize(
    ("name", "message"),
    [("ema.safetensors", r"missing ema\.safetensors"), ("rng_state_0.safetensors", r"expected rng_state_0\.\.0\.")],
)
def test_a_missing_checkpoint_file_is_named(run_copy, name, message):
    (run_copy / "checkpoints" / "step_3" / name).unlink()
    with pytest.raises(DiTOptimumError, match=message):
        train(tiny_run(run_copy, steps=5, resume=True))


def test_a_stray_folder_in_checkpoints_is_ignored(run_copy):
    (run_copy / "checkpoints" / "step_notanumber").mkdir()
    (run_copy / "checkpoints" / ".step_9.tmp").mkdir()  # left by a run killed while writing
    train(tiny_run(run_copy, steps=4, resume=True))
    assert not (run_copy / "checkpoints" / ".step_9.tmp").exists()


def test_dropout_runs_resume_bit_identically(tmp_path):
    # Model dropout draws from the global RNG: the checkpoint must carry its state.
    dropout = {"num_layers": 2, "dropout": 0.3}
    train(tiny_run(tmp_path / "reference", steps=6, model_overrides=dropout))
    train(tiny_run(tmp_path / "resumed", steps=3, model_overrides=dropout))
    train(tiny_run(tmp_path / "resumed", steps=6, model_overrides=dropout, resume=True))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "reference")
    assert same_weights(tmp_path / "resumed", tmp_path / "reference")


def test_two_processes_resume_from_one_checkpoint(tmp_path):
    common = cli_args("--max-samples", "16", "--checkpoint-every", "2")
    assert train_cli("base", ["--output-dir", str(tmp_path / "one"), "--steps", "8", *common]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = [*torchrun, str(ROOT / "scripts" / "train.py"), "--output-dir", str(tmp_path / "two"), *common]
    for extra in (["--steps", "4"], ["--steps", "8", "--resume"]):
        result = subprocess.run([*script, *extra], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        names = os.listdir(tmp_path / "two" / "checkpoints" / f"step_{extra[1]}")
        assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= set(names)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 8
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 1e-3


# --- resume with changed settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"learning_rate": 2e-3}, r"learning_rate: 0\.001 -> 0\.002"),
        ({"batch_size": 4}, r"batch_size: 8 -> 4"),
        ({"seed": 1}, r"seed: 0 -> 1"),
        ({"max_samples": 16}, r"max_samples: 8 -> 16"),
        ({"model": "DiT-XS/2"}, r"model: \"DiT-XS/4\" -> \"DiT-XS/2\""),
        ({"model_overrides": {"num_layers": 1}}, r"model_overrides: \{\"num_layers\": 2\} -> \{\"num_layers\": 1\}"),
        ({"max_grad_norm": 1.0}, r"max_grad_norm: null -> 1\.0"),
        ({"ema_decay": 0.99}, r"ema_decay: 0\.9 -> 0\.99"),
        ({"ema_warmup": False}, r"ema_warmup: true -> false"),
        ({"weight_decay": 0.01}, r"weight_decay: 0\.0 -> 0\.01"),
        ({"mixed_precision": "bf16"}, r"mixed_precision: \"no\" -> \"bf16\""),
        ({"image_size": 16}, r"image_size: 8 -> 16"),
        ({"learning_rate": 2e-3, "seed": 3}, r"learning_rate: 0\.001 -> 0\.002; seed: 0 -> 3"),
    ],
)
def test_resume_with_changed_settings_is_refused(run_copy, changes, message):
    with pytest.raises(DiTOptimumError, match=message) as error:
        train(tiny_run(run_copy, steps=5, resume=True, **changes))
    assert "same settings" in str(error.value) and "new output folder" in str(error.value)
    assert [int(v) for v in losses(run_copy, "step")] == [1, 2, 3]  # nothing trained, log untouched


def test_resume_with_more_steps_and_other_logging_continues_and_records_it(finished_run, run_copy, tmp_path):
    train(tiny_run(tmp_path / "reference", steps=5))
    changed = {"checkpoint_every": 2, "log_every": 2, "keep_checkpoints": 1}
    train(tiny_run(run_copy, steps=5, resume=True, **changed))
    assert same_weights(run_copy, tmp_path / "reference")
    assert [int(v) for v in losses(run_copy, "step")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step_5"]
    record = json.loads((run_copy / "train_log.config.json").read_text())
    assert record["config"]["steps"] == 3 and record["config"]["log_every"] == 1
    assert record["resumes"][0]["changed"].pop("output_dir") == [str(finished_run), str(run_copy)]  # copied
    assert record["resumes"] == [
        {
            "start_step": 3,
            "changed": {
                "steps": [3, 5],
                "checkpoint_every": [1000, 2],
                "keep_checkpoints": [2, 1],
                "log_every": [1, 2],
            },
        }
    ]
    train(tiny_run(run_copy, steps=6, resume=True, **changed))
    record = json.loads((run_copy / "train_log.config.json").read_text())
    assert [entry["start_step"] for entry in record["resumes"]] == [3, 5]
    assert record["resumes"][1]["changed"] == {"steps": [5, 6]}


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(run_copy):
    state_file = run_copy / "checkpoints" / "step_3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for name in ("pretrained", "finetune", "lora_rank", "lora_alpha", "lora_targets"):
        del state["config"][name]  # as written before fine-tuning existed
    state_file.write_text(json.dumps(state))
    train(tiny_run(run_copy, steps=4, resume=True))
    assert [int(v) for v in losses(run_copy, "step")] == [1, 2, 3, 4]
    with pytest.raises(DiTOptimumError, match=r"finetune: \"full\" -> \"lora\""):
        train(tiny_run(run_copy, steps=5, resume=True, pretrained="p", finetune="lora", model_overrides={}))


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(run_copy):
    with pytest.raises(DiTOptimumError, match=r"`steps`=2 .*step 3"):
        train(tiny_run(run_copy, steps=2, resume=True))


def test_learning_rate_warms_up_linearly_then_stays_or_follows_a_cosine_to_zero(tmp_path):
    constant = tiny_run(tmp_path / "a", steps=10, learning_rate=1.0, warmup_steps=2)
    assert [constant.learning_rate_at(step) for step in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    cosine = tiny_run(tmp_path / "b", steps=10, learning_rate=1.0, warmup_steps=2, lr_schedule="cosine")
    rates = [cosine.learning_rate_at(step) for step in range(12)]
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[6] == pytest.approx(0.5) and rates[10:] == [0.0, 0.0]
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates[1:]))


def test_a_cosine_run_resumes_only_to_its_own_end(tmp_path):
    """Changing `steps` moves the end of a cosine schedule, so every later rate would change: refused."""
    train(tiny_run(tmp_path / "run", steps=2, lr_schedule="cosine", checkpoint_every=1))
    with pytest.raises(DiTOptimumError, match=r"steps: 2 -> 3"):
        train(tiny_run(tmp_path / "run", steps=3, resume=True, lr_schedule="cosine"))
    with pytest.raises(DiTOptimumError, match=r"lr_schedule: \"cosine\" -> \"constant\""):
        train(tiny_run(tmp_path / "run", steps=2, resume=True))


def test_resume_compares_data_by_content_not_by_path(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / label / f"{index}.png")
    train(tiny_run(tmp_path / "run", steps=2, data=str(folder), channels=3))
    moved = shutil.move(folder, tmp_path / "moved")
    train(tiny_run(tmp_path / "run", steps=3, resume=True, data=str(moved), channels=3))
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(Path(moved) / "a" / "0.png")
    with pytest.raises(DiTOptimumError, match=r"`data`=.*different content"):
        train(tiny_run(tmp_path / "run", steps=4, resume=True, data=str(moved), channels=3))
    record = json.loads((tmp_path / "run" / "train_log.config.json").read_text())
    assert record["resumes"][0]["changed"] == {"data": [str(folder), str(moved)], "steps": [2, 3]}


def test_resume_compares_the_teacher_by_content_not_by_path(tmp_path):
    teacher = train(tiny_run(tmp_path / "teacher", steps=2))
    other = train(tiny_run(tmp_path / "other", steps=3))
    distill = {"teacher": str(teacher), "alpha": 0.5}
    train(tiny_run(tmp_path / "student", steps=2, **distill))
    moved = shutil.copytree(teacher, tmp_path / "moved")
    train(tiny_run(tmp_path / "student", steps=3, resume=True, **{**distill, "teacher": str(moved)}))
    with pytest.raises(DiTOptimumError, match=r"`teacher`=.*different content"):
        train(tiny_run(tmp_path / "student", steps=4, resume=True, **{**distill, "teacher": str(other)}))


# --- every option checked before work starts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": "1e-3"}, "learning_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.5}, "ema_decay"),
        ({"alpha": -0.1}, "alpha"),
        ({"feature_weight": -1.0}, "feature_weight"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**40}, "seed"),
        ({"steps": 5.0}, "steps"),
        ({"steps": True}, "steps"),
        ({"batch_size": "8"}, "batch_size"),
        ({"channels": True}, "channels"),
        ({"max_samples": 2.5}, "max_samples"),
        ({"skip_corrupt": "yes"}, "skip_corrupt"),
        ({"resume": 1}, "resume"),
        ({"model": "DiT-Q/3"}, "DiT-Q/3"),
        ({"model_overrides": [["num_layers", 2]]}, "model_overrides"),
        ({"model_overrides": {"bogus_key": 1}}, "bogus_key"),
        ({"model_overrides": {"sample_size": 8}}, r"sample_size.*image-size"),
        ({"model_overrides": {"num_embeds_ada_norm": 3}}, "num_embeds_ada_norm"),
        ({"model_overrides": {"num_layers": object()}}, "model_overrides"),
        ({"mixed_precision": "fp8"}, r"mixed_precision.*no, bf16, fp16"),
        ({"lr_schedule": "linear"}, r"lr_schedule.*constant, cosine"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"teacher": "t", "feature_blocks": ["a"]}, "feature_blocks"),
        ({"teacher": "t", "feature_blocks": [True]}, "feature_blocks"),
        ({"teacher": "t", "feature_blocks": [-1]}, "feature_blocks"),
        ({"teacher": "t", "feature_blocks": [2]}, r"feature_blocks.*0\.\.1"),
        ({"teacher": "t", "feature_blocks": [0, 0]}, "feature_blocks"),
        ({"teacher": "t", "feature_blocks": 0}, "feature_blocks"),
        ({"teacher": ""}, "teacher"),
        ({"data": ""}, "data"),
        ({"output_dir": ""}, "output_dir"),
    ],
)
def test_bad_options_are_refused_before_anything_happens(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)  # `output_dir`="" would be the current folder
    options = {"output_dir": str(tmp_path / "run"), **overrides}
    with pytest.raises(DiTOptimumError, match=message):
        train(tiny_run(**options))
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("value", ["[1, 2]", "3", "{bad json", '"text"'])
def test_cli_model_config_must_be_a_json_object(tmp_path, capsys, value):
    code = train_cli("base", [*cli_args("--output-dir", str(tmp_path / "run")), "--model-config", value])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and "--model-config" in error
    assert not (tmp_path / "run").exists()


def test_cli_prints_a_bad_option_as_one_line(tmp_path, capsys):
    code = train_cli("base", [*cli_args("--output-dir", str(tmp_path / "run")), "--max-grad-norm", "-1"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error: ") and "\n" not in error and "max_grad_norm" in error


def test_cli_feature_blocks_must_be_integers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli("distill", ["--output-dir", str(tmp_path), "--teacher", "t", "--feature-blocks", "1,x"])
    assert exit_info.value.code == 2 and "--feature-blocks" in capsys.readouterr().err


# --- one run per output folder ---------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--output-dir", str(tmp_path), "--steps", "100000"]
    process = subprocess.Popen([*command, *cli_args()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "train_log.csv"
        deadline = time.time() + 120
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert process.poll() is None, "the first run ended early"
            assert time.time() < deadline, "the first run did not start logging"
            time.sleep(0.05)
        with pytest.raises(DiTOptimumError, match=rf"in use by PID {process.pid}\b"):
            train(tiny_run(tmp_path, resume=True))
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The lock dies with its process: the folder is usable again.
    train(tiny_run(tmp_path, steps=1, resume=True))


def test_a_teacher_that_is_not_a_pipeline_is_named(tmp_path):
    (tmp_path / "teacher").mkdir()
    with pytest.raises(DiTOptimumError, match=r"`teacher`=.*teacher'.*cannot be loaded"):
        train(tiny_run(tmp_path / "run", teacher=str(tmp_path / "teacher")))


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_training(tmp_path):
    with pytest.raises(DiTOptimumError, match=r"`batch_size`=10000000000 .*GiB"):
        train(tiny_run(tmp_path, batch_size=10_000_000_000))
    assert not (tmp_path / "train_log.csv").exists()


# --- one home per training option ------------------------------------------------------------------------------


def test_script_options_come_from_train_config_fields():
    import dataclasses

    from dit_optimum.benchmark.settings import TrainingRecipe
    from dit_optimum.training import TrainConfig
    from dit_optimum.training.cli import MODES, build_parser, config_from_args

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    offered = set()
    for mode in MODES:
        required = {
            "distill": {"teacher": "t"},
            "lora": {"pretrained": "p"},
            "steps": {"pretrained": "p", "student_steps": 4},
        }.get(mode, {})
        flags = [part for name, value in required.items() for part in (f"--{name.replace('_', '-')}", str(value))]
        args = build_parser(mode).parse_args(["--output-dir", "out", *flags])
        config = config_from_args(args, mode)
        offered |= {f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
        expected = TrainConfig(output_dir="out", **required)
        for name in names - {"model_overrides", "finetune"}:
            assert getattr(config, name) == getattr(expected, name), (mode, name)
    assert offered == names  # every field is an option of some script
    assert build_parser("base").parse_args(["--output-dir", "o", "--lr", "0.5"]).learning_rate == 0.5
    assert build_parser("base").parse_args(["--output-dir", "o", "--no-ema-warmup"]).ema_warmup is False
    assert build_parser("lora").parse_args(["--output-dir", "o", "--pretrained", "p"]).finetune == "lora"
    recipe = {f.name for f in dataclasses.fields(TrainingRecipe)} - {"recovery_steps"}
    assert recipe <= names  # the benchmark's recipe sets TrainConfig fields by name
