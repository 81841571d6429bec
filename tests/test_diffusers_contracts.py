"""diffusers' model contracts (the promises its tester mixins check on every model: saving and loading, exception
types, LoRA files, cache hooks, attention processors), written as this project's own tests and run for every
attention type and for MoE on tiny models. ``benchmarks/diffusers_contracts.py`` runs diffusers' mixins themselves;
docs/architecture_contracts.md names where the package deliberately differs (it refuses where diffusers warns)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks import TextKVCacheConfig
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import MODEL_KINDS, kind_id, model_inputs, tiny_model, tiny_pixel_pipeline
from dit_optimum import DiTOptimumTransformer2DModel, quantize
from dit_optimum.errors import DiTOptimumError
from dit_optimum.models.block_cache import BlockCacheSchedule
from dit_optimum.pipelines.lora import save_lora_weights_of

KINDS = pytest.mark.parametrize("overrides", MODEL_KINDS, ids=kind_id)
LORA_FILE = "pytorch_lora_weights.safetensors"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def forward(model, sample=None, dtype=torch.float32) -> torch.Tensor:
    """One forward on a batch of 4, inputs as keyword arguments (as diffusers' pipelines and hooks pass them)."""
    default, timestep, labels = model_inputs(model, batch=4)
    sample = default if sample is None else sample
    with torch.no_grad():
        return model(hidden_states=sample.to(dtype), timestep=timestep, class_labels=labels).sample


def has_lora_layers(model) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def random_adapter(model, **options) -> None:
    """An adapter that changes the output (random A and B), alpha != rank so that the metadata matters."""
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False, **options))


def file_contents(path):
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys()), handle.metadata()


def normalized(config: dict) -> dict:
    return {key: sorted(value) if isinstance(value, (set, list)) else value for key, value in config.items()}


# --- saving and loading -----------------------------------------------------------------------------------------


@KINDS
def test_save_load_round_trip_keeps_every_tensor_and_the_output(overrides, tmp_path):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path)
    loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path).eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(forward(loaded), forward(model), atol=0, rtol=0)
    # determinism, and the tuple output is the dict output
    sample, timestep, labels = model_inputs(model, batch=4)
    with torch.no_grad():
        as_tuple = model(sample, timestep, labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], forward(model))


@KINDS
def test_a_variant_loads_and_a_folder_without_the_weights_is_an_oserror(overrides, tmp_path):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path, variant="fp16")
    torch.testing.assert_close(forward(loaded), forward(model))
    # diffusers raises OSError (its variant fallback catches it), naming the file it looked for last
    with pytest.raises(OSError, match=r"Error no file named diffusion_pytorch_model\.bin found in directory") as info:
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path)
    assert isinstance(info.value, DiTOptimumError)  # still the package's error (a ValueError too)
    assert "diffusion_pytorch_model.safetensors" in str(info.value)


def test_missing_folders_and_damaged_configs_are_oserrors(tmp_path):
    for where in (tmp_path / "missing", tmp_path):  # no folder; a folder without config.json
        with pytest.raises(OSError, match=r"config\.json"):
            DiTOptimumTransformer2DModel.from_pretrained(where)
    tiny_model().save_pretrained(tmp_path / "model")
    with pytest.raises(OSError, match="`subfolder`='nope' does not exist"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "model", subfolder="nope")
    (tmp_path / "model" / "config.json").write_text("[1, 2]")  # diffusers: "not a valid JSON file", an OSError
    with pytest.raises(OSError, match="must hold a JSON object"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "model")


@KINDS
def test_a_saved_dtype_loads_as_asked(overrides, tmp_path):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        folder = tmp_path / str(dtype)
        tiny_model(**overrides).to(dtype).save_pretrained(folder)
        for low_cpu_mem_usage in (True, False):
            model = DiTOptimumTransformer2DModel.from_pretrained(
                folder, torch_dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage
            )
            assert model.dtype == dtype
    with pytest.raises(ValueError, match=r"must be a torch\.dtype"):  # diffusers would load float32 silently
        DiTOptimumTransformer2DModel.from_pretrained(folder, torch_dtype="float16")


def test_config_attributes_and_unknown_attributes_behave_as_in_diffusers():
    model = tiny_model()
    model.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert model.test_attribute == 5
    with pytest.raises(AttributeError, match=r"^'DiTOptimumTransformer2DModel' object has no attribute 'nope'$"):
        model.nope  # noqa: B018


# --- attention processors ---------------------------------------------------------------------------------------


