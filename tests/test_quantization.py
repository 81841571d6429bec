"""quantize(): every backend/dtype this CPU supports, error bounds, round trips and refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from conftest import model_inputs, tiny_model
from dit_optimum import DiTOptimumPipeline, DiTOptimumTransformer2DModel
from dit_optimum.evaluation.fidelity import compare_pipelines, output_difference
from dit_optimum.evaluation.size import saved_size_bytes
from dit_optimum.techniques import CalibrationSettings, quantize

# (backend, weights, activations) -> bound on the relative L2 error of one forward vs float (tiny random model)
CPU_OPTIONS = {
    ("torch", "bf16", None): 0.05,
    ("torch", "fp16", None): 0.01,
    ("torchao", "int8", None): 0.05,
    ("torchao", "int8", "int8"): 0.08,
    ("quanto", "int8", None): 0.05,
    ("quanto", "float8", None): 0.15,
    ("quanto", "int4", None): 0.4,
    ("quanto", "int8", "int8"): 0.4,
    ("quanto", "float8", "float8"): 0.4,
}
SERIALIZABLE = [key for key in CPU_OPTIONS if not (key[0] == "quanto" and key[2] is not None)]
FAST_CALIBRATION = CalibrationSettings(num_batches=2, batch_size=2, num_inference_steps=4)


def relative_error(model, quantized) -> float:
    inputs = model_inputs(model)
    cast = tuple(t.to(quantized.dtype) if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        reference, output = model(*inputs).sample, quantized(*cast).sample.float()
    return ((output - reference).norm() / reference.norm()).item()


def make_pipeline() -> DiTOptimumPipeline:
    pipe = DiTOptimumPipeline(transformer=tiny_model(sample_size=16), scheduler=DDIMScheduler(), id2label={1: "one"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe([0, 1], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt", **kwargs).images


@pytest.mark.parametrize(("backend", "weights", "activations"), list(CPU_OPTIONS), ids=lambda v: str(v))
def test_forward_error_against_float_is_bounded(backend, weights, activations):
    model = tiny_model(sample_size=16)
    calibration = FAST_CALIBRATION if backend == "quanto" and activations else None
    quantized = quantize(model, backend=backend, weights=weights, activations=activations, calibration=calibration)
    error = relative_error(model, quantized)
    assert 0 < error < CPU_OPTIONS[(backend, weights, activations)]
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the input model must stay untouched"


@pytest.mark.parametrize(("backend", "weights", "activations"), SERIALIZABLE, ids=lambda v: str(v))
def test_saved_quantized_pipeline_reloads_with_plain_diffusers(tmp_path, backend, weights, activations):
    quantized = quantize(make_pipeline(), backend=backend, weights=weights, activations=activations)
    before = images(quantized)
    quantized.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin"))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(weights)
    if half is None:
        reloaded = DiffusionPipeline.from_pretrained(tmp_path)
        assert torch.equal(images(reloaded), before)
    else:
        # diffusers loads float32 unless asked: the weights are the saved half values; with torch_dtype, bit-identical
        plain = DiffusionPipeline.from_pretrained(tmp_path)
        assert plain.transformer.dtype == torch.float32
        saved = quantized.transformer.state_dict()
        assert all(torch.equal(t.float(), saved[k].float()) for k, t in plain.transformer.state_dict().items())
        assert torch.equal(images(DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=half)), before)
    assert reloaded_labels(tmp_path) == {"one": 1}


def reloaded_labels(path):
    return DiTOptimumPipeline.from_pretrained(path).labels


def test_static_activation_quantization_refuses_to_save_and_writes_nothing(tmp_path):
    quantized = quantize(
        make_pipeline(), backend="quanto", weights="int8", activations="int8", calibration=FAST_CALIBRATION
    )
    with pytest.raises(ValueError, match=r"cannot be saved.*backend='torchao'"):
        quantized.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_calibration_changes_the_static_scales():
    model = tiny_model(sample_size=16)
    few = quantize(model, backend="quanto", weights="int8", activations="int8", calibration=FAST_CALIBRATION)
    other = CalibrationSettings(num_batches=2, batch_size=2, num_inference_steps=4, seed=1)
    more = quantize(model, backend="quanto", weights="int8", activations="int8", calibration=other)
    scales = [m.input_scale for m in few.modules() if hasattr(m, "input_scale")]
    other_scales = [m.input_scale for m in more.modules() if hasattr(m, "input_scale")]
    assert scales and any(not torch.equal(a, b) for a, b in zip(scales, other_scales))


def test_kept_modules_stay_in_float_and_quantized_weights_shrink():
    from optimum.quanto import QLinear

    model = tiny_model(sample_size=16)
    quanto = quantize(model, backend="quanto", weights="int8")
    assert not isinstance(quanto.proj_out_1, QLinear) and not isinstance(
        quanto.conditioning_embedding.timestep_embedder.linear_1, QLinear
    )
    assert isinstance(quanto.transformer_blocks[0].attn1.to_q, QLinear) and isinstance(
        quanto.transformer_blocks[0].norm1.linear, QLinear
    )
    torchao = quantize(model, backend="torchao", weights="int8")
    assert type(torchao.proj_out_2.weight.data) is torch.Tensor
    assert type(torchao.transformer_blocks[1].ff.net[2].weight.data) is not torch.Tensor
    assert saved_size_bytes(torchao) < 0.5 * saved_size_bytes(model)
    # a static model cannot be saved as a diffusers folder; it is measured in quanto's own format, about the size of
    # the saveable weight-only model (the same int8 weights plus activation scales)
    static = quantize(model, backend="quanto", weights="int8", activations="int8", calibration=FAST_CALIBRATION)
    weight_only = saved_size_bytes(quanto)
    assert weight_only <= saved_size_bytes(static) < 1.1 * weight_only


BAD_OPTIONS = [
    ({"backend": "onnx"}, r"`backend`='onnx'.*torch, torchao, quanto"),
    ({"weights": "int3"}, r"`weights`='int3'.*int8, int4, float8, bf16, fp16"),
    ({"activations": "int4"}, "activations"),
    ({"backend": "torch", "weights": "int8"}, r"Unsupported combination.*supported: "),
    ({"backend": "torchao", "weights": "int4"}, r"needs a CUDA GPU.*backend='quanto'"),
    ({"backend": "torchao", "weights": "float8"}, r"needs a CUDA GPU of compute capability 8\.9"),
    ({"backend": "torchao", "calibration": CalibrationSettings()}, "calibration"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=lambda v: str(v))
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        quantize(tiny_model(), **options)


def test_quantizing_twice_or_a_foreign_object_is_refused():
    quantized = quantize(tiny_model(), backend="quanto", weights="int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantized)
    with pytest.raises(ValueError, match="DiTOptimumPipeline or DiTOptimumTransformer2DModel"):
        quantize(torch.nn.Linear(2, 2))


def test_output_difference_has_known_values():
    reference = torch.zeros(2, 3, 4, 4)
    shifted = reference + 0.1
    assert output_difference(reference, shifted)["psnr_db"] == pytest.approx(20.0)
    ones = torch.ones(1, 3, 2, 2)
    assert output_difference(ones, ones * 1.5)["relative_error"] == pytest.approx(0.5)
    assert output_difference(ones, ones)["psnr_db"] == float("inf")
    with pytest.raises(ValueError, match="Shapes differ"):
        output_difference(ones, reference)


def test_compare_pipelines_reports_quantization_error():
    pipe = make_pipeline()
    assert compare_pipelines(pipe, pipe, num_inference_steps=2)["relative_error"] == 0
    quantized = quantize(pipe, backend="quanto", weights="int8")
    difference = compare_pipelines(pipe, quantized, num_inference_steps=2)
    assert 0 < difference["relative_error"] < 0.5 and difference["psnr_db"] > 10


def test_dtype_of_the_float_layers_is_selectable(tmp_path):
    model = tiny_model(sample_size=16)
    fp32 = quantize(model, backend="torchao", weights="int8", activations="int8", dtype=torch.float32)
    assert fp32.proj_out_1.weight.dtype == torch.float32
    assert quantize(model, backend="torchao", weights="int8").proj_out_1.weight.dtype == torch.bfloat16
    assert relative_error(model, fp32) < CPU_OPTIONS[("torchao", "int8", "int8")]
    fp32.save_pretrained(tmp_path)
    again = DiTOptimumTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    inputs = model_inputs(model)
    with torch.no_grad():
        assert torch.equal(again(*inputs).sample, fp32(*inputs).sample)
    with pytest.raises(ValueError, match="dtype"):
        quantize(model, backend="torch", weights="bf16", dtype=torch.float32)


def test_compiled_quantized_model_matches_eager():
    """``quantize(..., compile=True)``: whole-model inductor compile with weight freezing; it rounds differently from
    eager bf16, so both are held to the fp32 model: the compiled one is no further from it than eager bf16 is."""
    model = tiny_model()
    eager = quantize(model, backend="torch", weights="bf16")
    compiled = quantize(model, backend="torch", weights="bf16", compile=True)
    sample, timestep, labels = model_inputs(model)
    with torch.no_grad():
        reference = model(sample, timestep, labels).sample
        errors = [
            ((pipe(sample.bfloat16(), timestep, labels).sample.float() - reference).norm() / reference.norm()).item()
            for pipe in (eager, compiled)
        ]
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    assert errors[0] < 0.05 and errors[1] < 1.5 * errors[0]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"amx_bf16": True, "avx512_vnni": True}, {"backend": "torch", "weights": "bf16", "compile": True}),
        ({"avx512_vnni": True}, {"backend": "torchao", "activations": "int8", "compile": True}),
        ({}, {"backend": "torchao", "weights": "int8"}),
    ],
)
def test_recommended_quantization_follows_the_cpu(monkeypatch, flags, expected):
    from dit_optimum.evaluation import hardware
    from dit_optimum.techniques import recommended_quantization

    monkeypatch.setattr(
        hardware, "cpu_features", lambda: {flag: flags.get(flag, False) for flag in hardware.MATMUL_FLAGS}
    )
    options = recommended_quantization()
    assert {key: options.get(key) for key in expected} == expected
    model = tiny_model()
    quantized = quantize(model, **{**options, "compile": False})  # a valid, saveable combination
    assert quantized is not model
