"""Model inputs an outside tester broke: config keys that size weights, wrong types and unbounded numbers, weights
of the wrong dtype, a focusing factor that turns the forward NaN, and a float16 cast that overflows.

Every refusal is a ``DiTOptimumError`` naming the key or file and what is allowed."""

from __future__ import annotations

import json
import math
import re
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import model_inputs, stock_model, tiny_config, tiny_model
from dit_optimum import DiTOptimumError, DiTOptimumTransformer2DModel
from dit_optimum.models.attention import focus
from dit_optimum.models.moe import MoEFeedForward
from dit_optimum.models.transformer import estimated_parameter_bytes
from dit_optimum.training.cli import main as train_cli
from dit_optimum.training.diffusion import GaussianDiffusion

WEIGHTS = "diffusion_pytorch_model.safetensors"
GIB = 2**30


@pytest.fixture
def memory_16_gib(monkeypatch):
    """The memory check sees 16 GiB available, whatever the machine has."""
    memory = namedtuple("memory", "available total")(16 * GIB, 32 * GIB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)


def edited_folder(tmp_path: Path, raw: dict[str, str]) -> Path:
    """A saved tiny model whose config.json has ``key: raw JSON text`` entries written verbatim."""
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key in raw:
        config[key] = f"@@{key}@@"
    text = json.dumps(config)
    for key, value in raw.items():
        text = text.replace(f'"@@{key}@@"', value)
    (folder / "config.json").write_text(text)
    return folder


# --- 1. every key that sizes a weight counts in the memory check ------------------------------------------------

HUGE_SIZES = [
    ({"layer_mlp_dims": [10**9, 10**9]}, r"`layer_mlp_dims`=\[1000000000, 1000000000\]"),
    ({"moe_num_experts": 2, "moe_top_k": 1, "moe_expert_dim": 10**9}, r"`moe_expert_dim`=1000000000"),
    ({"moe_num_experts": 2, "moe_top_k": 1, "moe_num_shared_experts": 10**6}, r"`moe_num_shared_experts`=1000000"),
    ({"moe_num_experts": 10**8, "moe_top_k": 1}, r"`moe_num_experts`=100000000"),
    ({"attention_type": "focused", "dwconv_kernel_size": 100_001}, r"`dwconv_kernel_size`=100001"),
    ({"num_embeds_ada_norm": 10**9}, r"`num_embeds_ada_norm`=1000000000"),
    ({"sample_size": 2**20, "patch_size": 2}, r"`sample_size` / `patch_size`=1048576 / 2"),
]


@pytest.mark.parametrize(("overrides", "key"), HUGE_SIZES, ids=[str(c[0])[:50] for c in HUGE_SIZES])
def test_a_config_too_large_for_memory_is_refused_naming_the_key_that_sizes_it(memory_16_gib, overrides, key):
    with pytest.raises(DiTOptimumError, match=rf"needs about .* GiB for its weights alone; 16\.0 GiB are .*{key}"):
        DiTOptimumTransformer2DModel(**tiny_config(**overrides))


def test_a_too_large_config_json_is_refused_before_allocating(tmp_path, memory_16_gib):
    folder = edited_folder(tmp_path, {"layer_mlp_dims": "[1000000000, 1000000000]"})
    with pytest.raises(DiTOptimumError, match=r"GiB.*`layer_mlp_dims`=\[1000000000, 1000000000\]"):
        DiTOptimumTransformer2DModel.from_pretrained(folder)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ('{"num_layers": 2, "layer_mlp_dims": [1000000000, 1000000000]}', "`layer_mlp_dims`=[1000000000, 1000000000]"),
        ('{"moe_num_experts": 2, "moe_top_k": 1, "moe_expert_dim": 1000000000}', "`moe_expert_dim`=1000000000"),
    ],
)
def test_the_training_command_refuses_a_too_large_model_config_naming_the_key(
    tmp_path, capsys, memory_16_gib, config, key
):
    argv = ["--output-dir", str(tmp_path / "run"), "--model", "DiT-XS/4", "--model-config", config]
    argv += ["--image-size", "8", "--batch-size", "8", "--max-samples", "8", "--steps", "1"]
    assert train_cli("base", argv) == 2
    error = capsys.readouterr().err
    assert "for its weights alone" in error and key in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()


