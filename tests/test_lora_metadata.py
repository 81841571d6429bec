"""LoRA files and adapter methods that diffusers / peft would take silently or crash on: a layer without its lora_A /
lora_B pair, adapter metadata outside what peft's ``LoraConfig`` takes for this model (alpha, dropout, patterns,
DoRA, unknown keys, deep nesting), dropout left in training mode, unknown adapter names and per-layer weight keys,
bad adapter names; every refusal is a ``DiTOptimumError`` naming the file or parameter, the model unchanged. The
pipeline's adapter methods wait for a running call (``call_lock``)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_pixel_pipeline
from dit_optimum.errors import DiTOptimumError
from dit_optimum.models.lora import lora_config
from dit_optimum.pipelines.lora import save_lora_weights_of

NAME = "pytorch_lora_weights.safetensors"
META = "lora_adapter_metadata"
TO_Q = "transformer_blocks.0.attn1.to_q"


def randomized(pipe):
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # an adapter that changes the images
    return pipe


def adapted_pipeline(config=None):
    pipe = tiny_pixel_pipeline()
    pipe.transformer.add_adapter(config or lora_config(pipe.transformer, ["attention", "mlp"], rank=2))
    return randomized(pipe)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    save_lora_weights_of(adapted_pipeline().transformer, folder)  # a pipeline-level file: keys under transformer.
    return folder / NAME


def images(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe([1, 2], num_inference_steps=2, guidance_scale=1.0, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def base_images() -> np.ndarray:
    return images(tiny_pixel_pipeline())


def tensors_and_metadata(good: Path) -> tuple[dict, dict]:
    with safe_open(good, "pt") as handle:
        config = json.loads(handle.metadata()[META])
    return load_file(good), config


def write(folder: Path, good: Path, change=None, tensors=None, raw=None) -> Path:
    """A copy of ``good`` in ``folder`` with its metadata updated by ``change`` (or replaced by the JSON ``raw``)
    and its tensors replaced by ``tensors``."""
    original, config = tensors_and_metadata(good)
    folder.mkdir(parents=True, exist_ok=True)
    text = raw if raw is not None else json.dumps({**config, **(change or {})})
    save_file(original if tensors is None else tensors, folder / NAME, metadata={"format": "pt", META: text})
    return folder / NAME


def snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert not getattr(model, "peft_config", {})
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())


def refused_both_ways(path: Path, message: str) -> None:
    """Both loaders refuse ``path`` naming it and matching ``message``, leaving the model as it was."""
    for loader in ("model", "pipeline"):
        pipe = tiny_pixel_pipeline()
        before = snapshot(pipe.transformer)
        with pytest.raises(DiTOptimumError, match=re.escape(str(path))) as error:
            if loader == "model":
                pipe.transformer.load_lora_adapter(path.parent, weight_name=NAME)
            else:
                pipe.load_lora_weights(path.parent)
        assert re.search(message, str(error.value)), str(error.value)
        assert_untouched(pipe.transformer, before)


# --- 1. every adapted layer has its lora_A / lora_B pair ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "keep", "layer"),
    [
        ("only_A", lambda key: "lora_A" in key, r"'transformer_blocks\.0\.attn1\.to_\w+' has lora_A but no lora_B"),
        ("only_B", lambda key: "lora_B" in key, r"'transformer_blocks\.0\.attn1\.to_\w+' has lora_B but no lora_A"),
        ("one_layer_A", lambda key: not (TO_Q in key and "lora_B" in key), rf"'{re.escape(TO_Q)}' has lora_A but no"),
        ("one_layer_B", lambda key: not (TO_Q in key and "lora_A" in key), rf"'{re.escape(TO_Q)}' has lora_B but no"),
    ],
)
def test_a_layer_without_its_lora_pair_is_refused_naming_it(kind, keep, layer, good, tmp_path):
    tensors, _ = tensors_and_metadata(good)
    path = write(tmp_path / kind, good, tensors={key: value for key, value in tensors.items() if keep(key)})
    refused_both_ways(path, layer + r".*needs both its lora_A and lora_B")
    pipe = tiny_pixel_pipeline()  # a state dict passed in goes through the same check
    with pytest.raises(DiTOptimumError, match=r"passed in: layer .* but no lora_"):
        pipe.transformer.load_lora_adapter({key: value for key, value in tensors.items() if keep(key)})


# --- 2. lora_alpha --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ["0", "0.0", "-1", "-1e308", "1e7", "1e308", "1" + "0" * 400, '"2"', "true", "null"])
def test_a_bad_lora_alpha_is_refused_naming_the_key(alpha, good, tmp_path):
    _, config = tensors_and_metadata(good)
    raw = json.dumps({**config, "transformer.lora_alpha": "@@"}).replace('"@@"', alpha)
    path = write(tmp_path / "alpha", good, raw=raw)
    refused_both_ways(path, r"`transformer\.lora_alpha`=.*allowed: a number in \(0, 1e\+06\]")


def test_lora_config_bounds_alpha_too():
    with pytest.raises(DiTOptimumError, match=r"`alpha`=10000000\.0 must be a finite number in \(0, 1e\+06\]"):
        lora_config(tiny_pixel_pipeline().transformer, rank=2, alpha=1e7)


# --- 3. dropout -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5, "0.5"])
def test_a_dropout_outside_0_1_is_refused(dropout, good, tmp_path):
    path = write(tmp_path / "dropout", good, {"transformer.lora_dropout": dropout})
    refused_both_ways(path, r"`transformer\.lora_dropout`=.*allowed: \[0, 1\)")


def test_loaded_dropout_follows_the_models_mode(good, base_images, tmp_path):
    path = write(tmp_path / "dropout", good, {"transformer.lora_dropout": 0.5})
    pipe = tiny_pixel_pipeline()
    assert not pipe.transformer.training
    pipe.load_lora_weights(path.parent)
    dropouts = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts and not any(module.training for module in dropouts)
    first = images(pipe)
    assert np.array_equal(first, images(pipe))  # same seed, same images
    assert not np.allclose(first, base_images)  # and the adapter acts
    reference = tiny_pixel_pipeline()
    reference.load_lora_weights(good.parent)  # dropout only acts in training: the same images as without it
    np.testing.assert_array_equal(first, images(reference))
    training = tiny_pixel_pipeline()
    training.transformer.train()
    training.transformer.load_lora_adapter(path.parent, weight_name=NAME)
    dropouts = [m for m in training.transformer.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts and all(module.training for module in dropouts)


# --- 4. other metadata ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"transformer.alpha_pattern": {TO_Q: "nan"}}, r"`transformer\.alpha_pattern`=.*allowed: an object mapping"),
        ({"transformer.alpha_pattern": {"to_q": 0}}, r"`transformer\.alpha_pattern`=.*numbers in \(0, 1e\+06\]"),
        ({"transformer.alpha_pattern": {"to_zz": 4}}, r"`transformer\.alpha_pattern` key 'to_zz'.*matches no layer"),
        ({"transformer.rank_pattern": {"to_q": 10**6}}, r"metadata's `transformer\.rank_pattern`\['to_q'\] says rank"),
        ({"transformer.rank_pattern": {"to_q": 0}}, r"`transformer\.rank_pattern`=.*integer ranks >= 1"),
        ({"transformer.rank_pattern": {"to_q(": 2}}, r"`transformer\.rank_pattern` key 'to_q\(' .*not a valid regular"),
        ({"transformer.r": 4}, r"metadata's `transformer\.r` says rank 4"),
        ({"transformer.r": 2.0}, r"`transformer\.r`=2\.0; allowed: an integer >= 1"),
        ({"transformer.use_dora": True}, r"`transformer\.use_dora` is true, but the file has no 'lora_magnitude"),
        ({"transformer.lora_bias": True}, r"`transformer\.lora_bias` is true, but the file has no 'lora_B\.bias'"),
        ({"transformer.bogus": 1}, r"`LoraConfig` class could not.*key `transformer\.bogus` is not an option of peft"),
        ({"transformer.init_lora_weights": "pissa"}, r"`transformer\.init_lora_weights`='pissa'; allowed: true"),
        ({"transformer.layer_replication": [[0, 1]]}, r"`transformer\.layer_replication`=.*does not support"),
        ({"transformer.use_dora": "yes"}, r"`transformer\.use_dora`='yes'; allowed: true or false"),
        ({"transformer.bias": "some"}, r"`transformer\.bias`='some'; allowed: none, all, lora_only"),
        ({"transformer.x": [[[[[[[[[[1]]]]]]]]]]}, r"nested deeper than 8 levels"),
    ],
)
def test_metadata_peft_would_crash_on_or_ignore_is_refused_naming_the_key(change, message, good, tmp_path):
    refused_both_ways(write(tmp_path / "meta", good, change), message)


def test_metadata_nested_too_deep_for_json_is_refused(good, tmp_path):
    _, config = tensors_and_metadata(good)
    raw = json.dumps(config)[:-1] + ', "transformer.x": ' + "[" * 50_000 + "]" * 50_000 + "}"
    refused_both_ways(write(tmp_path / "deep", good, raw=raw), r"adapter metadata nested too deeply to read")


def test_metadata_passed_in_is_checked_too(good):
    tensors, config = tensors_and_metadata(good)
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    pipe = tiny_pixel_pipeline()
    before = snapshot(pipe.transformer)
    with pytest.raises(DiTOptimumError, match=r"passed in has adapter metadata nested deeper"):
        pipe.transformer.load_lora_adapter(tensors, metadata={**config, "transformer.x": nested})
    with pytest.raises(DiTOptimumError, match=r"passed in has adapter metadata `transformer\.lora_alpha`=<an integer"):
        pipe.transformer.load_lora_adapter(tensors, metadata={**config, "transformer.lora_alpha": 10**5000})
    assert_untouched(pipe.transformer, before)


def test_supported_metadata_loads(good, base_images, tmp_path):
    plain = tiny_pixel_pipeline()
    plain.load_lora_weights(good.parent)
    expected = images(plain)
    # metadata for another component only: the ranks come from the tensors (not peft's default rank 8)
    tensors, _ = tensors_and_metadata(good)
    other = tmp_path / "other"
    other.mkdir()
    save_file(tensors, other / NAME, metadata={"format": "pt", META: json.dumps({"unet.r": 8})})
    pipe = tiny_pixel_pipeline()
    pipe.load_lora_weights(other)
    np.testing.assert_array_equal(images(pipe), expected)
    # rsLoRA scales by alpha / sqrt(rank): a different, finite adapter
    pipe = tiny_pixel_pipeline()
    pipe.load_lora_weights(write(tmp_path / "rs", good, {"transformer.use_rslora": True}).parent)
    assert np.isfinite(images(pipe)).all() and not np.allclose(images(pipe), expected)
    # a rank pattern that matches the tensors
    config = LoraConfig(r=2, lora_alpha=2, rank_pattern={"to_q": 4}, target_modules=["to_q", "to_k"])
    mixed = adapted_pipeline(config)
    save_lora_weights_of(mixed.transformer, tmp_path / "mixed")
    pipe = tiny_pixel_pipeline()
    pipe.load_lora_weights(tmp_path / "mixed")
    np.testing.assert_array_equal(images(pipe), images(mixed))
    refused_both_ways(
        write(tmp_path / "mixed_bad", tmp_path / "mixed" / NAME, {"transformer.rank_pattern": {"to_q": 3}}),
        r"rank_pattern`\['to_q'\] says rank 3",
    )


@pytest.mark.parametrize("variant", ["use_dora", "lora_bias"])
def test_dora_and_bias_adapters_load_whole_and_a_partial_one_is_refused(variant, tmp_path):
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], **{variant: True})
    adapted = adapted_pipeline(config)
    save_lora_weights_of(adapted.transformer, tmp_path / "whole")
    for load in ("model", "pipeline"):
        pipe = tiny_pixel_pipeline()
        if load == "model":
            pipe.transformer.load_lora_adapter(tmp_path / "whole", weight_name=NAME)
        else:
            pipe.load_lora_weights(tmp_path / "whole")
        assert not any(parameter.is_meta for parameter in pipe.transformer.parameters())
        np.testing.assert_array_equal(images(pipe), images(adapted))
    part = "lora_magnitude_vector" if variant == "use_dora" else "lora_B.bias"
    tensors, _ = tensors_and_metadata(tmp_path / "whole" / NAME)
    partial = {key: value for key, value in tensors.items() if not (TO_Q in key and part in key)}
    refused_both_ways(
        write(tmp_path / "partial", tmp_path / "whole" / NAME, tensors=partial),
        rf"adapted layers have a '{re.escape(part)}' tensor but layer '{re.escape(TO_Q)}' does not",
    )


# --- 5. adapter names and weights -----------------------------------------------------------------------------------


def loaded(good: Path, name: str = "a"):
    pipe = tiny_pixel_pipeline()
    pipe.load_lora_weights(good.parent, adapter_name=name)
    return pipe


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda p: p.set_adapters(["a"], {"a": 0.0}),
            r"`adapter_weights` has the key\(s\) 'a'.*allowed keys: transformer",
        ),
        (lambda p: p.set_adapters(["a"], [{"nonsense": 0.5}]), r"`adapter_weights` has the key\(s\) 'nonsense'"),
        (
            lambda p: p.set_adapters(["a"], [{"transformer": {"nonexistent_blocks": 0.0}}]),
            r"`weights` for adapter 'a' has the key 'nonexistent_blocks', which matches no adapted layer.*"
            r"'transformer_blocks\.0'",
        ),
        (
            lambda p: p.transformer.set_adapters("a", {"nonexistent_blocks": 0.0}),
            r"key 'nonexistent_blocks', which matches no adapted layer",
        ),
        (
            lambda p: p.transformer.set_adapters("a", {"transformer_blocks.0": {"attn1": 0.0}}),
            r"gives 'transformer_blocks\.0' the value .*per-layer weights are numbers",
        ),
        (lambda p: p.set_adapters(["zzz"], [1.0]), r"No LoRA adapter named 'zzz' in `adapter_names`; adapters: a\."),
        (lambda p: p.transformer.set_adapters("zzz"), r"No LoRA adapter named 'zzz'.*adapters: a\."),
        (lambda p: p.set_adapters(["a"], [1.0, 2.0]), r"`adapter_weights` has 2 entries for 1 adapters \['a'\]"),
        (lambda p: p.transformer.set_adapters(["a"], [1.0, 2.0]), r"`weights` has 2 entries for 1 adapters"),
        (lambda p: p.set_adapters(["a", "a"], [1.0, 0.0]), r"names an adapter twice"),
        (lambda p: p.set_adapters([], []), r"`adapter_names`=\[\] must be an adapter name or a non-empty list"),
        (lambda p: p.fuse_lora(adapter_names=["zzz"]), r"No LoRA adapter named 'zzz'.*adapters: a\."),
        (lambda p: p.fuse_lora(components=["unet"]), r"`components`=\['unet'\].*allowed: transformer"),
        (lambda p: p.delete_adapters(["zzz"]), r"No LoRA adapter named 'zzz'.*adapters: a\."),
        (lambda p: p.transformer.delete_adapters("zzz"), r"No LoRA adapter named 'zzz'.*adapters: a\."),
    ],
)
def test_adapter_arguments_that_would_be_ignored_are_refused(call, message, good):
    pipe = loaded(good)
    before, adapted_images = snapshot(pipe.transformer), images(pipe)
    with pytest.raises(DiTOptimumError, match=message):
        call(pipe)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert list(pipe.transformer.peft_config) == ["a"]
    np.testing.assert_array_equal(images(pipe), adapted_images)


def test_valid_adapter_weights_still_work(good, base_images):
    pipe = loaded(good)
    full = images(pipe)
    pipe.set_adapters(["a"], [{"transformer": {"transformer_blocks": 0.0}}])  # every adapted layer: weight 0
    np.testing.assert_allclose(images(pipe), base_images, atol=1e-6)
    pipe.set_adapters("a", {"transformer": 1.0})
    np.testing.assert_array_equal(images(pipe), full)
    pipe.transformer.set_adapters("a", {"transformer_blocks.1": 0.0})  # block 1 off: something in between
    assert not np.allclose(images(pipe), full) and not np.allclose(images(pipe), base_images)
    pipe.fuse_lora(adapter_names=["a"])
    pipe.unfuse_lora()
    pipe.delete_adapters("a")
    assert not getattr(pipe.transformer, "peft_config", {})


@pytest.mark.parametrize("name", [5, "a.b", "", "keys", ["a"]])
def test_a_bad_adapter_name_is_refused_and_the_model_is_unchanged(name, good):
    for load in ("model", "pipeline"):
        pipe = tiny_pixel_pipeline()
        before = snapshot(pipe.transformer)
        with pytest.raises(DiTOptimumError, match=r"`adapter_name`=.* is not a valid adapter name; allowed: a non"):
            if load == "model":
                pipe.transformer.load_lora_adapter(good, adapter_name=name)
            else:
                pipe.load_lora_weights(good.parent, adapter_name=name)
        assert_untouched(pipe.transformer, before)


def test_hotswap_needs_a_loaded_adapter(good):
    pipe = tiny_pixel_pipeline()
    with pytest.raises(DiTOptimumError, match=r"`hotswap`=True .*`adapter_name`='a' names none; adapters: none"):
        pipe.load_lora_weights(good.parent, adapter_name="a", hotswap=True)
    assert not getattr(pipe.transformer, "peft_config", {})


def test_a_load_that_fails_inside_peft_leaves_no_adapter(good, monkeypatch):
    import peft

    pipe = loaded(good, "first")
    before = snapshot(pipe.transformer)

    def broken(*args, **kwargs):
        raise RuntimeError("injection failed")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", broken)
    with pytest.raises(DiTOptimumError, match=r"could not be loaded as a LoRA adapter: injection failed"):
        pipe.load_lora_weights(good.parent, adapter_name="second")
    assert list(pipe.transformer.peft_config) == ["first"]
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys()
    fresh = tiny_pixel_pipeline()
    original = snapshot(fresh.transformer)
    with pytest.raises(DiTOptimumError, match=r"injection failed"):
        fresh.load_lora_weights(good.parent)
    assert_untouched(fresh.transformer, original)


# --- 6. adapter methods wait for a running call ---------------------------------------------------------------------


def test_adapter_methods_wait_for_the_call_holding_the_lock(good):
    pipe = loaded(good)
    mutators = [
        lambda: pipe.set_adapters("a", 0.5),
        lambda: pipe.fuse_lora(),
        lambda: pipe.unfuse_lora(),
        lambda: pipe.disable_lora(),
        lambda: pipe.enable_lora(),
        lambda: pipe.delete_adapters("a"),
        lambda: pipe.load_lora_weights(good.parent, adapter_name="a"),
        lambda: pipe.unload_lora_weights(),
    ]
    for mutate in mutators:
        held, release, done, errors = threading.Event(), threading.Event(), threading.Event(), []

        def call(held=held, release=release) -> None:  # stands for a running pipe(...) call
            with pipe.call_lock:
                held.set()
                release.wait(60)

        def change(mutate=mutate, done=done, errors=errors) -> None:
            try:
                mutate()
            except BaseException as error:  # reported below
                errors.append(error)
            done.set()

        caller = threading.Thread(target=call)
        caller.start()
        assert held.wait(60)
        changer = threading.Thread(target=change)
        changer.start()
        assert not done.wait(0.3)  # it waits for the call
        release.set()
        caller.join(60)
        changer.join(60)
        assert done.is_set() and not errors, errors
    assert not getattr(pipe.transformer, "peft_config", {})


def test_set_adapters_during_a_call_does_not_change_its_images(good, base_images):
    pipe = loaded(good)

    def sample() -> np.ndarray:
        generator = torch.Generator().manual_seed(3)
        return pipe([1, 2], num_inference_steps=60, guidance_scale=2.0, generator=generator, output_type="np").images

    alone = sample()
    results: dict = {}
    worker = threading.Thread(target=lambda: results.setdefault("images", sample()))
    worker.start()
    while worker.is_alive():  # until the call holds the lock (or has finished)
        if not pipe.call_lock.acquire(blocking=False):
            break
        pipe.call_lock.release()
    pipe.set_adapters("a", 0.0)
    worker.join(120)
    np.testing.assert_array_equal(results["images"], alone)
    np.testing.assert_allclose(images(pipe), base_images, atol=1e-6)
