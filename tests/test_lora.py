"""LoRA through diffusers' PeftAdapterMixin and pipeline loaders: zero-initialised adapters change nothing, trained
adapters save and reload (model, pipeline, plain DiffusionPipeline) to equal outputs, fuse == unfused, quantized
bases adapt, pickled files are refused, bad targets and ranks are named."""

from __future__ import annotations

import pickle

import pytest
import torch
from diffusers import DiffusionPipeline
from peft import get_peft_model_state_dict

from conftest import MODEL_KINDS, kind_id, model_inputs, tiny_model, tiny_pixel_pipeline
from dit_optimum import DiTOptimumPipeline, quantize
from dit_optimum.errors import DiTOptimumError
from dit_optimum.models.lora import LORA_TARGETS, lora_config, lora_target_modules
from dit_optimum.pipelines.lora import save_lora_weights_of

ALL_TARGETS = list(LORA_TARGETS)


def train_adapter(model, steps: int = 3, dtype=torch.float32) -> None:
    """A few optimizer steps on the adapter only (moves lora_B away from its zero start)."""
    sample, timestep, labels = model_inputs(model)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-2)
    model.train()
    for _ in range(steps):
        loss = model(sample.to(dtype), timestep, labels).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def outputs(model, dtype=torch.float32) -> torch.Tensor:
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        return model(sample.to(dtype), timestep, labels).sample


@pytest.mark.parametrize("overrides", MODEL_KINDS, ids=kind_id)
def test_every_kind_adapts_from_the_identity_and_reloads_equal(overrides, tmp_path):
    model = tiny_model(**overrides).eval()
    reference = outputs(model)
    targets = ["attention", "adaln"] if "moe_num_experts" in overrides else ALL_TARGETS
    model.add_adapter(lora_config(model, targets, rank=4))
    assert torch.equal(outputs(model), reference)  # zero-initialised B: nothing changes
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen and all("lora_" not in name for name in frozen)
    train_adapter(model)
    adapted = outputs(model)
    assert not torch.allclose(adapted, reference)
    model.save_lora_adapter(tmp_path)  # a model-level file (diffusers' layout: no prefix)
    fresh = tiny_model(**overrides).eval()
    fresh.load_lora_adapter(
        tmp_path, prefix=None, weight_name="pytorch_lora_weights.safetensors", adapter_name="default"
    )
    assert torch.equal(outputs(fresh), adapted)
    fresh.fuse_lora()
    torch.testing.assert_close(outputs(fresh), adapted, atol=1e-5, rtol=1e-5)
    fresh.unfuse_lora()
    torch.testing.assert_close(outputs(fresh), adapted, atol=1e-5, rtol=1e-5)
    fresh.disable_adapters()
    torch.testing.assert_close(outputs(fresh), reference, atol=1e-5, rtol=1e-5)


def images(pipe) -> torch.Tensor:
    result = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np")
    return torch.from_numpy(result.images)


