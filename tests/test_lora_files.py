"""LoRA files through the package's one reader (``models.lora.load_checked_lora``): every bad kind of file
(truncated, empty, random bytes, wrong shapes, another model's keys, partly foreign keys, NaN, a FIFO, a folder) is
refused by the model-level and the pipeline-level loader with a ``DiTOptimumError`` naming the file, leaving the
model as it was; files are saved as safetensors only, and a model or pipeline with an adapter attached is not saved
with peft's wrapper keys."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_pixel_pipeline
from dit_optimum import DiTOptimumPipeline
from dit_optimum.errors import DiTOptimumError
from dit_optimum.models.lora import lora_config
from dit_optimum.pipelines.lora import save_lora_weights_of

NAME = "pytorch_lora_weights.safetensors"
KEY = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"


def adapted_pipeline():
    pipe = tiny_pixel_pipeline()
    pipe.transformer.add_adapter(lora_config(pipe.transformer, ["attention", "mlp"], rank=2))
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # an adapter that changes the images
    return pipe


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    save_lora_weights_of(adapted_pipeline().transformer, folder)  # a pipeline-level file: keys under transformer.
    return folder / NAME


def _tensors_and_metadata(good: Path):
    with safe_open(good, "pt") as handle:
        metadata = handle.metadata()
    return load_file(good), metadata


def _write(folder: Path, data: bytes | None = None, tensors=None, metadata=None) -> Path:
    folder.mkdir()
    path = folder / NAME
    if tensors is not None:
        save_file(tensors, path, metadata=metadata)
    else:
        path.write_bytes(data)
    return path


def bad_file(kind: str, good: Path, folder: Path) -> tuple[Path, str]:
    """A bad LoRA file of ``kind`` in ``folder`` (under the default name) and the message it must give."""
    raw = good.read_bytes()
    tensors, metadata = _tensors_and_metadata(good)
    unreadable = "not a readable safetensors LoRA file"
    if kind == "truncated":
        return _write(folder, raw[: len(raw) // 2]), unreadable
    if kind == "empty":
        return _write(folder, b""), unreadable
    if kind == "random":
        return _write(folder, random.Random(0).randbytes(4096)), unreadable
    if kind == "wrong_shape":
        tensors[KEY] = torch.zeros(2, 31)
        return _write(folder, tensors=tensors, metadata=metadata), re.escape(f"{KEY!r} has shape (2, 31)") + ".*32"
    if kind == "unet_keys":
        renamed = {key.replace("transformer.", "unet.", 1): value for key, value in tensors.items()}
        path = _write(folder, tensors=renamed, metadata=metadata)
        return path, r"no LoRA weights for this model: its keys start with 'unet\.'.*" + re.escape(KEY)
    if kind == "other_modules":  # the right prefix, but modules this DiT does not have
        renamed = {key.replace("transformer_blocks", "down_blocks"): value for key, value in tensors.items()}
        return _write(folder, tensors=renamed, metadata=metadata), "no LoRA weights for this model.*" + re.escape(KEY)
    if kind == "partly_foreign":
        tensors["transformer.transformer_blocks.0.attn9.to_q.lora_A.weight"] = torch.zeros(2, 32)
        tensors["unet.up_blocks.0.lora_A.weight"] = torch.zeros(2, 32)
        path = _write(folder, tensors=tensors, metadata=metadata)
        return path, r"2 of \d+ keys name no layer of this model(?=.*attn9)(?=.*'unet\.up_blocks)"
    if kind == "nan":
        key = "transformer.transformer_blocks.1.attn1.to_k.lora_B.weight"
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        return _write(folder, tensors=tensors, metadata=metadata), "non-finite.*" + re.escape(repr(key))
    if kind == "inf":
        key = "transformer.transformer_blocks.1.ff.net.2.lora_A.weight"
        tensors[key][0, 0] = float("inf")
        return _write(folder, tensors=tensors, metadata=metadata), "non-finite.*" + re.escape(repr(key))
    if kind == "nan_alpha":
        config = json.loads(metadata["lora_adapter_metadata"])
        config["transformer.lora_alpha"] = float("nan")
        metadata = {**metadata, "lora_adapter_metadata": json.dumps(config)}
        return _write(folder, tensors=tensors, metadata=metadata), "non-finite adapter metadata value"
    if kind == "fifo":
        folder.mkdir()
        os.mkfifo(folder / NAME)
        return folder / NAME, "is a FIFO, not a regular file"
    if kind == "folder":
        folder.mkdir()
        (folder / NAME).mkdir()
        return folder / NAME, "is a folder, not a regular file"
    raise AssertionError(kind)


KINDS = [
    "truncated",
    "empty",
    "random",
    "wrong_shape",
    "unet_keys",
    "other_modules",
    "partly_foreign",
    "nan",
    "inf",
    "nan_alpha",
    "fifo",
    "folder",
]


def assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert not getattr(model, "peft_config", {})
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loader", ["model", "pipeline"])
def test_a_bad_lora_file_is_refused_naming_it_and_the_model_is_unchanged(kind, loader, good, tmp_path):
    path, message = bad_file(kind, good, tmp_path / kind)
    pipe = tiny_pixel_pipeline()
    before = {key: value.clone() for key, value in pipe.transformer.state_dict().items()}
    with pytest.raises(DiTOptimumError, match=re.escape(str(path))) as error:
        if loader == "model":
            pipe.transformer.load_lora_adapter(path.parent, weight_name=NAME)
        else:
            pipe.load_lora_weights(path.parent)
    assert re.search(message, str(error.value)), str(error.value)
    assert_untouched(pipe.transformer, before)
    if kind in ("truncated", "empty", "random", "fifo", "folder"):  # unreadable: the class-level reader refuses too
        with pytest.raises(DiTOptimumError, match=re.escape(str(path))):
            DiTOptimumPipeline.lora_state_dict(path.parent)


def test_the_good_file_loads_through_both_loaders_and_a_path_to_the_file(good):
    expected = adapted_pipeline().transformer.state_dict()  # same seed: the adapter the fixture saved
    for load in (
        lambda pipe: pipe.transformer.load_lora_adapter(good.parent, weight_name=NAME, adapter_name="default"),
        lambda pipe: pipe.transformer.load_lora_adapter(good, adapter_name="default"),
        lambda pipe: pipe.load_lora_weights(good.parent, adapter_name="default"),
        lambda pipe: pipe.load_lora_weights(str(good), adapter_name="default"),
    ):
        pipe = tiny_pixel_pipeline()
        load(pipe)
        state = pipe.transformer.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[key], expected[key]) for key in expected)
    # diffusers' class-level reader goes through the same reader
    tensors, metadata = DiTOptimumPipeline.lora_state_dict(good.parent, return_lora_metadata=True)
    assert tensors.keys() == load_file(good).keys() and metadata["transformer.r"] == 2
    assert DiTOptimumPipeline.lora_state_dict(str(good)).keys() == tensors.keys()


def test_state_dicts_passed_in_are_checked_too(good):
    tensors, _ = _tensors_and_metadata(good)
    pipe = tiny_pixel_pipeline()
    before = {key: value.clone() for key, value in pipe.transformer.state_dict().items()}
    foreign = {key.replace("transformer.", "unet.", 1): value for key, value in tensors.items()}
    with pytest.raises(DiTOptimumError, match=r"The LoRA state dict passed in holds no LoRA weights.*'unet\.'"):
        pipe.transformer.load_lora_adapter(foreign)
    with pytest.raises(DiTOptimumError, match=r"The LoRA state dict passed in holds no LoRA weights"):
        pipe.load_lora_weights(foreign)
    poisoned = {**tensors, KEY: torch.full_like(tensors[KEY], float("inf"))}
    with pytest.raises(DiTOptimumError, match="passed in holds non-finite values"):
        pipe.load_lora_weights(poisoned)
    with pytest.raises(DiTOptimumError, match="holds no LoRA weights"):
        pipe.transformer.load_lora_adapter({})
    assert_untouched(pipe.transformer, before)
    pipe.transformer.load_lora_adapter(tensors)  # the same tensors, well formed: they load


def test_an_unprefixed_file_names_the_prefix_and_loads_with_prefix_none(good, tmp_path):
    tensors, _ = _tensors_and_metadata(good)
    path = _write(tmp_path / "plain", tensors={k.removeprefix("transformer."): v for k, v in tensors.items()})
    pipe = tiny_pixel_pipeline()
    with pytest.raises(DiTOptimumError, match=r"lack the 'transformer\.' prefix.*prefix=None"):
        pipe.load_lora_weights(path.parent)
    pipe.transformer.load_lora_adapter(path.parent, weight_name=NAME, prefix=None)
    assert list(pipe.transformer.peft_config) == ["default_0"]


def test_missing_files_are_named(tmp_path):
    pipe = tiny_pixel_pipeline()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.safetensors"))):
        pipe.transformer.load_lora_adapter(tmp_path, weight_name="none.safetensors")
    with pytest.raises(DiTOptimumError, match=r"holds no \.safetensors file"):
        pipe.load_lora_weights(tmp_path)


def test_saving_lora_weights_under_another_format_is_refused_before_writing(tmp_path):
    pipe = adapted_pipeline()
    for weight_name in ("a.bin", "a.pt", "a.safetensors.bin"):
        with pytest.raises(DiTOptimumError, match=r"not a \.safetensors file"):
            pipe.transformer.save_lora_adapter(tmp_path / "model", weight_name=weight_name)
        with pytest.raises(DiTOptimumError, match=r"not a \.safetensors file"):
            DiTOptimumPipeline.save_lora_weights(
                tmp_path / "pipeline", transformer_lora_layers={KEY[12:]: torch.zeros(2, 32)}, weight_name=weight_name
            )
    with pytest.raises(DiTOptimumError, match="plain file name"):
        pipe.transformer.save_lora_adapter(tmp_path / "model", weight_name="../escape.safetensors")
    with pytest.raises(DiTOptimumError, match="safe_serialization"):
        DiTOptimumPipeline.save_lora_weights(
            tmp_path / "pipeline", transformer_lora_layers={KEY[12:]: torch.zeros(2, 32)}, safe_serialization=False
        )
    with pytest.raises(DiTOptimumError, match=r"non-finite.*lora_A"):
        DiTOptimumPipeline.save_lora_weights(
            tmp_path / "pipeline", transformer_lora_layers={KEY[12:]: torch.full((2, 32), float("nan"))}
        )
    with torch.no_grad():
        next(p for n, p in pipe.transformer.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(DiTOptimumError, match="Adapter 'default' holds non-finite"):
        pipe.transformer.save_lora_adapter(tmp_path / "model")
    assert not list(tmp_path.iterdir())  # nothing written


def images(pipe):
    result = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt")
    return result.images


def test_an_attached_adapter_is_not_saved_as_peft_wrapper_keys_and_the_named_ways_round_trip(tmp_path):
    pipe = adapted_pipeline()
    adapted = images(pipe)
    with pytest.raises(DiTOptimumError, match=r"LoRA adapter attached.*`pipe\.fuse_lora\(\)`.*unload_lora_weights"):
        pipe.save_pretrained(tmp_path / "pipeline")
    with pytest.raises(DiTOptimumError, match=r"LoRA adapter attached.*`fuse_lora\(\)` then `unload_lora\(\)`"):
        pipe.transformer.save_pretrained(tmp_path / "transformer")
    assert not list(tmp_path.iterdir())  # refused before anything was written
    # the adapter on its own (a pipeline-level file), then the base without it: both load back
    save_lora_weights_of(pipe.transformer, tmp_path / "lora")
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "base")
    base = DiTOptimumPipeline.from_pretrained(tmp_path / "base")
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(images(base), adapted)
    # fused and unloaded: the adapted weights saved as a plain pipeline
    base.fuse_lora()
    with pytest.raises(DiTOptimumError, match="LoRA adapter attached"):  # fused, but peft's layers still there
        base.save_pretrained(tmp_path / "fused")
    base.unload_lora_weights()
    base.save_pretrained(tmp_path / "fused")
    assert not any("base_layer" in key or "lora_" in key for key in _saved_keys(tmp_path / "fused"))
    fused = DiTOptimumPipeline.from_pretrained(tmp_path / "fused")
    fused.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(fused), adapted, atol=1e-5, rtol=1e-4)


def _saved_keys(folder: Path) -> list[str]:
    return list(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
