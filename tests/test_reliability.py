"""Bad configs, damaged folders and hostile files give the package's own error naming the parameter or file."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from conftest import tiny_config, tiny_model
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel, quantize
from dit_optimum.cli import main as cli
from dit_optimum.conversion import convert_original_checkpoint, load_original_checkpoint
from original_dit import random_original_dit

BAD_CONFIGS = [
    ({"num_layers": 0}, "num_layers"),
    ({"num_layers": -2}, "num_layers"),
    ({"num_layers": 2.0}, "num_layers"),
    ({"sample_size": 0}, "sample_size"),
    ({"sample_size": -8}, "sample_size"),
    ({"sample_size": "8"}, "sample_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"attention_head_dim": 0}, "attention_head_dim"),
    ({"in_channels": 0}, "in_channels"),
    ({"out_channels": 0}, "out_channels"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ({"mlp_ratio": 0.001}, "mlp_ratio"),
    ({"attention_type": "mediated", "num_mediators": 0}, "num_mediators"),
    ({"attention_type": "focused", "focusing_factor": math.inf}, "focusing_factor"),
    ({"attention_type": "gqa", "num_kv_heads": 2.0}, "num_kv_heads"),
    ({"activation_fn": "relu6"}, r"activation_fn.*gelu-approximate"),
    ({"dropout": 1.0}, "dropout"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"class_dropout_prob": 1}, "class_dropout_prob"),
    ({"attention_bias": "yes"}, "attention_bias"),
    ({"num_embeds_ada_norm": True}, "num_embeds_ada_norm"),
    ({"moe_num_experts": 4, "moe_capacity_factor": math.inf}, "moe_capacity_factor"),
    ({"moe_num_experts": 4, "moe_layers": 1}, "moe_layers"),
    ({"layer_heads": [4, "4"]}, "layer_heads"),
    ({"num_layers": 10**7, "num_attention_heads": 64, "attention_head_dim": 64}, "GiB"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[str(c[0])[:60] for c in BAD_CONFIGS])
def test_configs_that_cannot_work_are_refused_naming_the_key(overrides, message):
    with pytest.raises(DiTOptimumError, match=message):
        DiTOptimumTransformer2DModel(**tiny_config(**overrides))


def test_a_config_whose_layer_count_disagrees_with_the_weights_is_refused_at_load(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    for layers, kind in ((3, "missing keys"), (1, "unexpected keys")):
        config_path.write_text(json.dumps({**config, "num_layers": layers}))
        with pytest.raises(DiTOptimumError, match=rf"do not match its config\.json \({kind}: transformer_blocks"):
            DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "model")
    config_path.write_text(json.dumps({**config, "num_layers": 0}))
    with pytest.raises(DiTOptimumError, match="num_layers"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "model")


def damage(folder, how):
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    actions = {
        "no index": lambda: (folder / "model_index.json").unlink(),
        "index not json": lambda: (folder / "model_index.json").write_text("{oops"),
        "index a list": lambda: (folder / "model_index.json").write_text("[1, 2]"),
        "no config": lambda: (folder / "transformer" / "config.json").unlink(),
        "config not json": lambda: (folder / "transformer" / "config.json").write_text("{"),
        "no weights": lambda: weights.unlink(),
        "truncated weights": lambda: weights.write_bytes(weights.read_bytes()[:100]),
        "empty weights": lambda: weights.write_bytes(b""),
        "vae config not json": lambda: (folder / "vae" / "config.json").write_text("x"),
        "scheduler missing": lambda: shutil.rmtree(folder / "scheduler"),
    }
    actions[how]()


DAMAGES = [
    ("no index", "no model_index.json"),
    ("index not json", r"model_index\.json.*not valid JSON"),
    ("index a list", "does not describe a DiT pipeline"),
    ("no config", r"transformer.*config\.json"),
    ("config not json", r"config\.json.*not a valid JSON"),
    ("no weights", r"diffusion_pytorch_model\.safetensors"),
    ("truncated weights", r"Unable to load weights.*diffusion_pytorch_model\.safetensors"),
    ("empty weights", "Unable to load weights"),
    ("vae config not json", r"vae/config\.json"),
    ("scheduler missing", "scheduler_config.json"),
]


@pytest.mark.parametrize(("how", "message"), DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_pipeline_folder_names_the_file(tmp_path, how, message):
    folder = tmp_path / "pipe"
    DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler()).save_pretrained(folder)
    damage(folder, how)
    with pytest.raises(DiTOptimumError, match=message):
        DiTOptimumPipeline.from_pretrained(folder)
    assert cli(["prune", str(folder), str(tmp_path / "out"), "--heads", "0.5"]) == 2
    assert not (tmp_path / "out").exists()


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, capsys):
    with pytest.raises(DiTOptimumError, match="does not exist"):
        DiTOptimumPipeline.from_pretrained(tmp_path / "missing")
    assert cli(["convert", "diffusers", "/missing/pipe", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "`source`='/missing/pipe' does not exist" in error and "internet" not in error
    original = tmp_path / "ck.pt"
    torch.save(random_original_dit(input_size=8).state_dict(), original)
    code = cli(["convert", "original", str(original), str(tmp_path / "out"), "--vae", "./no/vae", "--sample-size", "8"])
    assert code == 2 and "`vae`='./no/vae' does not exist" in capsys.readouterr().err


class Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_checkpoints_with_code_or_damage_are_refused_without_advising_weights_only_false(tmp_path, capsys):
    planted = tmp_path / "planted.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, planted)
    with pytest.raises(DiTOptimumError, match="could run code") as error:
        load_original_checkpoint(planted)
    assert "weights_only=False" not in str(error.value)
    assert "payload ran" not in capsys.readouterr().out
    truncated = tmp_path / "truncated.pt"
    torch.save(random_original_dit().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(DiTOptimumError, match="not a readable PyTorch checkpoint"):
            load_original_checkpoint(path)
    not_dit = tmp_path / "other.pt"
    torch.save(
        {"x_embedder.proj.weight": torch.zeros(3), "y_embedder.embedding_table.weight": torch.zeros(2, 2)}, not_dit
    )
    with pytest.raises(DiTOptimumError, match="Not an original DiT state dict"):
        convert_original_checkpoint(not_dit, tmp_path / "out")


def test_converting_into_the_current_folder_deletes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save(random_original_dit(input_size=8, in_channels=1).state_dict(), tmp_path / "ck.pt")
    assert cli(["convert", "original", "ck.pt", ".", "--num-heads", "4"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    assert cli(["convert", "original", "ck.pt", ".", "--num-heads", "4", "--overwrite"]) == 0
    assert (tmp_path / "ck.pt").is_file() and (tmp_path / "model_index.json").is_file()
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.transformer.config.in_channels == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [("{bad", "not valid JSON"), ("[1, 2]", "JSON object mapping class index"), ('{"0": {"a": 1}}', "JSON object")],
)
def test_a_malformed_id2label_file_is_refused(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(content)
    torch.save(random_original_dit(input_size=8, in_channels=1).state_dict(), tmp_path / "ck.pt")
    with pytest.raises(DiTOptimumError, match=message):
        convert_original_checkpoint(tmp_path / "ck.pt", tmp_path / "out", num_heads=4, id2label=str(path))
    assert not (tmp_path / "out").exists()


def test_quantize_takes_dtype_names_and_refuses_keep_float_that_matches_nothing():
    model = tiny_model()
    quantized = quantize(model, backend="torchao", weights="int8", dtype="float32")
    assert quantized.pos_embed.proj.weight.dtype == torch.float32
    with pytest.raises(DiTOptimumError, match=r"`dtype`='float64'.*float32, bfloat16, float16"):
        quantize(model, backend="torchao", weights="int8", dtype="float64")
    with pytest.raises(DiTOptimumError, match=r"`keep_float` entries \['proj_out'\] match no module"):
        quantize(model, backend="torchao", weights="int8", keep_float=["proj_out"])


def test_numpy_integer_class_labels_are_classes_and_duplicate_names_are_refused():
    pipe = DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(np.array([1, 2]), num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 2
    assert pipe([np.int64(3)], num_inference_steps=2, output_type="np").images.shape[0] == 1
    with pytest.raises(DiTOptimumError, match="duplicate"):
        DiTOptimumPipeline(transformer=tiny_model(), id2label={0: "cat", 1: "cat"})


def test_the_reliability_probe_finds_every_case_handled(tmp_path):
    """benchmarks/reliability_probe.py: 300+ bad inputs and faults, each refused cleanly or handled correctly."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability_probe.py"
    output = tmp_path / "probe.json"
    result = subprocess.run(
        [sys.executable, str(script), "--output", str(output)], capture_output=True, text=True, timeout=900
    )
    assert output.is_file(), f"the probe wrote no report (exit {result.returncode}):\n{result.stderr[-4000:]}"
    report = json.loads(output.read_text())
    failures = [row for row in report["rows"] if row["outcome"] != "clean"]
    assert report["cases"] >= 650 and not failures, failures
    assert result.returncode == 0


def test_scalar_and_odd_class_labels_are_named(tmp_path, capsys):
    pipe = DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler())
    for labels in (2.5, None, [1, None], {"a": 1}):
        with pytest.raises(DiTOptimumError, match="`class_labels`"):
            pipe(labels, num_inference_steps=1)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(DiTOptimumError, match="not a readable PyTorch checkpoint"):
        load_original_checkpoint(text)
