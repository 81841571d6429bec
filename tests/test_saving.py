"""Saving never loses a user's files: pipelines and models write their own files into a folder, atomically per file,
and refuse a file or a foreign non-empty folder as target unless told to overwrite."""

from __future__ import annotations

import os
import stat

import pytest
from diffusers import DDIMScheduler

from conftest import tiny_model
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel


def make_pipeline(**overrides) -> DiTOptimumPipeline:
    return DiTOptimumPipeline(transformer=tiny_model(**overrides), vae=None, scheduler=DDIMScheduler())


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_saving_over_an_earlier_save_replaces_its_files_and_keeps_the_users(tmp_path):
    target = tmp_path / "pipe"
    make_pipeline(attention_type="mqa").save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    # weight files the package did not write are the user's: another variant, an EMA copy, a .bin of their own
    users = ["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.ema.safetensors"]
    users.append("diffusion_pytorch_model.bin")
    for name in users:
        (target / "transformer" / name).write_bytes(b"users weights")
    make_pipeline(attention_type="shallow").save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert all((target / "transformer" / name).read_bytes() == b"users weights" for name in users)
    assert DiTOptimumPipeline.from_pretrained(target).transformer.config.attention_type == "shallow"
    assert not [name for name in listing(tmp_path) if ".dit_optimum-staging" in name]
    with pytest.raises(DiTOptimumError, match="safe_serialization"):
        make_pipeline().save_pretrained(tmp_path / "x", safe_serialization=False)
    assert not (tmp_path / "x").exists()


def test_a_foreign_folder_or_a_file_is_refused_unless_overwrite_and_nothing_is_deleted(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"precious")
    (folder / "data").mkdir()
    (folder / "data" / "a.png").write_bytes(b"png")
    before = listing(folder)
    with pytest.raises(DiTOptimumError, match=r"`save_directory`=.*work.*model_index\.json.*overwrite"):
        make_pipeline().save_pretrained(folder)
    assert listing(folder) == before
    with pytest.raises(DiTOptimumError, match=r"config\.json"):
        tiny_model().save_pretrained(folder)
    assert listing(folder) == before

    make_pipeline().save_pretrained(folder, overwrite=True)
    assert (folder / "checkpoint.pt").read_bytes() == b"precious" and (folder / "data" / "a.png").exists()
    assert DiTOptimumPipeline.from_pretrained(folder).transformer.config.num_layers == 2

    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"user file")
    with pytest.raises(DiTOptimumError, match="is a file"):
        tiny_model().save_pretrained(a_file)
    assert a_file.read_bytes() == b"user file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "work"]


def test_an_empty_folder_and_the_current_folder_semantics(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_model().save_pretrained(empty)
    assert DiTOptimumTransformer2DModel.from_pretrained(empty).config.num_layers == 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "source.pt").write_bytes(b"source")
    with pytest.raises(DiTOptimumError, match="already holds files"):
        make_pipeline().save_pretrained(".")
    assert (tmp_path / "source.pt").read_bytes() == b"source"


def test_a_failing_save_leaves_the_target_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "pipe"
    make_pipeline(attention_type="mqa").save_pretrained(target)
    before = {name: (target / name).read_bytes() for name in listing(target) if (target / name).is_file()}

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dit_optimum.models.autoencoder.IdentityAutoencoder.save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        make_pipeline(attention_type="shallow").save_pretrained(target)
    after = {name: (target / name).read_bytes() for name in listing(target) if (target / name).is_file()}
    assert after == before
    with pytest.raises(OSError):
        make_pipeline().save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_saved_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        make_pipeline().save_pretrained(tmp_path / "pipe")
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE((tmp_path / "pipe" / name).stat().st_mode) for name in listing(tmp_path / "pipe")}
    assert modes["model_index.json"] == 0o644
    assert modes["transformer/diffusion_pytorch_model.safetensors"] == 0o644
    assert modes["transformer"] == 0o755


def test_a_dpm_solver_pipeline_saves_and_reloads_with_its_infinite_default(tmp_path):
    """diffusers writes DPM-Solver's `lambda_min_clipped` default as -Infinity: the strict reader must accept
    diffusers' own infinities in configs (never NaN), and the reloaded pipeline samples the same images."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    pipe = DiTOptimumPipeline(transformer=tiny_model(), vae=None, scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    assert "-Infinity" in (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text()
    loaded = DiTOptimumPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    images = [
        p([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
        for p in (pipe, loaded)
    ]
    assert (images[0] == images[1]).all()
    config = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("-Infinity", "NaN"))
    with pytest.raises(DiTOptimumError, match=r"scheduler_config\.json"):
        DiTOptimumPipeline.from_pretrained(tmp_path / "pipe")
