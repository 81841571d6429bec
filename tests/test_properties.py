"""Property-based checks: any model config, pipeline call or command line either works or raises the package's own
error naming a parameter; never a raw exception from deep inside, never NaN outputs from an accepted config."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config, tiny_model
from dit_optimum import ATTENTION_TYPES, DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel
from dit_optimum.cli import main as cli

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
# Values a user might type for any field: valid small ones and every kind of wrong one.
ODD_VALUES = st.one_of(
    st.integers(-3, 0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 3), max_size=3),
)


def small_or_odd(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, valid, ODD_VALUES)


MODEL_CONFIGS = st.fixed_dictionaries(
    {
        "num_attention_heads": small_or_odd(st.integers(1, 4)),
        "attention_head_dim": small_or_odd(st.integers(1, 8)),
        "num_layers": small_or_odd(st.integers(1, 2)),
        "sample_size": small_or_odd(st.integers(1, 8)),
        "patch_size": small_or_odd(st.integers(1, 4)),
        "in_channels": small_or_odd(st.integers(1, 3)),
        "num_embeds_ada_norm": small_or_odd(st.integers(1, 5)),
        "attention_type": small_or_odd(st.sampled_from(ATTENTION_TYPES)),
    },
    optional={
        "num_kv_heads": small_or_odd(st.integers(1, 4)),
        "attention_compression": small_or_odd(st.integers(1, 4)),
        "num_mediators": small_or_odd(st.sampled_from([1, 4, 9])),
        "focusing_factor": small_or_odd(st.floats(1, 5)),
        "dwconv_kernel_size": small_or_odd(st.sampled_from([1, 3, 5])),
        "mlp_ratio": small_or_odd(st.floats(0.25, 4)),
        "activation_fn": small_or_odd(st.sampled_from(["gelu", "gelu-approximate", "geglu"])),
        "dropout": small_or_odd(st.floats(0, 0.5)),
        "class_dropout_prob": small_or_odd(st.floats(0, 0.5)),
        "norm_eps": small_or_odd(st.floats(1e-6, 1e-3)),
        "moe_num_experts": small_or_odd(st.integers(0, 4)),
        "moe_top_k": small_or_odd(st.integers(1, 3)),
        "moe_capacity_factor": small_or_odd(st.floats(0.5, 2)),
        "layer_heads": small_or_odd(st.lists(st.integers(1, 4), min_size=1, max_size=2)),
    },
)


@PROPERTY_SETTINGS
@given(config=MODEL_CONFIGS)
def test_any_model_config_builds_a_finite_model_or_is_refused(config):
    try:
        model = DiTOptimumTransformer2DModel(**config).eval()
    except DiTOptimumError as error:
        assert "`" in str(error) or "GiB" in str(error)  # the message names a parameter
        return
    side = config["sample_size"]
    sample = torch.randn(2, config["in_channels"], side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(sample, torch.tensor([0, 999]), torch.tensor([0, config["num_embeds_ada_norm"] - 1])).sample
    assert output.shape[-2:] == (side, side) and torch.isfinite(output).all()


@pytest.fixture(scope="module")
def pipeline():
    pipe = DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler(), id2label={0: "zero", 1: "one"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


CLASS_LABELS = st.one_of(
    st.integers(-2, 12),
    st.lists(st.one_of(st.integers(-1, 11), st.sampled_from(["zero", "one", "two", ""])), max_size=3),
    st.lists(st.integers(0, 9), min_size=1, max_size=2).map(np.array),
    st.lists(st.integers(-1, 10), min_size=1, max_size=2).map(torch.tensor),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.floats(0, 9), min_size=1, max_size=2),
)


@PROPERTY_SETTINGS
@given(
    class_labels=CLASS_LABELS,
    guidance_scale=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 5), st.text(max_size=2)),
    num_inference_steps=st.one_of(st.integers(-1, 3), st.integers(1001, 10**9), st.floats(0, 3), st.text(max_size=2)),
    output_type=st.sampled_from(["pil", "np", "pt", "latent", "jpeg", "", "NP"]),
)
def test_any_pipeline_call_works_or_names_the_bad_argument(
    pipeline, class_labels, guidance_scale, num_inference_steps, output_type
):
    try:
        images = pipeline(
            class_labels,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            output_type=output_type,
        ).images
    except DiTOptimumError as error:
        assert re.search(r"`(class_labels|guidance_scale|num_inference_steps|output_type)`", str(error)), error
        return
    if output_type in ("np", "pt", "latent"):
        assert np.isfinite(np.asarray(images)).all()


# Per command: option -> strategy of the text a user may type for it (valid and invalid).
NUMBER_TEXT = st.one_of(
    st.integers(-5, 12).map(str), st.sampled_from(["0", "1.5", "nan", "inf", "-1e9", "abc", "", "1e12"])
)
FRACTION_TEXT = st.one_of(st.floats(-1, 2).map(lambda v: f"{v:.2f}"), st.sampled_from(["nan", "inf", "x"]))


def command_lines(command: str, positional: list[str], options: dict[str, st.SearchStrategy]):
    chosen = st.dictionaries(st.sampled_from(sorted(options)), st.just(None), max_size=4)

    @st.composite
    def build(draw):
        argv = [command, *positional]
        for option in draw(chosen):
            argv += [option, draw(options[option])]
        return argv

    return build()


def run_cli(argv: list[str]) -> int:
    try:
        return cli(argv)
    except SystemExit as exit_:  # argparse's own usage errors exit with 2 and a message
        return exit_.code


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "pipe"
    DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_quantize_or_prune_command_line_ends_cleanly(saved_pipeline, tmp_path, data):
    quantize = command_lines(
        "quantize",
        [str(saved_pipeline), str(tmp_path / "q")],
        {
            "--backend": st.sampled_from(["torch", "torchao", "quanto", "tensorrt", ""]),
            "--weights": st.sampled_from(["int8", "int4", "float8", "bf16", "fp16", "int3"]),
            "--activations": st.sampled_from(["int8", "float8", "none", "int4"]),
            "--keep-float": st.sampled_from(["pos_embed", "proj_out", ",", "transformer_blocks.0"]),
            "--calibration-batches": NUMBER_TEXT,
            "--calibration-steps": NUMBER_TEXT,
        },
    )
    prune = command_lines(
        "prune",
        [str(saved_pipeline), str(tmp_path / "p")],
        {
            "--heads": FRACTION_TEXT,
            "--mlp": FRACTION_TEXT,
            "--depth": FRACTION_TEXT,
            "--importance": st.sampled_from(["l1", "l2", "taylor", "random", "l3"]),
            "--scope": st.sampled_from(["layer", "global", "local"]),
        },
    )
    argv = data.draw(st.one_of(quantize, prune))
    assert run_cli(argv) in (0, 2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_benchmark_or_architecture_command_line_is_checked_before_work(tmp_path, monkeypatch, data):
    import dit_optimum.benchmark as benchmark_package
    import dit_optimum.benchmark.architecture as architecture_module

    class Started(Exception):
        pass

    def refuse_to_work(*args, **kwargs):
        raise Started

    # Only the checks run: reaching the work means the arguments were accepted.
    monkeypatch.setattr(benchmark_package, "run_benchmark", refuse_to_work)
    monkeypatch.setattr(architecture_module, "_architecture_rows", refuse_to_work)
    benchmark = command_lines(
        "benchmark",
        ["--output-dir", str(tmp_path / "b")],
        {
            "--techniques": st.sampled_from(["baseline", ",", "baseline,int8", "nope", "bf16,,int8"]),
            "--variants": st.sampled_from(["DiT-XS/4", "DiT-M/2", ",", "XS/8", "DiT-XS/3"]),
            "--image-size": NUMBER_TEXT,
            "--channels": NUMBER_TEXT,
            "--train-steps": NUMBER_TEXT,
            "--train-batch-size": NUMBER_TEXT,
            "--learning-rate": NUMBER_TEXT,
            "--num-samples": NUMBER_TEXT,
            "--reference-samples": NUMBER_TEXT,
            "--steps": NUMBER_TEXT,
            "--guidance-scale": NUMBER_TEXT,
            "--batch-size": NUMBER_TEXT,
            "--speed-batch-size": NUMBER_TEXT,
            "--metrics": st.sampled_from(["kid", "fid,kid", ",", "is"]),
            "--preset": st.sampled_from(["default", "paper", "huge"]),
        },
    )
    architecture = command_lines(
        "architecture",
        ["--output-dir", str(tmp_path / "a")],
        {
            "--presets": st.sampled_from(["DiT-XS/8", "DiT-Q/2", ","]),
            "--attention-types": st.sampled_from(["sdpa,mqa", "flash", ","]),
            "--sample-sizes": st.sampled_from(["16", "0", "-8", "4096", "15", "a", ","]),
            "--batch-size": NUMBER_TEXT,
            "--repeats": NUMBER_TEXT,
        },
    )
    argv = data.draw(st.one_of(benchmark, architecture))
    try:
        code = run_cli(argv)
    except Started:
        return
    assert code == 2


def test_numbers_that_are_not_finite_never_reach_a_model():
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(DiTOptimumError, match="mlp_ratio"):
            DiTOptimumTransformer2DModel(**tiny_config(mlp_ratio=value))
