"""The one write path (dit_optimum.files) under faults: planted links, a folder of a user's same-named files, a full
or read-only disk, over-long names, hostile manifests, two writers at once. Nothing the package did not write is
lost, nothing is written through a link, and every failure is one line naming the path."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from diffusers import DDIMScheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from dit_optimum import DiTOptimumError, DiTOptimumPipeline
from dit_optimum.cli import main as cli
from dit_optimum.errors import OutputPathError
from dit_optimum.files import (
    LOCK_FILE,
    MANIFEST_FILE,
    check_writable,
    claim_files,
    copy_regular_files,
    folder_lock,
    read_manifest,
    write_json,
    write_text,
)


def make_pipeline(**overrides) -> DiTOptimumPipeline:
    return DiTOptimumPipeline(transformer=tiny_model(**overrides), vae=None, scheduler=DDIMScheduler())


def digest(folder: Path) -> dict[str, str]:
    """Every regular file under ``folder`` (links not followed) with its content hash."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def sentinel(tmp_path):
    """A file outside every output folder that a planted link points at: it must never change."""
    path = tmp_path / "outside" / "precious.txt"
    path.parent.mkdir()
    path.write_text("do not touch")
    return path


@contextmanager
def small_filesystem(folder: Path, size_kib: int = 64, read_only: bool = False):
    """A tiny (or read-only) tmpfs at ``folder``; skips where mounting is not allowed (not root, no privileges)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the injected-error tests cover this class)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --- data loss -------------------------------------------------------------------------------------------------------


def test_overwrite_replaces_only_the_saves_own_files_and_says_so(tmp_path, caplog):
    target = tmp_path / "work"
    (target / "transformer").mkdir(parents=True)
    (target / "scheduler").mkdir()
    (target / "scheduler" / "scheduler_config.json").write_text("{}")  # a namesake the user asks to replace
    keep = {
        "transformer/diffusion_pytorch_model.fp16.safetensors": b"fp16",
        "transformer/diffusion_pytorch_model.ema.safetensors": b"ema",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": b"users shard",
        "notes.md": b"notes",
    }
    for name, data in keep.items():
        (target / name).write_bytes(data)
    with pytest.raises(DiTOptimumError, match="not an earlier save"):
        make_pipeline().save_pretrained(target)
    with caplog.at_level("INFO", logger="dit_optimum.files"):
        make_pipeline().save_pretrained(target, overwrite=True)
    assert "scheduler/scheduler_config.json" in caplog.text
    assert json.loads((target / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    assert all((target / name).read_bytes() == data for name, data in keep.items())
    owned = read_manifest(target)
    assert "model_index.json" in owned and "transformer/diffusion_pytorch_model.safetensors" in owned
    assert not any(name in owned for name in keep)


def test_stale_weights_of_an_earlier_save_go_but_other_variants_stay(tmp_path):
    target = tmp_path / "pipe"
    model = tiny_model()
    model.save_pretrained(target, max_shard_size="20KB")
    shards = sorted(p.name for p in target.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    (target / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"users fp16")
    model.save_pretrained(target)  # unsharded now: the earlier save's shards and index would confuse a load
    names = sorted(p.name for p in target.iterdir() if not p.name.startswith("."))
    assert names == ["config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]


def test_saving_inside_the_folder_it_was_loaded_from_is_refused(tmp_path):
    source = tmp_path / "src"
    make_pipeline().save_pretrained(source)
    before = digest(source)
    loaded = DiTOptimumPipeline.from_pretrained(source)
    for inside in (source / "transformer", source / "scheduler" / "new"):
        with pytest.raises(DiTOptimumError, match=r"inside .*the folder this was loaded from"):
            loaded.save_pretrained(inside, overwrite=True)
    with pytest.raises(DiTOptimumError, match="inside"):
        loaded.transformer.save_pretrained(source / "transformer" / "x", overwrite=True)
    assert cli(["prune", str(source), str(source / "transformer"), "--heads", "0.5", "--overwrite"]) == 2
    assert digest(source) == before
    loaded.save_pretrained(source)  # into the source itself: file by file, the pipeline stays loadable
    assert DiTOptimumPipeline.from_pretrained(source).transformer.config.num_layers == 2


def test_fixed_name_files_of_a_user_are_refused_before_any_work(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "report.md").write_text("my report")
    with pytest.raises(DiTOptimumError, match=r"already holds 'report\.md', which dit-optimum did not write"):
        claim_files(folder, ["results.json", "report.md"])
    claim_files(folder, ["report.md"], overwrite=True)
    with pytest.raises(DiTOptimumError, match="did not write"):
        write_text(folder, "report.md", "new")
    assert (folder / "report.md").read_text() == "my report"
    write_text(folder, "report.md", "new", overwrite=True)
    write_text(folder, "report.md", "newer")  # now the package's own file
    assert (folder / "report.md").read_text() == "newer"


def test_architecture_and_training_refuse_a_users_same_named_file(tmp_path, capsys):
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "architecture.json").write_text("mine")
    assert cli(["architecture", "--presets", "DiT-XS/4", "--output-dir", str(folder)]) == 2
    assert "architecture.json" in capsys.readouterr().err
    assert (folder / "architecture.json").read_text() == "mine"

    from dit_optimum.training.cli import main as train_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.csv").write_text("step,loss\n1,0.5\n")
    argv = ["--model", "DiT-XS/4", "--model-config", '{"num_layers": 1}', "--image-size", "8", "--channels", "1"]
    argv += ["--max-samples", "16", "--batch-size", "8", "--steps", "1", "--output-dir", str(run)]
    assert train_main("base", argv) == 2
    assert "train_log.csv" in capsys.readouterr().err
    assert (run / "train_log.csv").read_text() == "step,loss\n1,0.5\n"
    assert train_main("base", [*argv, "--output-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "SRC", "", "--heads", "0.5"],
        ["architecture", "--output-dir", ""],
        ["evaluate", "SRC", "--output", ""],
        ["export-space", "", "out"],
    ],
)
def test_an_empty_path_is_a_usage_error_not_the_current_folder(tmp_path, monkeypatch, argv, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep")
    argv = [str(tmp_path / "src") if a == "SRC" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2 and "empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


# --- links -----------------------------------------------------------------------------------------------------------


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_kept(tmp_path, sentinel):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / LOCK_FILE).symlink_to(sentinel)
    with pytest.raises(OutputPathError, match="link"), folder_lock(folder):
        pass
    assert sentinel.read_text() == "do not touch"
    os.unlink(folder / LOCK_FILE)
    os.mkfifo(folder / LOCK_FILE)
    with pytest.raises(OutputPathError, match="not a regular file"), folder_lock(folder):
        pass


def test_links_planted_at_output_names_are_never_written_through(tmp_path, sentinel):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.md").symlink_to(sentinel)
    with pytest.raises(OutputPathError, match="link"):
        claim_files(folder, ["report.md"], overwrite=True)
    with pytest.raises(OutputPathError, match="link"):
        write_text(folder, "report.md", "x", overwrite=True)
    (folder / "plots").symlink_to(sentinel.parent, target_is_directory=True)
    with pytest.raises(OutputPathError, match="symbolic link"):
        write_text(folder, "plots/pareto.png", "x", overwrite=True)
    saved = tmp_path / "pipe"
    make_pipeline().save_pretrained(saved)
    os.replace(saved / "model_index.json", tmp_path / "index.json")
    (saved / "model_index.json").symlink_to(sentinel)
    with pytest.raises(OutputPathError, match="link"):
        make_pipeline().save_pretrained(saved)
    (saved / "model_index.json").unlink()
    os.replace(tmp_path / "index.json", saved / "model_index.json")
    import shutil

    shutil.rmtree(saved / "transformer")
    (saved / "transformer").symlink_to(sentinel.parent, target_is_directory=True)
    with pytest.raises(OutputPathError, match="symbolic link"):
        make_pipeline().save_pretrained(saved)
    assert sorted(p.name for p in sentinel.parent.iterdir()) == ["precious.txt"]
    assert sentinel.read_text() == "do not touch"


def test_staging_for_upload_copies_regular_files_inside_only(tmp_path, sentinel):
    pipe = tmp_path / "pipe"
    make_pipeline().save_pretrained(pipe)
    token = tmp_path / "hf" / "token"
    token.parent.mkdir()
    token.write_text("hf_secret_token")
    (pipe / ".env").write_text("HF_TOKEN=hf_secret_token")  # hidden: never staged
    staged = copy_regular_files(pipe, tmp_path / "plain")
    assert "transformer/diffusion_pytorch_model.safetensors" in staged and ".env" not in staged
    assert not any(b"hf_secret_token" in p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file())
    plants = {
        "token": lambda: (pipe / "token").symlink_to(token),
        "transformer/extra.safetensors": lambda: (pipe / "transformer" / "extra.safetensors").symlink_to(token),
        "elsewhere": lambda: (pipe / "elsewhere").symlink_to(sentinel.parent, target_is_directory=True),
        "fifo": lambda: os.mkfifo(pipe / "fifo"),
    }
    for name, plant in plants.items():
        plant()
        with pytest.raises(DiTOptimumError, match=rf"or special files \({name}\).*nothing was staged"):
            copy_regular_files(pipe, tmp_path / name.replace("/", "_"))
        assert not (tmp_path / name.replace("/", "_")).exists()
        (pipe / name).unlink()


# --- the environment failing ----------------------------------------------------------------------------------------


def test_a_full_disk_fails_in_one_line_and_keeps_the_earlier_save(tmp_path):
    disk = tmp_path / "disk"
    with small_filesystem(disk, size_kib=256):
        target = disk / "pipe"
        make_pipeline().save_pretrained(target)  # fits
        before = digest(target)
        with pytest.raises(OutputPathError, match=r"`save_directory`=.*No space left on device"):
            make_pipeline(num_layers=8).save_pretrained(target)
        assert digest(target) == before
        assert not [p for p in target.iterdir() if p.name.startswith(".dit_optimum-staging")]
        with pytest.raises(OutputPathError, match="No space left"):
            write_text(disk, "big.txt", "x" * 1024 * 1024)
        assert not (disk / "big.txt").exists()


def test_a_read_only_folder_fails_before_long_work(tmp_path, monkeypatch, capsys):
    disk = tmp_path / "ro"
    with small_filesystem(disk, read_only=True):
        with pytest.raises(OutputPathError, match="Read-only file system"):
            check_writable(disk / "out")
        with pytest.raises(OutputPathError, match="Read-only"):
            make_pipeline().save_pretrained(disk / "pipe")
        pipe = tmp_path / "pipe"
        make_pipeline().save_pretrained(pipe)

        def must_not_run(*args, **kwargs):
            raise AssertionError("the evaluation ran before the output was checked")

        monkeypatch.setattr("dit_optimum.evaluation.quality.evaluate_quality", must_not_run)
        assert cli(["evaluate", str(pipe), "--output", str(disk / "result.json")]) == 2
        assert "Read-only file system" in capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES])
def test_injected_os_errors_become_one_line_naming_the_path(tmp_path, monkeypatch, code):
    target = tmp_path / "pipe"
    make_pipeline().save_pretrained(target)
    before = digest(target)

    def failing_replace(source, destination):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("dit_optimum.files.os.replace", failing_replace)
    with pytest.raises(OutputPathError, match=rf"`save_directory`=.*pipe.*{os.strerror(code)}"):
        make_pipeline(num_layers=3).save_pretrained(target)
    with pytest.raises(OutputPathError, match=os.strerror(code)):
        write_json(tmp_path, "x.json", {"a": 1})
    monkeypatch.undo()
    assert digest(target) == before
    assert DiTOptimumPipeline.from_pretrained(target).transformer.config.num_layers == 2


def test_over_long_names_and_files_in_the_way_are_one_line(tmp_path):
    with pytest.raises(OutputPathError, match="File name too long"):
        make_pipeline().save_pretrained(tmp_path / ("x" * 300))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputPathError, match=r"a_file/pipe.*Not a directory"):
        make_pipeline().save_pretrained(a_file / "pipe")
    with pytest.raises(DiTOptimumError, match="is a file"):
        check_writable(a_file)
    assert a_file.read_text() == "x"


# --- files the package writes ------------------------------------------------------------------------------------


def test_json_is_strict_and_a_non_finite_number_is_named(tmp_path):
    with pytest.raises(DiTOptimumError, match=r"rows\[1\]\.fid.*not a finite number"):
        write_json(tmp_path, "results.json", {"rows": [{"fid": 1.0}, {"fid": float("nan")}]})
    assert not (tmp_path / "results.json").exists()
    write_json(tmp_path, "results.json", {"rows": [{"fid": 1.0}]})
    assert json.loads((tmp_path / "results.json").read_text()) == {"rows": [{"fid": 1.0}]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.recursive(st.none() | st.integers() | st.text(), st.lists)))
def test_a_hostile_manifest_only_makes_the_package_more_careful(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "report.md").write_text("the user's")
    data = content if isinstance(content, bytes) else json.dumps({"files": content}).encode()
    (folder / MANIFEST_FILE).write_bytes(data)
    owned = read_manifest(folder)
    assert owned is None or all(isinstance(n, str) and ".." not in n and not n.startswith("/") for n in owned)
    if not owned or "report.md" not in owned:
        with pytest.raises(DiTOptimumError):
            write_text(folder, "report.md", "x")
        assert (folder / "report.md").read_text() == "the user's"


def test_a_manifest_cannot_name_files_outside_the_folder(tmp_path, sentinel):
    folder = tmp_path / "pipe"
    make_pipeline().save_pretrained(folder)
    payload = {"files": ["../outside/precious.txt", str(sentinel), "transformer/../../outside/precious.txt"]}
    (folder / MANIFEST_FILE).write_text(json.dumps(payload))
    assert read_manifest(folder) == set()
    make_pipeline().save_pretrained(folder, overwrite=True)
    assert sentinel.read_text() == "do not touch"


def test_two_saves_into_one_folder_at_once_leave_one_whole_save(tmp_path):
    target = tmp_path / "pipe"
    pipelines = [make_pipeline(attention_type=kind) for kind in ("sdpa", "mqa", "shallow", "gqa")]
    errors: list[BaseException] = []

    def save(pipeline):
        try:
            pipeline.save_pretrained(target)
        except BaseException as error:  # collected: the assertion below reports them
            errors.append(error)

    threads = [threading.Thread(target=save, args=(p,)) for p in pipelines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [e for e in errors if not isinstance(e, DiTOptimumError)]
    assert not refused, refused
    loaded = DiTOptimumPipeline.from_pretrained(target)
    assert loaded.transformer.config.attention_type in {"sdpa", "mqa", "shallow", "gqa"}
    assert not [p for p in target.iterdir() if p.name.startswith(".dit_optimum-staging")]
    assert read_manifest(target) >= {"model_index.json", "transformer/diffusion_pytorch_model.safetensors"}


def test_a_fifo_in_a_checkpoint_is_refused_instead_of_blocking_the_resume(tmp_path, capsys):
    from dit_optimum.training.cli import main as train_main

    run = tmp_path / "run"
    argv = ["--model", "DiT-XS/4", "--model-config", '{"num_layers": 1}', "--image-size", "8", "--channels", "1"]
    argv += ["--max-samples", "16", "--batch-size", "8", "--checkpoint-every", "1", "--output-dir", str(run)]
    assert train_main("base", [*argv, "--steps", "1"]) == 0
    (checkpoint,) = (run / "checkpoints").iterdir()
    (checkpoint / "model.safetensors").unlink()
    os.mkfifo(checkpoint / "model.safetensors")
    capsys.readouterr()
    assert train_main("base", [*argv, "--steps", "2", "--resume"]) == 2
    error = capsys.readouterr().err
    assert "Cannot resume from" in error and "step_1/model.safetensors" in error and "FIFO" in error


# --- cases an outside tester found -----------------------------------------------------------------------------


def test_a_lock_left_by_a_failed_run_is_no_ownership_and_a_hard_linked_lock_is_refused(tmp_path):
    from dit_optimum.training.cli import main as train_main

    mine = tmp_path / "mine"
    argv = ["--model", "DiT-XS/4", "--model-config", '{"num_layers": 1}', "--image-size", "8", "--channels", "1"]
    argv += ["--max-samples", "16", "--batch-size", "8", "--steps", "1", "--output-dir", str(mine)]
    assert train_main("base", [*argv, "--data", str(tmp_path / "missing")]) == 2  # may leave a lock file behind
    mine.mkdir(exist_ok=True)
    (mine / LOCK_FILE).touch()
    (mine / "train_log.csv").write_text("step,loss\n1,0.5\n")
    assert train_main("base", argv) == 2
    assert (mine / "train_log.csv").read_text() == "step,loss\n1,0.5\n"

    user = tmp_path / "user.txt"
    user.write_text("data")
    folder = tmp_path / "out"
    folder.mkdir()
    os.link(user, folder / LOCK_FILE)
    with pytest.raises(OutputPathError, match="hard link"), folder_lock(folder):
        pass
    assert user.read_text() == "data"


def test_hard_links_and_the_token_itself_are_never_staged(tmp_path, monkeypatch):
    pipe = tmp_path / "pipe"
    make_pipeline().save_pretrained(pipe)
    secret = tmp_path / "token"
    secret.write_text("hf_abcdefghijklmnopqrstuvwxyz")
    os.link(secret, pipe / "notes.txt")
    with pytest.raises(DiTOptimumError, match=r"hard\) or special files \(notes\.txt\)"):
        copy_regular_files(pipe, tmp_path / "a")
    (pipe / "notes.txt").unlink()
    (pipe / "vae" / "readme.txt").write_text("token: hf_abcdefghijklmnopqrstuvwxyz\n")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(DiTOptimumError, match=r"'vae/readme\.txt' contains this machine's Hugging Face token"):
        copy_regular_files(pipe, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_folder_without_manifest_loses_no_bin_or_foreign_shard(tmp_path):
    target = tmp_path / "p"
    make_pipeline().save_pretrained(target)
    (target / MANIFEST_FILE).unlink()  # e.g. downloaded: uploads leave the manifest out
    user = {"transformer/diffusion_pytorch_model.bin": b"x"}
    for name, data in user.items():
        (target / name).write_bytes(data)
    make_pipeline().save_pretrained(target)
    assert all((target / name).read_bytes() == data for name, data in user.items())
    other = tmp_path / "other"
    (other / "transformer").mkdir(parents=True)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (other / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"shard")
    with pytest.raises(DiTOptimumError, match="not an earlier save"):
        make_pipeline().save_pretrained(other)  # another tool's save is no earlier save of this package
    make_pipeline().save_pretrained(other, overwrite=True)
    assert (other / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors").read_bytes() == b"shard"


def test_lora_saves_never_take_a_users_file_or_a_model_weights_name(tmp_path):
    from peft import LoraConfig

    model = tiny_model()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"the user's")
    with pytest.raises(DiTOptimumError, match="did not write: choose a new folder, or pass another `weight_name`"):
        model.save_lora_adapter(folder)
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == b"the user's"
    model.save_lora_adapter(folder, weight_name="mine.safetensors")
    model.save_lora_adapter(folder, weight_name="mine.safetensors")  # its own file: replaced
    with pytest.raises(DiTOptimumError, match="name of a model's weights file"):
        model.save_lora_adapter(folder, weight_name="diffusion_pytorch_model.safetensors")


def test_evaluate_output_and_space_export_never_replace_their_own_input(tmp_path, capsys):
    pipe = tmp_path / "p"
    make_pipeline().save_pretrained(pipe)
    before = digest(pipe)
    assert cli(["evaluate", str(pipe), "--output", str(pipe / "model_index.json")]) == 2
    assert "file of the pipeline being evaluated" in capsys.readouterr().err
    assert digest(pipe) == before
    assert cli(["export-space", str(tmp_path), str(pipe)]) == 2  # a pipeline folder is no earlier Space export
    assert digest(pipe) == before


def test_a_save_checks_every_destination_before_the_first_rename(tmp_path):
    target = tmp_path / "p"
    make_pipeline().save_pretrained(target)
    import shutil

    shutil.rmtree(target / "vae")
    (target / "vae").write_text("a file where a folder goes")
    before = digest(target)
    with pytest.raises(OutputPathError, match="'vae' as a file where the save needs a folder"):
        make_pipeline(num_layers=3).save_pretrained(target)
    assert digest(target) == before
    (target / "vae").unlink()
    (target / MANIFEST_FILE).unlink()
    (target / MANIFEST_FILE).mkdir()
    with pytest.raises(OutputPathError, match="manifest"):
        make_pipeline(num_layers=3).save_pretrained(target)


def test_configs_are_renamed_after_their_weights_and_the_manifest_first(tmp_path, monkeypatch):
    import dit_optimum.files as files

    order = []
    real = os.replace

    def recording(source, destination, **kwargs):
        order.append(str(destination))
        return real(source, destination, **kwargs)

    monkeypatch.setattr(files.os, "replace", recording)
    make_pipeline().save_pretrained(tmp_path / "p")
    manifest = str(tmp_path / "p" / MANIFEST_FILE)
    names = order[order.index(manifest) :]  # the pipeline's commit (the components' own saves went into staging)
    assert names[-2:] == ["model_index.json", manifest]
    weights = [i for i, name in enumerate(names) if name == "diffusion_pytorch_model.safetensors"]
    configs = [i for i, name in enumerate(names) if name.endswith("config.json")]
    assert len(weights) == 2 and max(weights) < min(configs)


def test_checkpoints_a_user_named_like_one_and_a_full_disk(tmp_path, capsys):
    from dit_optimum.training.cli import main as train_main

    run = tmp_path / "run"
    argv = ["--model", "DiT-XS/4", "--model-config", '{"num_layers": 1}', "--image-size", "8", "--channels", "1"]
    argv += ["--max-samples", "16", "--batch-size", "8", "--checkpoint-every", "1", "--keep-checkpoints", "1"]
    argv += ["--output-dir", str(run)]
    assert train_main("base", [*argv, "--steps", "1"]) == 0
    (run / "checkpoints" / "step_0").mkdir()
    (run / "checkpoints" / "step_0" / "notes.txt").write_text("mine")
    assert train_main("base", [*argv, "--steps", "3", "--resume"]) == 0
    assert (run / "checkpoints" / "step_0" / "notes.txt").read_text() == "mine"  # rotation removes only its own
    (run / "checkpoints" / "step_9").write_text("a file")
    capsys.readouterr()
    assert train_main("base", [*argv, "--steps", "4", "--resume"]) == 2
    assert "step_9, named like checkpoint folders but not folders" in capsys.readouterr().err
    with small_filesystem(tmp_path / "disk", size_kib=600):
        assert train_main("base", [*argv[:-1], str(tmp_path / "disk" / "run"), "--steps", "2"]) == 2
        error = capsys.readouterr().err
        assert [line for line in error.splitlines() if line.startswith("error:")] == [error.splitlines()[-1]]
        assert "No space left on device" in error and "Traceback" not in error
        assert not list((tmp_path / "disk" / "run" / "checkpoints").glob(".step_*"))


def test_a_newline_in_a_path_stays_on_the_one_error_line(tmp_path, capsys):
    assert cli(["convert", "original", str(tmp_path / "miss\ning.pt"), str(tmp_path / "out"), "--num-heads", "4"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "miss\\ning.pt" in error


def test_prune_and_quantize_commands_work_for_a_model_of_fewer_than_four_classes(tmp_path):
    model = tiny_model(num_embeds_ada_norm=2)
    DiTOptimumPipeline(transformer=model, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "two")
    assert cli(["prune", str(tmp_path / "two"), str(tmp_path / "pruned"), "--heads", "0.5"]) == 0
    argv = ["quantize", str(tmp_path / "two"), str(tmp_path / "bf16"), "--backend", "torch", "--weights", "bf16"]
    assert cli(argv) == 0
    assert DiTOptimumPipeline.from_pretrained(tmp_path / "pruned").transformer.config.num_embeds_ada_norm == 2
