"""Fine-tuning a pretrained pipeline: LoRA, biases-only and full, onto new classes (resized class table, null class
last) or the same ones; the adapter saved alone and merged into the pipeline; exact resume; options checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_optimum import DiTOptimumPipeline
from dit_optimum.errors import DiTOptimumError
from dit_optimum.training import train
from dit_optimum.training.cli import main as train_cli
from dit_optimum.training.finetune import CLASS_TABLE
from test_training import tiny_run

TABLE = f"{CLASS_TABLE}.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny pipeline trained 3 steps on the 10 digit classes (the model every fine-tune here starts from)."""
    return train(tiny_run(tmp_path_factory.mktemp("base") / "run", steps=3))


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> Path:
    """Three new classes (a, b, c) of 8x8 images: a data set the base never saw."""
    folder = tmp_path_factory.mktemp("letters")
    rng = np.random.default_rng(0)
    for index, name in enumerate("abc"):
        (folder / name).mkdir()
        for sample in range(4):
            pixels = np.clip(rng.normal(60 * (index + 1), 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{sample}.png")
    return folder


def weights(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    return DiTOptimumPipeline.from_pretrained(pipeline_dir).transformer.state_dict()


def finetune(output: Path, base: Path, data: str = "digits", **options):
    return train(tiny_run(output, steps=3, pretrained=str(base), data=data, model_overrides={}, **options))


def test_lora_onto_new_classes_resizes_the_table_and_merges_the_adapter(base, letters, tmp_path):
    result = finetune(tmp_path / "run", base, str(letters), finetune="lora", lora_rank=2, lora_targets=["attention"])
    before, after = weights(base), weights(result)
    pipe = DiTOptimumPipeline.from_pretrained(result)
    assert pipe.transformer.num_classes == 3 and pipe.labels == {"a": 0, "b": 1, "c": 2}
    assert after[TABLE].shape == (4, before[TABLE].shape[1])  # 3 classes + the null class, last
    assert not torch.equal(after[TABLE][:3], before[TABLE][:3])  # the resized table trained in full
    for name in before:  # untargeted weights (MLP, adaLN, output) are the base's; targeted ones moved
        if name == TABLE:
            continue
        changed = not torch.equal(after[name], before[name])
        assert changed == any(part in name for part in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.w"))
    assert (result.parent / "lora" / "pytorch_lora_weights.safetensors").is_file()
    images = pipe(["a", "c"], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_a_same_class_adapter_reloads_onto_the_base_and_equals_the_merged_pipeline(base, tmp_path):
    result = finetune(tmp_path / "run", base, finetune="lora", lora_rank=4, lora_alpha=8.0, learning_rate=5e-2)
    merged = DiTOptimumPipeline.from_pretrained(result)
    adapted = DiTOptimumPipeline.from_pretrained(base)
    adapted.load_lora_weights(result.parent / "lora")
    kwargs = {"num_inference_steps": 3, "output_type": "np"}
    expected = merged([1, 7], generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(adapted([1, 7], generator=torch.manual_seed(0), **kwargs).images, expected, atol=2e-4)
    plain = DiTOptimumPipeline.from_pretrained(base)([1, 7], generator=torch.manual_seed(0), **kwargs).images
    assert np.abs(plain - expected).max() > 1e-3  # the adapter did something


def test_bias_norm_trains_biases_only(base, tmp_path):
    result = finetune(tmp_path / "run", base, finetune="bias_norm", learning_rate=5e-2)
    before, after = weights(base), weights(result)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(".bias") for name in changed)
    assert not (result.parent / "lora").exists()


def test_a_killed_lora_run_resumes_to_the_same_weights(base, tmp_path):
    options = {"finetune": "lora", "lora_rank": 2, "checkpoint_every": 2}
    train(tiny_run(tmp_path / "straight", steps=4, pretrained=str(base), model_overrides={}, **options))
    train(tiny_run(tmp_path / "resumed", steps=2, pretrained=str(base), model_overrides={}, **options))
    train(tiny_run(tmp_path / "resumed", steps=4, pretrained=str(base), model_overrides={}, resume=True, **options))
    first, second = weights(tmp_path / "straight" / "pipeline"), weights(tmp_path / "resumed" / "pipeline")
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"finetune": "lora"}, r"`finetune`='lora' needs a `pretrained`"),
        ({"finetune": "dora", "pretrained": "x"}, r"Unknown `finetune`='dora'; allowed values: full, lora"),
        ({"pretrained": "x", "model_overrides": {"num_layers": 2}}, r"cannot change a `pretrained` model"),
        ({"pretrained": "x", "lora_rank": 0}, r"`lora_rank`=0"),
        ({"pretrained": "x", "lora_alpha": -1.0}, r"lora_alpha"),
        ({"pretrained": "x", "lora_targets": ["qkv"]}, r"`lora_targets`=\['qkv'\].*attention, mlp, adaln"),
        ({"pretrained": "x", "lora_targets": []}, r"`lora_targets`"),
        ({"pretrained": ""}, r"`pretrained`"),
    ],
)
def test_bad_finetune_options_are_refused_before_work(tmp_path, options, message):
    overrides = {"model_overrides": {}, **options}
    with pytest.raises(DiTOptimumError, match=message):
        train(tiny_run(tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_a_base_of_another_input_size_or_a_quantized_base_is_named(base, tmp_path):
    from dit_optimum import quantize

    with pytest.raises(DiTOptimumError, match=r"`pretrained`=.*sample_size=8 but the data gives 16"):
        finetune(tmp_path / "run", base, finetune="lora", image_size=16)
    quantize(DiTOptimumPipeline.from_pretrained(base), backend="torchao", weights="int8").save_pretrained(
        tmp_path / "int8"
    )
    with pytest.raises(DiTOptimumError, match=r"`pretrained`=.*int8' is quantized: the trainer fine-tunes float"):
        finetune(tmp_path / "run", tmp_path / "int8", finetune="lora")


def test_the_lora_script_options(base, tmp_path, capsys):
    argv = ["--pretrained", str(base), "--output-dir", str(tmp_path / "run"), "--image-size", "8", "--steps", "2"]
    argv += ["--batch-size", "8", "--lora-rank", "2", "--lora-targets", "attention,mlp", "--log-every", "1"]
    assert train_cli("lora", argv) == 0
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert train_cli("lora", [*argv[:4], "--lora-targets", "qkv"]) == 2
    assert "lora_targets" in capsys.readouterr().err


def test_two_processes_fine_tune_with_lora_like_one(base, tmp_path):
    import os
    import subprocess
    import sys

    from test_training import ROOT, losses

    common = ["--pretrained", str(base), "--image-size", "8", "--batch-size", "8", "--steps", "6", "--lora-rank", "2"]
    common += ["--max-samples", "16", "--lr", "1e-2", "--log-every", "1"]
    assert train_cli("lora", ["--output-dir", str(tmp_path / "one"), *common]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, str(ROOT / "scripts" / "train_lora.py"), "--output-dir", str(tmp_path / "two"), *common],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6 and max(abs(a - b) / a for a, b in zip(one, two)) < 1e-3
    assert (tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_new_class_set_keeps_the_rows_of_classes_with_the_same_name(base, tmp_path):
    from dit_optimum.data import digits_data
    from dit_optimum.training.finetune import resize_class_table

    model = DiTOptimumPipeline.from_pretrained(base).transformer
    old = model.state_dict()[TABLE]
    names = {0: "7", 1: "new", 2: "3"}
    resized = resize_class_table(model, 3, names, {i: str(i) for i in range(10)}).state_dict()[TABLE]
    assert torch.equal(resized[0], old[7]) and torch.equal(resized[2], old[3])
    assert torch.allclose(resized[1], old[:10].mean(0)) and torch.equal(resized[3], old[10])  # new; null last
    assert digits_data(8, 1).id2label[3] == "3"  # the digits' names are their digits
