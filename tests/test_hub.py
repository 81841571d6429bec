"""Releases, model cards, push and loading by repo id: a tiny benchmark run released per cell, its cards parsed back
to the measured numbers, uploads recorded by an HfApi double, and the cards' code run against a real local Hub."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from conftest import RELEASED_TECHNIQUES as TECHNIQUES
from dit_optimum.cli import main as cli
from dit_optimum.errors import DiTOptimumError
from dit_optimum.evaluation.declarations import get_metric
from dit_optimum.hub import card_numbers, push, release, repo_name
from dit_optimum.hub.cards import RESULTS_FILE
from local_hub import local_hub

TOKEN = "hf_TestSecretToken0123456789abcdef"


def rows_by_technique(results_dir: Path) -> dict[str, dict]:
    return {row["technique"]: row for row in json.loads((results_dir / "results.json").read_text())["rows"]}


def test_release_writes_one_hub_ready_folder_per_cell(results_dir, released):
    names = sorted(path.name for path in released.iterdir())
    assert names == sorted(repo_name("DiT-XS/4", technique) for technique in TECHNIQUES)
    int8 = released / "dit-xs4-int8"
    assert {"README.md", RESULTS_FILE, "samples.png", "model_index.json", "transformer", "vae", "scheduler"} <= {
        path.name for path in int8.iterdir()
    }
    own = json.loads((int8 / RESULTS_FILE).read_text())
    assert [row["technique"] for row in own["rows"]] == ["baseline", "int8"]
    assert own["release"] == {
        "variant": "DiT-XS/4",
        "technique": "int8",
        "repo_id": "org/dit-xs4-int8",
        "base_model": "org/dit-xs4-baseline",
    }
    assert Image.open(int8 / "samples.png").size == Image.open(results_dir / own["rows"][1]["sample_grid"]).size
    # float32 releases carry fp16 / bf16 weight variants as diffusers repositories do; quantized ones none
    weights = sorted(path.name for path in (released / "dit-xs4-baseline" / "transformer").glob("*.safetensors"))
    assert weights == [f"diffusion_pytorch_model{v}.safetensors" for v in (".bf16", ".fp16", "")]
    assert [path.name for path in (int8 / "transformer").glob("*.safetensors")] == [
        "diffusion_pytorch_model.safetensors"
    ]


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_a_card_parses_back_to_the_measured_numbers(results_dir, released, technique):
    row = rows_by_technique(results_dir)[technique]
    card = ModelCard.load(released / repo_name("DiT-XS/4", technique) / "README.md")
    data = card.data
    assert data.library_name == "diffusers" and data.pipeline_tag == "unconditional-image-generation"
    assert {"dit", "class-conditional", technique, row["dtype"]} <= set(data.tags)
    assert data.license == "apache-2.0"
    assert data.base_model == (None if technique == "baseline" else "org/dit-xs4-baseline")
    numbers = card_numbers(card)
    for key in ("class_accuracy", "kid", "gflops", "size_bytes", "sampling_images_per_s", "latency_s"):
        metric = get_metric(key)
        assert numbers[key] == pytest.approx(row[key] * metric.scale, rel=1e-7), key
    # the model-index as huggingface_hub parses it: N, interval, floor for quality; hardware, dtype, batch for speed
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == repo_name("DiT-XS/4", technique)
    by_key = {result.metric_type: result for result in results}
    accuracy = by_key["class_accuracy"]
    assert accuracy.metric_args["num_samples"] == row["num_samples"] == 11
    low, high = (100 * bound for bound in row["class_accuracy_interval"])
    assert accuracy.metric_args["interval_95"] == pytest.approx([low, high], rel=1e-7)
    assert accuracy.metric_args["real_vs_real_floor"] == pytest.approx(100 * row["class_accuracy_real"], rel=1e-7)
    assert accuracy.dataset_type == "digits"
    speed = by_key["sampling_images_per_s"].metric_args
    assert speed["dtype"] == row["dtype"] and speed["batch_size"] == 2 and "cores" in speed["hardware"]
    # the body: loading line, a table against the baseline, samples, the reproducing command, the limits
    text = card.text
    assert f'from_pretrained("org/{repo_name("DiT-XS/4", technique)}"' in text
    assert "| DiT-XS/4 | baseline |" in text and "![samples](samples.png)" in text
    assert "dit-optimum benchmark --techniques baseline" in text and "## Limits" in text and "N=11" in text


def test_release_refuses_what_it_cannot_ship(results_dir, tmp_path):
    with pytest.raises(DiTOptimumError, match=r"`org`='bad org!'"):
        release(results_dir, "bad org!", tmp_path / "a")
    with pytest.raises(DiTOptimumError, match=r"no results.json"):
        release(tmp_path, "org", tmp_path / "b")
    with pytest.raises(DiTOptimumError, match=r"`techniques` \['int4'\] have no finished cell.*finished: "):
        release(results_dir, "org", tmp_path / "c", techniques=["int4"])
    foreign = tmp_path / "d" / "dit-xs4-int8"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DiTOptimumError, match="output_dir"):
        release(results_dir, "org", tmp_path / "d", techniques=["int8"])
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    # a results folder whose trained models are gone: refused, nothing retrained
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((results_dir / "results.json").read_text())
    with pytest.raises(DiTOptimumError, match=r"missing.*run the benchmark"):
        release(copy, "org", tmp_path / "e", techniques=["int8"])


def test_cards_name_hub_datasets_only(tmp_path):
    from dit_optimum.hub.cards import hub_datasets

    assert hub_datasets("digits") is None and hub_datasets(str(tmp_path)) is None
    assert hub_datasets("uoft-cs/cifar10") == ["uoft-cs/cifar10"]


def test_the_docs_show_the_loading_lines_a_card_prints():
    from dit_optimum.hub.cards import loading_code

    page = (Path(__file__).resolve().parents[1] / "docs" / "hub.md").read_text()  # "Loading a release"
    settings = {"num_inference_steps": 10, "guidance_scale": 2.0}
    code = loading_code("my-org/dit-xs4-int8", {"dtype": "bfloat16", "quality_settings": settings})
    assert f"```python\n{code}\n```" in page


class RecordingApi:
    """An HfApi double: records the calls and keeps a copy of each uploaded folder."""

    def __init__(self, copies: Path):
        self.calls, self.copies = [], copies

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        import shutil

        copy = self.copies / repo_id.replace("/", "__")
        patterns = [pattern.split("/")[-1] for pattern in kwargs.get("ignore_patterns") or []]
        shutil.copytree(folder_path, copy, ignore=shutil.ignore_patterns(*patterns))
        self.calls.append(("upload_folder", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/0"


def tree(folder: Path) -> dict[str, bytes]:
    """What an upload of ``folder`` sends: its files less the package's bookkeeping (``.dit_optimum*``)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".dit_optimum"))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_push_uploads_exactly_the_dry_run_folder_and_never_shows_the_token(released, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = released / "dit-xs4-int8"
    assert push(source, "someone/int8-test", dry_run=tmp_path / "dry") == str(tmp_path / "dry")
    api = RecordingApi(tmp_path / "uploaded")
    url = push(source, "someone/int8-test", private=True, api=api)
    assert url == "https://huggingface.co/someone/int8-test/commit/0"
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    message = api.calls[1][2]["commit_message"]
    assert message.startswith("dit-optimum 0.1.0: someone/int8-test") and RESULTS_FILE in message
    assert tree(tmp_path / "uploaded" / "someone__int8-test") == tree(tmp_path / "dry")
    # the card was rendered for the new repository, derived from that namespace's baseline
    card = ModelCard.load(tmp_path / "dry" / "README.md")
    assert 'from_pretrained("someone/int8-test"' in card.text and card.data.base_model == "someone/dit-xs4-baseline"
    assert cli(["push", str(source), "someone/x", "--dry-run", str(tmp_path / "dry2")]) == 0
    written = "".join(path.read_text(errors="ignore") for path in (tmp_path / "dry2").rglob("*") if path.is_file())
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + written