def test_pipeline_lora_methods_and_a_plain_diffusers_pipeline(tmp_path):
    pipe = tiny_pixel_pipeline()
    pipe.transformer.add_adapter(lora_config(pipe.transformer, ["attention", "mlp"], rank=2, alpha=4))
    train_adapter(pipe.transformer)
    expected = images(pipe)
    save_lora_weights_of(pipe.transformer, tmp_path / "lora")  # a pipeline-level file (keys under transformer.)
    pipe.transformer.save_lora_adapter(tmp_path / "model-level")  # a model-level file (no prefix)
    # the pipeline-level file through the pipeline-level methods
    other = tiny_pixel_pipeline()
    other.load_lora_weights(tmp_path / "lora")
    assert torch.equal(images(other), expected)
    # the model-level file into a pipeline's transformer, as diffusers loads it
    model_level = tiny_pixel_pipeline()
    model_level.transformer.load_lora_adapter(tmp_path / "model-level", prefix=None)
    assert torch.equal(images(model_level), expected)
    layers = get_peft_model_state_dict(other.transformer, adapter_name="default_0")  # diffusers' default name
    metadata = other.transformer.peft_config["default_0"].to_dict()  # alpha travels in the metadata
    DiTOptimumPipeline.save_lora_weights(
        tmp_path / "again", transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    third = tiny_pixel_pipeline()
    third.load_lora_weights(tmp_path / "again", adapter_name="digits")
    assert torch.equal(images(third), expected)
    third.fuse_lora()
    torch.testing.assert_close(images(third), expected, atol=1e-4, rtol=0)
    third.unfuse_lora()
    third.set_adapters("digits", 0.0)  # weight 0: the base model
    torch.testing.assert_close(images(third), images(tiny_pixel_pipeline()), atol=1e-5, rtol=0)
    third.delete_adapters("digits")
    assert not getattr(third.transformer, "peft_config", {})
    # a pipeline opened with plain diffusers takes the adapter through its transformer
    tiny_pixel_pipeline().save_pretrained(tmp_path / "base")
    plain = DiffusionPipeline.from_pretrained(tmp_path / "base")
    plain.transformer.load_lora_adapter(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    plain_images = plain(class_labels=[1, 2], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np")
    assert torch.equal(torch.from_numpy(plain_images.images), expected)


def test_lora_on_an_int8_base_trains_saves_and_reloads(tmp_path):
    base = quantize(tiny_pixel_pipeline(), backend="torchao", weights="int8").transformer
    base.add_adapter(lora_config(base, ["attention"], rank=4))
    train_adapter(base, dtype=torch.bfloat16)
    adapted = outputs(base, torch.bfloat16)
    base.save_lora_adapter(tmp_path)
    fresh = quantize(tiny_pixel_pipeline(), backend="torchao", weights="int8").transformer
    fresh.load_lora_adapter(tmp_path, weight_name="pytorch_lora_weights.safetensors", prefix=None)
    assert torch.equal(outputs(fresh, torch.bfloat16), adapted)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w')",))


def test_pickled_lora_files_are_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(pickle.dumps(_Payload(marker)))
    pipe = tiny_pixel_pipeline()
    with pytest.raises(DiTOptimumError, match=r"not a \.safetensors file"):
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.bin")
    with pytest.raises(DiTOptimumError, match="safetensors only"):
        pipe.load_lora_weights(tmp_path, use_safetensors=False)
    with pytest.raises(DiTOptimumError, match=r"not a \.safetensors file"):
        pipe.transformer.load_lora_adapter(tmp_path, weight_name="pytorch_lora_weights.bin")
    with pytest.raises((OSError, ValueError)):  # no safetensors file there: diffusers finds nothing to load
        pipe.load_lora_weights(tmp_path)
    assert not marker.exists()
    pipe.transformer.add_adapter(lora_config(pipe.transformer, ["attention"], rank=2))
    with pytest.raises(DiTOptimumError, match="safe_serialization"):
        pipe.transformer.save_lora_adapter(tmp_path / "x", safe_serialization=False)
    with pytest.raises(DiTOptimumError, match=r"Adapter name nope not found in the model\. Its adapters: default"):
        pipe.transformer.save_lora_adapter(tmp_path / "x", adapter_name="nope")


def test_bad_targets_and_ranks_are_named():
    model = tiny_model()
    with pytest.raises(DiTOptimumError, match=r"Unknown LoRA `targets` \['qkv'\]; allowed values: attention, mlp"):
        lora_config(model, ["qkv"])
    with pytest.raises(DiTOptimumError, match="non-empty list"):
        lora_config(model, "attention")
    with pytest.raises(DiTOptimumError, match="non-empty list"):
        lora_config(model, [])
    moe = tiny_model(moe_num_experts=4, moe_top_k=2)
    with pytest.raises(DiTOptimumError, match="group 'mlp' matches no layer"):
        lora_target_modules(moe, ["mlp"])
    for rank in (0, -1, 2.5, True, "4"):
        with pytest.raises(DiTOptimumError, match="LoRA `rank`"):
            lora_config(model, rank=rank)
    for alpha in (0, -1.0, float("nan"), float("inf"), "8"):
        with pytest.raises(DiTOptimumError, match="LoRA `alpha`"):
            lora_config(model, rank=4, alpha=alpha)
    assert len(lora_target_modules(model, ALL_TARGETS)) == 2 * 7  # 2 blocks x (4 attention + 2 MLP + 1 adaLN)