@KINDS
def test_attention_processors_get_set_and_fuse(overrides):
    model = tiny_model(**overrides)
    reference = forward(model)
    processors = model.attn_processors
    assert sorted(processors) == [f"transformer_blocks.{i}.attn1.processor" for i in range(2)]
    model.set_attn_processor({name: type(processor)() for name, processor in processors.items()})
    assert all(model.attn_processors[name] is not processors[name] for name in processors)
    torch.testing.assert_close(forward(model), reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({next(iter(processors)): type(processors[next(iter(processors))])()})
    attention = model.transformer_blocks[0].attn1
    fresh = type(attention.get_processor())()
    attention.set_processor(fresh)
    assert attention.get_processor() is fresh
    model.fuse_qkv_projections()
    torch.testing.assert_close(forward(model), reference, atol=1e-5, rtol=1e-5)
    model.unfuse_qkv_projections()
    torch.testing.assert_close(forward(model), reference, atol=0, rtol=0)


# --- compilation --------------------------------------------------------------------------------------------------


@KINDS
def test_regional_compilation_compiles_one_block_once(overrides):
    # diffusers' `compile_repeated_blocks` compiles the block class once: every block must see inputs with the same
    # strides, or the second block recompiles (the eager backend keeps dynamo's guards and costs no code generation)
    model = tiny_model(**overrides)
    reference = forward(model)
    torch._dynamo.reset()
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        compiled = forward(model)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, reference, atol=1e-6, rtol=1e-6)


# --- LoRA files ---------------------------------------------------------------------------------------------------


@KINDS
def test_a_model_level_lora_file_is_diffusers_layout_and_loads_with_prefix_none(overrides, tmp_path):
    model = tiny_model(**overrides)
    base = forward(model)
    random_adapter(model)
    adapted = forward(model)
    assert not torch.allclose(adapted, base)
    written = normalized(model.peft_config["default"].to_dict())
    model.save_lora_adapter(tmp_path)
    keys, header = file_contents(tmp_path / LORA_FILE)
    assert keys and all(key.startswith("transformer_blocks.") for key in keys)  # no prefix, as diffusers writes it
    metadata = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    assert normalized(metadata) == written  # the whole LoraConfig, unprefixed
    model.unload_lora()
    assert not has_lora_layers(model) and torch.equal(forward(model), base)
    model.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    assert list(model.peft_config) == ["default_0"]  # diffusers' default adapter name
    assert model.peft_config["default_0"].lora_alpha == 8  # alpha comes from the metadata
    loaded = get_peft_model_state_dict(model, adapter_name="default_0")
    assert all(torch.equal(loaded[key], tensor) for key, tensor in load_file(tmp_path / LORA_FILE).items())
    torch.testing.assert_close(forward(model), adapted, atol=0, rtol=0)
    # diffusers' default prefix reads keys under `transformer.`: this file is refused, naming what to pass
    fresh = tiny_model(**overrides)
    with pytest.raises(ValueError, match=r"lack the 'transformer\.' prefix.*prefix=None"):
        fresh.load_lora_adapter(tmp_path)
    assert not has_lora_layers(fresh)


@KINDS
def test_a_pipeline_level_file_is_prefixed_and_both_kinds_load_where_diffusers_loads_them(overrides, tmp_path):
    pipe = tiny_pixel_pipeline(**overrides)
    random_adapter(pipe.transformer)
    expected = forward(pipe.transformer)
    save_lora_weights_of(pipe.transformer, tmp_path / "pipeline")
    pipe.transformer.save_lora_adapter(tmp_path / "model")
    keys, header = file_contents(tmp_path / "pipeline" / LORA_FILE)
    assert keys and all(key.startswith("transformer.transformer_blocks.") for key in keys)
    assert all(key.startswith("transformer.") for key in json.loads(header[LORA_ADAPTER_METADATA_KEY]))
    # pipeline-level: pipe.load_lora_weights and the transformer's default prefix
    other = tiny_pixel_pipeline(**overrides)
    other.load_lora_weights(tmp_path / "pipeline")
    torch.testing.assert_close(forward(other.transformer), expected, atol=0, rtol=0)
    other.unload_lora_weights()
    other.transformer.load_lora_adapter(tmp_path / "pipeline")
    torch.testing.assert_close(forward(other.transformer), expected, atol=0, rtol=0)
    # model-level: pipe.transformer.load_lora_adapter(..., prefix=None); the pipeline loader names that way
    third = tiny_pixel_pipeline(**overrides)
    third.transformer.load_lora_adapter(tmp_path / "model", prefix=None)
    torch.testing.assert_close(forward(third.transformer), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"prefix=None"):
        tiny_pixel_pipeline(**overrides).load_lora_weights(tmp_path / "model")
    # a pipeline-level file given prefix=None is refused naming the loaders that read it
    with pytest.raises(ValueError, match=r"pipeline-level file.*load_lora_weights"):
        tiny_pixel_pipeline(**overrides).transformer.load_lora_adapter(tmp_path / "pipeline", prefix=None)