def test_push_refuses_a_folder_holding_a_link_and_uploads_nothing_offline(released, tmp_path, monkeypatch):
    import shutil

    source = tmp_path / "release"
    shutil.copytree(released / "dit-xs4-int8", source)
    token_file = tmp_path / "hf" / "token"
    token_file.parent.mkdir()
    token_file.write_text(TOKEN)
    (source / "transformer" / "notes.txt").symlink_to(token_file)
    with pytest.raises(DiTOptimumError, match=r"or special files \(transformer/notes\.txt\)"):
        push(source, "someone/x", dry_run=tmp_path / "dry")
    assert not (tmp_path / "dry").exists()
    (source / "transformer" / "notes.txt").unlink()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(DiTOptimumError, match=r"Offline mode is on.*nothing was uploaded"):
        push(source, "someone/x")


def test_push_without_a_token_is_refused_before_anything(released, tmp_path, monkeypatch, capsys):
    push_module = importlib.import_module("dit_optimum.hub.upload")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(push_module, "get_token", lambda: None)
    api = RecordingApi(tmp_path)
    with pytest.raises(DiTOptimumError, match="No Hugging Face token: set HF_TOKEN"):
        push(released / "dit-xs4-int8", "someone/x", api=api)
    assert api.calls == []
    monkeypatch.setattr(push_module, "HfApi", lambda **kwargs: pytest.fail("HfApi built without a token"))
    assert cli(["release", "unused-folder", "org"]) == 2
    assert "No Hugging Face token" in capsys.readouterr().err