CLI_CONFIGS = [
    ('{"num_layers": 2, "mlp_ratio": 1e308}', "`mlp_ratio`=1e+308 must be a finite number in (0, 256]"),
    ('{"moe_num_experts": 2, "moe_top_k": 1, "moe_capacity_factor": 1e308}', "`moe_capacity_factor`=1e+308"),
    ('{"attention_type": "focused", "focusing_factor": 100}', "`focusing_factor`=100 must be a finite number"),
    ('{"attention_type": ["sdpa"]}', "Unknown `attention_type`=['sdpa']; allowed values: sdpa"),
    ('{"layer_mlp_dims": ["a", "b"], "num_layers": 2}', "`layer_mlp_dims` must list one positive integer"),
]


@pytest.mark.parametrize(("config", "message"), CLI_CONFIGS, ids=[c[0][:50] for c in CLI_CONFIGS])
def test_the_training_command_refuses_bad_model_config_values_without_a_traceback(tmp_path, capsys, config, message):
    argv = ["--output-dir", str(tmp_path / "run"), "--model", "DiT-XS/4", "--model-config", config]
    argv += ["--image-size", "8", "--batch-size", "8", "--max-samples", "8", "--steps", "1"]
    assert train_cli("base", argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


ESTIMATED = [
    {},
    {"layer_heads": [2, 4], "layer_mlp_dims": [16, 200]},
    {"moe_num_experts": 4, "moe_top_k": 2, "moe_num_shared_experts": 2, "moe_expert_dim": 48},
    {"moe_num_experts": 3, "moe_top_k": 1, "moe_layers": [1]},
    {"attention_type": "focused", "dwconv_kernel_size": 7},
    {"attention_type": "mediated", "activation_fn": "geglu", "mlp_ratio": 8.0},
    {"num_embeds_ada_norm": 5000, "sample_size": 32},
]


@pytest.mark.parametrize("overrides", ESTIMATED, ids=[str(c)[:50] for c in ESTIMATED])
def test_the_estimate_bounds_the_real_size_of_the_weights_from_above_and_closely(overrides):
    model = DiTOptimumTransformer2DModel(**tiny_config(**overrides))
    tensors = list(model.parameters()) + list(model.buffers())
    actual = sum(t.numel() * t.element_size() for t in tensors)
    estimate = estimated_parameter_bytes(model.config)
    assert actual <= estimate <= 1.1 * actual


# --- 3. every config key: its type, finite and bounded ---------------------------------------------------------

BAD_VALUES = [
    ({"moe_num_experts": 2, "moe_top_k": 1, "moe_capacity_factor": 1e308}, r"`moe_capacity_factor`=1e\+308.*\(0, 64\]"),
    ({"moe_capacity_factor": float("nan")}, r"`moe_capacity_factor`=nan must be a finite number in \(0, 64\]"),
    ({"attention_type": ["sdpa"]}, r"Unknown `attention_type`=\['sdpa'\]; allowed values: sdpa, gqa, mqa"),
    ({"attention_type": {"sdpa": 1}}, r"`attention_type`=\{'sdpa': 1\}; allowed values: sdpa"),
    ({"attention_type": None}, r"`attention_type`=None; allowed values: sdpa"),
    ({"activation_fn": ["gelu"]}, r"`activation_fn`=\['gelu'\]; allowed values: gelu, gelu-approximate"),
    ({"norm_type": {}}, r"`norm_type`=\{\}; allowed values: ada_norm_zero"),
    ({"focused_variant": []}, r"`focused_variant`=\[\]; allowed values: published, paper"),
    ({"mlp_ratio": 10**400}, r"`mlp_ratio`=<a \d+-bit integer> must be a finite number in \(0, 256\]"),
    ({"mlp_ratio": 1e6}, r"`mlp_ratio`=1000000.0 must be a finite number in \(0, 256\]"),
    ({"mlp_ratio": "4"}, r"`mlp_ratio`='4' must be a finite number"),
    ({"mlp_ratio": True}, r"`mlp_ratio`=True must be a finite number"),
    ({"num_layers": 10**400}, r"`num_layers`=<a \d+-bit integer> must be a positive integer <= 2147483647"),
    ({"num_layers": True}, r"`num_layers`=True must be a positive integer"),
    ({"num_layers": [2]}, r"`num_layers`=\[2\] must be a positive integer"),
    ({"num_layers": {"a": 1}}, r"`num_layers`=\{'a': 1\} must be a positive integer"),
    ({"num_attention_heads": float("nan")}, r"`num_attention_heads`=nan must be a positive integer"),
    ({"sample_size": 2**40}, r"`sample_size`=1099511627776 must be a positive integer <= 2147483647"),
    ({"moe_top_k": 2.0}, r"`moe_top_k`=2.0 must be a positive integer"),
    ({"moe_num_shared_experts": 10**12}, r"`moe_num_shared_experts`=1000000000000 must be an integer >= 0"),
    ({"moe_num_experts": -1}, r"`moe_num_experts`=-1 must be an integer >= 0"),
    ({"out_channels": float("nan")}, r"`out_channels`=nan must be a positive integer <= 2147483647 or None"),
    ({"dwconv_kernel_size": 10**400}, r"`dwconv_kernel_size`=<a \d+-bit integer> must be a positive integer"),
    ({"norm_num_groups": "x"}, r"`norm_num_groups`='x' must be a positive integer"),
    ({"norm_eps": 1e-320}, r"`norm_eps`=1e-320 must be a finite number in \[1e-12, 1\]"),
    ({"norm_eps": 1e308}, r"`norm_eps`=1e\+308 must be a finite number in \[1e-12, 1\]"),
    ({"dropout": float("nan")}, r"`dropout`=nan must be a finite number in \[0, 1\)"),
    ({"class_dropout_prob": "0.1"}, r"`class_dropout_prob`='0.1' must be a finite number in \[0, 1\)"),
    ({"moe_balance_loss_weight": 1e308}, r"`moe_balance_loss_weight`=1e\+308 must be a finite number in \[0, 100\]"),
    ({"moe_router_z_loss_weight": -1}, r"`moe_router_z_loss_weight`=-1 must be a finite number in \[0, 100\]"),
    ({"attention_bias": 1}, r"`attention_bias`=1 must be true or false"),
    ({"layer_heads": [10**400, 4]}, r"`layer_heads` must list one positive integer .* got \[<a \d+-bit integer>, 4\]"),
    ({"layer_mlp_dims": [True, 4]}, r"`layer_mlp_dims` must list one positive integer .* got \[True, 4\]"),
    ({"layer_mlp_dims": [2**31, 4]}, r"`layer_mlp_dims` must list one positive integer \(at most 2147483647\)"),
    ({"moe_layers": "01"}, r"`moe_layers`='01' is invalid; allowed values: None or a list of block indices in 0\.\.1"),
    ({"moe_layers": [99]}, r"`moe_layers`=\[99\] is invalid; allowed values: None or a list of block indices"),
    ({"moe_num_experts": 16, "moe_top_k": 16, "mlp_ratio": 0.25}, r"expert width .* is 0: set `moe_expert_dim`"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[str(c[0])[:50] for c in BAD_VALUES])
def test_a_config_value_of_the_wrong_type_or_out_of_range_is_refused_naming_the_key(overrides, message):
    with pytest.raises(DiTOptimumError, match=message):
        DiTOptimumTransformer2DModel(**tiny_config(**overrides))


FILE_VALUES = [
    ({"moe_num_experts": "2", "moe_top_k": "1", "moe_capacity_factor": "1e308"}, r"`moe_capacity_factor`=1e\+308"),
    ({"attention_type": '["sdpa"]'}, r"Unknown `attention_type`=\['sdpa'\]; allowed values: sdpa"),
    ({"mlp_ratio": "1" + "0" * 400}, r"`mlp_ratio`=<a \d+-bit integer> must be a finite number in \(0, 256\]"),
    ({"num_layers": "1" + "0" * 400}, r"`num_layers`=<a \d+-bit integer> must be a positive integer"),
    ({"norm_eps": "NaN"}, r"config\.json' is not a valid JSON file .*NaN is not a JSON number"),
    ({"focusing_factor": "100"}, r"`focusing_factor`=100 must be a finite number in \[1, 10\]"),
    ({"norm_num_groups": '"x"'}, r"`norm_num_groups`='x' must be a positive integer"),
]


@pytest.mark.parametrize(("raw", "message"), FILE_VALUES, ids=[str(c[0])[:50] for c in FILE_VALUES])
def test_the_same_values_in_a_config_json_are_refused_at_load(tmp_path, raw, message):
    with pytest.raises(DiTOptimumError, match=message):
        DiTOptimumTransformer2DModel.from_pretrained(edited_folder(tmp_path, raw))


def test_valid_values_at_the_bounds_build_a_finite_model():
    for overrides in (
        {"norm_eps": 1e-12},
        {"norm_eps": 1},
        {"mlp_ratio": 256},
        {"moe_num_experts": 2, "moe_top_k": 1, "moe_capacity_factor": 64, "moe_balance_loss_weight": 100},
        {"attention_type": "focused", "focusing_factor": 10},
        {"attention_type": "focused_gqa", "focusing_factor": 1, "focused_variant": "paper"},
    ):
        model = tiny_model(**overrides)
        with torch.no_grad():
            assert torch.isfinite(model(*model_inputs(model)).sample).all(), overrides


def test_a_huge_capacity_factor_routes_like_the_smallest_one_that_drops_nothing():
    torch.manual_seed(0)
    kwargs = {"dim": 16, "num_experts": 4, "expert_dim": 8, "top_k": 2}
    exact, huge = MoEFeedForward(capacity_factor=2.0, **kwargs), MoEFeedForward(capacity_factor=1e300, **kwargs)
    huge.load_state_dict(exact.state_dict())
    tokens = torch.randn(2, 10, 16)
    assert exact.capacity(20) == huge.capacity(20) == 20  # never more slots than tokens
    torch.testing.assert_close(huge(tokens), exact(tokens), rtol=0, atol=0)
    assert MoEFeedForward(capacity_factor=0.5, **kwargs).capacity(20) == 5


# --- 4. the focusing factor ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [10.5, 30, 100, 1000, 1e308, 0.5, float("nan"), 10**400, "3", True])
def test_a_focusing_factor_outside_1_to_10_is_refused_naming_the_key(value):
    with pytest.raises(DiTOptimumError, match=r"`focusing_factor`=.* must be a finite number in \[1, 10\]"):
        DiTOptimumTransformer2DModel(**tiny_config(attention_type="focused", focusing_factor=value))


@pytest.mark.parametrize("variant", ["published", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_focused_attention_at_the_largest_factor_stays_finite_for_extreme_features(variant, dtype):
    model = tiny_model(attention_type="focused", focusing_factor=10, focused_variant=variant).to(dtype)
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        for scale in (1e-3, 1.0, 1e3):  # features far below and far above 1: x**10 would leave float32
            output = model((sample * scale).to(dtype), timestep, labels).sample
            assert torch.isfinite(output).all(), (variant, dtype, scale)


def test_focus_equals_flattens_formula_and_survives_powers_that_break_it():
    features = torch.rand(3, 5, 16) * 4 + 1e-6
    for dims in ((-1,), (1, 2)):
        naive = features**3 / (features**3).norm(dim=dims, keepdim=True) * features.norm(dim=dims, keepdim=True)
        torch.testing.assert_close(focus(features, 3.0, dims), naive, rtol=1e-5, atol=1e-6)
    tiny = torch.full((2, 4, 32), 1e-6)  # a token whose features are all ReLU zeros (+ eps)
    assert not torch.isfinite(tiny**10 / (tiny**10).norm(dim=-1, keepdim=True)).all()  # the formula's 0/0
    assert torch.isfinite(focus(tiny, 10.0)).all() and torch.isfinite(focus(features * 1e4, 10.0)).all()
    grad_features = features.clone().requires_grad_()
    focus(grad_features, 3.0).sum().backward()
    assert torch.isfinite(grad_features.grad).all()


def test_a_loss_not_finite_at_the_first_step_blames_the_config_not_the_learning_rate(tmp_path, capsys, monkeypatch):
    original = GaussianDiffusion.losses

    def not_finite(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianDiffusion, "losses", not_finite)
    argv = ["--output-dir", str(tmp_path / "run"), "--model", "DiT-XS/4", "--model-config", '{"num_layers": 2}']
    argv += ["--image-size", "8", "--batch-size", "8", "--max-samples", "8", "--steps", "2", "--log-every", "1"]
    assert train_cli("base", argv) == 2
    error = capsys.readouterr().err
    assert "loss is not finite" in error and "at step 1" in error
    assert "the learning rate is not the cause" in error and "the model config (--model-config" in error
    assert "try 10x lower" not in error


# --- 2. weights of a non-floating-point dtype ------------------------------------------------------------------

NON_FLOAT = {
    "bool": lambda t: t > 0,
    "int64": lambda t: (t * 100).long(),
    "int8": lambda t: (t * 100).to(torch.int8),
    "uint8": lambda t: (t.abs() * 100).to(torch.uint8),
    "complex64": lambda t: t.to(torch.complex64),
}


@pytest.mark.parametrize("dtype", list(NON_FLOAT))
def test_a_weight_stored_as_integer_bool_or_complex_is_refused_naming_file_and_tensor(tmp_path, dtype):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state["proj_out_2.weight"] = NON_FLOAT[dtype](state["proj_out_2.weight"])
    save_file(state, tmp_path / WEIGHTS)
    message = rf"{WEIGHTS}' hold tensor 'proj_out_2\.weight' as {dtype}, where the model has a floating-point weight"
    with pytest.raises(DiTOptimumError, match=message):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path)


def test_a_stock_checkpoint_with_an_integer_embedder_copy_is_refused(tmp_path):
    stock_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    state[name] = state[name].long()
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(DiTOptimumError, match=rf"hold tensor '{re.escape(name)}' as int64"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path)


def test_float_weights_of_other_precisions_still_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state["proj_out_2.weight"] = state["proj_out_2.weight"].double()
    state["proj_out_1.weight"] = state["proj_out_1.weight"].half()
    save_file(state, tmp_path / WEIGHTS)
    loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.proj_out_2.weight, model.proj_out_2.weight)


# --- 5. a cast to float16 that overflows is not a damaged file -------------------------------------------------


def test_finite_weights_that_overflow_float16_name_the_cast_not_a_damaged_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state["proj_out_2.weight"] = state["proj_out_2.weight"] * 1e30
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(DiTOptimumError) as caught:
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    message = str(caught.value)
    assert re.search(r"are finite, but tensor 'proj_out_2\.weight' holds values up to [\d.]+e\+29", message)
    assert "beyond the range of float16" in message and "torch.float32 or torch.bfloat16" in message
    assert "diverged" not in message and "damaged" not in message
    for dtype in (torch.float32, torch.bfloat16):  # the advice works
        loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path, torch_dtype=dtype)
        assert torch.isfinite(loaded.proj_out_2.weight).all()


def test_weights_not_finite_in_the_file_are_still_called_damaged_with_a_torch_dtype(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state["proj_out_2.weight"][0, 0] = math.inf
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(DiTOptimumError, match=r"not finite: tensor 'proj_out_2\.weight'.*damaged file"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.float16)


def test_loading_options_and_preset_helpers_refuse_what_they_would_ignore(tmp_path):
    from dataclasses import replace

    from dit_optimum.benchmark import BenchmarkSettings
    from dit_optimum.configs import dit_config
    from dit_optimum.errors import MissingPathError

    tiny_model().save_pretrained(tmp_path / "m")
    with pytest.raises(DiTOptimumError, match=r"`torch_dtype`='bfloat16' must be a torch\.dtype"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "m", torch_dtype="bfloat16")
    with pytest.raises(MissingPathError, match=r"`subfolder`='nonexistent' does not exist"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "m", subfolder="nonexistent")
    with pytest.raises(DiTOptimumError, match=r"`learn_sigma`='no' must be True or False"):
        dit_config("DiT-S/2", learn_sigma="no")
    with pytest.raises(DiTOptimumError, match="Unknown DiT preset"):
        dit_config("DiT-S/\u0662")  # an Arabic-Indic digit is no patch size
    settings = BenchmarkSettings(output_dir=str(tmp_path / "b"))
    for name, value in (("variants", "DiT-S/2"), ("techniques", "baseline")):
        with pytest.raises(DiTOptimumError, match=rf"`{name}`='.*' must be a tuple of names"):
            replace(settings, **{name: value}).validate()


def test_quantizing_a_fused_model_names_quantizing():
    from dit_optimum import quantize

    model = tiny_model()
    model.fuse_qkv_projections()
    with pytest.raises(DiTOptimumError, match="Quantizing a model with fused QKV projections"):
        quantize(model, backend="torch", dtype="bfloat16")