@pytest.mark.parametrize("overrides", [MODEL_KINDS[0], MODEL_KINDS[-1]], ids=kind_id)
@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_both_kinds_of_file_load_onto_a_quantized_base(backend, overrides, tmp_path):
    def quantized():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quanto's deprecation
            return quantize(tiny_pixel_pipeline(**overrides), backend=backend, weights="int8")

    pipe = quantized()
    random_adapter(pipe.transformer)
    dtype = pipe.transformer.dtype
    expected = forward(pipe.transformer, dtype=dtype)
    pipe.transformer.save_lora_adapter(tmp_path / "model")  # diffusers' own version would cast the quantized base
    save_lora_weights_of(pipe.transformer, tmp_path / "pipeline")
    model_level = quantized()
    model_level.transformer.load_lora_adapter(tmp_path / "model", prefix=None)
    torch.testing.assert_close(forward(model_level.transformer, dtype=dtype), expected, atol=0, rtol=0)
    pipeline_level = quantized()
    pipeline_level.load_lora_weights(tmp_path / "pipeline")
    torch.testing.assert_close(forward(pipeline_level.transformer, dtype=dtype), expected, atol=0, rtol=0)


def test_lora_errors_have_diffusers_types_and_leave_the_model_unchanged(tmp_path):
    model = tiny_model()
    random_adapter(model)
    with pytest.raises(ValueError, match=r"^Adapter name foo not found in the model\."):
        model.save_lora_adapter(tmp_path, adapter_name="foo")
    model.save_lora_adapter(tmp_path)
    tensors = load_file(tmp_path / LORA_FILE)
    _, header = file_contents(tmp_path / LORA_FILE)
    metadata = {**json.loads(header[LORA_ADAPTER_METADATA_KEY]), "foo": 1}
    save_file(tensors, tmp_path / LORA_FILE, metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(metadata)})
    fresh = tiny_model()
    reference = forward(fresh)
    # an option LoraConfig does not take: diffusers' TypeError (and the package's error)
    with pytest.raises(TypeError, match="`LoraConfig` class could not be instantiated") as info:
        fresh.load_lora_adapter(tmp_path, prefix=None)
    assert isinstance(info.value, DiTOptimumError) and "`foo`" in str(info.value)
    # where diffusers warns and loads part of a file, or nothing, the package refuses (a ValueError) instead
    one_a = next(key for key in tensors if "lora_A" in key)
    refusals = [
        ({key: value for key, value in tensors.items() if key != one_a}, "no lora_A weight"),  # a missing key
        ({**tensors, one_a + ".diffusers_cat": torch.tensor(1.0)}, "name no layer of this model"),  # an unexpected one
    ]
    for state_dict, message in refusals:
        with pytest.raises(ValueError, match=message):
            fresh.load_lora_adapter(state_dict, prefix=None)
    with pytest.raises(ValueError, match="holds no LoRA weights for this model"):
        fresh.load_lora_adapter({"lora_foo": torch.tensor(2.0)}, prefix="transformer")
    assert not has_lora_layers(fresh) and not getattr(fresh, "peft_config", {})
    assert torch.equal(forward(fresh), reference)


# --- cache hooks --------------------------------------------------------------------------------------------------

HOOKS = {
    "first-block": (lambda: FirstBlockCacheConfig(threshold=1.0), {"fbc_leader_block_hook", "fbc_block_hook"}),
    "pab": (
        lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
        ),
        {"pyramid_attention_broadcast"},
    ),
    "taylorseer": (
        lambda: TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=1, max_order=1),  # defaults
        {"taylorseer_cache"},
    ),
    "magcache": (
        lambda: MagCacheConfig(num_inference_steps=2, retention_ratio=0.0, threshold=100.0, mag_ratios=[1.0, 1.0]),
        {"mag_cache_leader_block_hook", "mag_cache_block_hook"},
    ),
    "block-schedule": (
        lambda: BlockCacheSchedule.from_dict({"num_inference_steps": 2, "reuse": [[], [1]]}),
        {"dit_optimum_block_schedule"},
    ),
}


def block_hooks(model) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if name and registry is not None:
            names.update(registry._hook_order)
    return names