def test_push_of_a_plain_pipeline_needs_its_results(results_dir, released, tmp_path, monkeypatch):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(released / "dit-xs4-prune-heads-50", plain, ignore=shutil.ignore_patterns("README.md", "*.json"))
    shutil.copy(released / "dit-xs4-prune-heads-50" / "model_index.json", plain)
    with pytest.raises(DiTOptimumError, match=r"carries no dit_optimum_results.json: pass `results`"):
        push(plain, "org/p", dry_run=tmp_path / "a")
    with pytest.raises(DiTOptimumError, match=r"pass `technique`"):
        push(plain, "org/p", results_dir / "results.json", dry_run=tmp_path / "b")
    with pytest.raises(DiTOptimumError, match=r"'int4' names 0 finished cells.*allowed: .*DiT-XS/4 / baseline"):
        push(plain, "org/p", results_dir / "results.json", technique="int4", dry_run=tmp_path / "c")
    push(plain, "org/p", results_dir / "results.json", technique="prune-heads-50", dry_run=tmp_path / "d")
    assert card_numbers(ModelCard.load(tmp_path / "d" / "README.md"))["gflops"] == pytest.approx(
        rows_by_technique(results_dir)["prune-heads-50"]["gflops"], rel=1e-7
    )
    assert (tmp_path / "d" / "samples.png").is_file()
    for bad in ("no-namespace", "a/b/c", "bad org/x", "org/" + "x" * 200):
        with pytest.raises(DiTOptimumError, match="repo_id"):
            push(plain, bad, dry_run=tmp_path / "e")


def test_release_command_writes_the_folders_with_dry_run(results_dir, tmp_path, capsys):
    assert cli(["release", str(results_dir), "org", "--dry-run", str(tmp_path / "out"), "--techniques", "int8"]) == 0
    assert "org/dit-xs4-int8" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["dit-xs4-int8"]
    assert cli(["release", str(results_dir), "org", "--dry-run", str(tmp_path / "out"), "--techniques", "int8"]) == 0


def card_code(readme: Path) -> str:
    return re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)


def test_released_repos_load_by_repo_id_from_a_local_hub_with_the_cards_code(released, tmp_path):
    """olah serves the release folders on 127.0.0.1; each card's code block runs as printed in a fresh process."""
    kinds = ["int8", "prune-heads-50", "moe", "distill", "attention-mediated", "cache-first-block-0.5"]
    repos = {f"org/{repo_name('DiT-XS/4', kind)}": released / repo_name("DiT-XS/4", kind) for kind in kinds}
    with local_hub(tmp_path / "hub", repos) as url:
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}
        for repo_id, folder in repos.items():
            workdir = tmp_path / "run" / repo_id.replace("/", "__")
            workdir.mkdir(parents=True)
            result = subprocess.run(
                [sys.executable, "-c", card_code(folder / "README.md")],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"{repo_id}: {result.stderr[-3000:]}"
            assert Image.open(workdir / "sample.png").size == (8, 8)
            downloaded = list((tmp_path / "hf_home").rglob(f"models--org--{repo_id.split('/')[1]}"))
            assert downloaded, f"{repo_id} was not downloaded through the local Hub"