@KINDS
@pytest.mark.parametrize("method", list(HOOKS))
def test_each_cache_hooks_the_dit_changes_cached_steps_and_a_second_cache_is_diffusers_error(method, overrides):
    make, hook_names = HOOKS[method]
    model = tiny_model(**overrides)
    sample, _, _ = model_inputs(model, batch=4)
    moved = sample + torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    uncached = forward(model, moved)
    model.enable_cache(make())
    assert model.is_cache_enabled and hook_names <= block_hooks(model)
    already = r"^Caching has already been enabled with <class '.*'>\. To apply a new caching technique"
    with pytest.raises(ValueError, match=already):
        model.enable_cache(FirstBlockCacheConfig())
    with model.cache_context("first"):
        first = forward(model)
    with model.cache_context("second"):  # a fresh context starts like the first
        assert torch.equal(forward(model), first)
    for step in range(2):  # two denoising steps, as a pipeline's loop sets them; the second one is cached
        with model.cache_context("steps", step_index=step, num_inference_steps=2, timestep=500):
            cached = forward(model, moved if step else None)
    assert torch.isfinite(cached).all() and not torch.allclose(cached, uncached, atol=1e-5)
    model.disable_cache()
    assert not model.is_cache_enabled and not hook_names & block_hooks(model)
    torch.testing.assert_close(forward(model, moved), uncached, atol=0, rtol=0)


def test_taylorseer_defaults_hook_the_attention_and_lite_mode_the_final_projection():
    model = tiny_model()
    config = TaylorSeerCacheConfig()
    model.enable_cache(config)
    hooked = {name for name, module in model.named_modules() if getattr(module, "_diffusers_hook", None)}
    assert {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"} <= hooked
    assert config.cache_identifiers is None  # the caller's config is not changed
    model.disable_cache()
    model.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True))
    hooked = {name for name, module in model.named_modules() if getattr(module, "_diffusers_hook", None)}
    assert {"proj_out_2", "transformer_blocks.0", "transformer_blocks.1"} <= hooked


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: TaylorSeerCacheConfig(cache_identifiers=[r"blocks\.\d+\.attn"]), r"cache_identifiers.*attn1"),
        (
            lambda: PyramidAttentionBroadcastConfig(
                spatial_attention_block_identifiers=("^nothing",), current_timestep_callback=lambda: 500
            ),
            "spatial_attention_block_identifiers",
        ),
        (lambda: FasterCacheConfig(current_timestep_callback=lambda: 500), r"tensor_format='BCHW'"),
        (lambda: TextKVCacheConfig(), r"TextKVCacheConfig hooked no module.*text key/values"),
    ],
    ids=["taylorseer", "pab", "faster-video-layout", "text-kv"],
)
def test_a_cache_that_would_change_nothing_is_refused_saying_what_to_pass(config, message):
    model = tiny_model()
    reference = forward(model)
    with pytest.raises(ValueError, match=message):
        model.enable_cache(config())
    assert not model.is_cache_enabled and not block_hooks(model)
    assert torch.equal(forward(model), reference)


@KINDS
def test_faster_cache_treats_an_unguided_batch_as_diffusers_does(overrides):
    """diffusers' contract: the batch is [unconditional; conditional]; on a skipped step the conditional half is
    computed and the unconditional half approximated, and the output keeps the batch size (class labels split too)."""
    model = tiny_model(**overrides)
    sample, _, _ = model_inputs(model, batch=4)
    moved = sample + torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    timestep = [1000]
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 901),
        tensor_format="BCHW",
        current_timestep_callback=lambda: timestep[0],
    )
    model.enable_cache(config)
    assert "class_labels" not in config._unconditional_conditional_input_kwargs_identifiers  # caller's unchanged
    forward(model)
    timestep[0] = 500
    cached = forward(model, moved)
    model.disable_cache()
    assert cached.shape == (*sample.shape[:1], 8, 8, 8) and torch.isfinite(cached).all()
    assert not torch.allclose(cached, forward(model, moved), atol=1e-5)


def test_the_pipeline_runs_faster_cache_guided_and_refuses_it_unguided():
    from dit_optimum import enable_step_cache

    pipe = enable_step_cache(tiny_pixel_pipeline(), "faster")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = pipe([1, 2], num_inference_steps=3, guidance_scale=4.0, output_type="pt").images
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    with pytest.raises(ValueError, match=r"FasterCache needs `guidance_scale` > 1"):
        pipe([1, 2], num_inference_steps=3, guidance_scale=1.0, output_type="pt")
