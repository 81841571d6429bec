"""Exported CPU runtimes (OpenVINO, ONNX Runtime): numbers against torch, save/load round trips without re-export,
damaged or stale graphs, what composes with a runtime, and the measured choice of the fastest forward path."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch

from conftest import model_inputs, tiny_model, tiny_pixel_pipeline
from dit_optimum import DiTOptimumPipeline, DiTOptimumTransformer2DModel
from dit_optimum.errors import DiTOptimumError
from dit_optimum.evaluation.flops import count_gflops
from dit_optimum.evaluation.size import saved_size_bytes
from dit_optimum.models import runtimes as runtime_module
from dit_optimum.models.stock import stock_format_problem
from dit_optimum.techniques import quantize
from dit_optimum.techniques.registry import TECHNIQUES, check_stack, register_technique, stacked
from dit_optimum.techniques.runtimes import FORWARD_PATHS, apply_path, fastest_path, with_runtime
from dit_optimum.utils import public_config

# (backend, precision, relative error bound against torch fp32 on the tiny model)
# (torch's own bf16 cast of the same model: 0.0065)
CASES = [
    ("openvino", "f32", 1e-5),
    ("openvino", "bf16", 0.02),
    ("openvino", "int8", 0.03),
    ("onnxruntime", "fp32", 1e-5),
    ("onnxruntime", "int8", 0.03),
]


def tame_model(seed: int = 0):
    """The tiny model with weights a quarter as large: activations in a range where bf16 errors stay small."""
    model = tiny_model(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.25)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def forward(model, inputs):
    with torch.no_grad():
        return model(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample


@pytest.mark.parametrize(("backend", "precision", "bound"), CASES)
def test_a_runtime_matches_torch_and_reloads_without_exporting(tmp_path, monkeypatch, backend, precision, bound):
    model = tame_model()
    inputs = model_inputs(model, batch=3)
    reference = forward(model, inputs)
    model.enable_runtime(backend, precision)
    assert model.config.runtime == {"backend": backend, "precision": precision}
    output = forward(model, inputs)
    assert output.shape == reference.shape and output.dtype == torch.float32
    assert relative_error(output, reference) < bound
    # a scalar timestep is broadcast as torch does; another batch size runs too
    scalar = forward(model, (inputs[0][:2], torch.tensor(500), inputs[2][:2]))
    assert (
        relative_error(scalar, forward_torch(model, (inputs[0][:2], torch.tensor([500, 500]), inputs[2][:2]))) < bound
    )
    # training (gradients on) runs torch, exactly
    assert torch.equal(model(*inputs[:1], timestep=inputs[1], class_labels=inputs[2]).sample, reference)

    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "runtime.json").read_text())
    assert manifest["backend"] == backend and set(manifest["files_sha256"]) == set(
        runtime_module.RUNTIMES[backend].files
    )
    exports = []
    monkeypatch.setattr(runtime_module.ExportedRuntime, "export", lambda *a, **k: exports.append(a))
    loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path)
    again = forward(loaded, inputs)
    assert exports == []  # the saved graph ran: nothing exported again
    if (backend, precision) != ("openvino", "int8"):  # NNCF's int8 path is not bit-repeatable call to call
        assert torch.equal(again, output)
    assert relative_error(again, reference) < bound


def forward_torch(model, inputs):
    with torch.no_grad(), runtime_module.paused(model):
        return model(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample


def test_a_damaged_or_stale_graph_is_exported_again_with_a_warning(tmp_path, caplog):
    model = tiny_model()
    inputs = model_inputs(model)
    model.enable_runtime("openvino", "f32")
    model.save_pretrained(tmp_path)
    reference = forward_torch(model, inputs)

    (tmp_path / "openvino_model.bin").write_bytes(b"\0" * 64)  # damaged weights of the graph
    with caplog.at_level(logging.WARNING):
        loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path)
    assert "openvino_model.bin does not match its digest" in caplog.text
    assert relative_error(forward(loaded, inputs), reference) < 1e-5  # exported again from the weights

    # the graph of other weights (the safetensors replaced by another model's) is not used
    other = tiny_model(seed=3)
    other.enable_runtime("openvino", "f32")
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mixed = DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "other")
    assert "exported from other weights" in caplog.text
    assert relative_error(forward(mixed, inputs), reference) < 1e-5

    for hostile in (b"[1, 2", b'{"format": 1, "backend": "openvino", "precision": "f32", "files_sha256": []}'):
        (tmp_path / "runtime.json").write_bytes(hostile)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path)
        assert "runtime.json" in caplog.text
        assert relative_error(forward(loaded, inputs), reference) < 1e-5


def test_changed_weights_are_exported_again_before_the_next_forward():
    model = tiny_model()
    inputs = model_inputs(model)
    model.enable_runtime("onnxruntime", "fp32")
    before = forward(model, inputs)
    with torch.no_grad():
        model.proj_out_2.bias.add_(1.0)  # an in-place change, as an optimizer step makes
    after = forward(model, inputs)
    assert not torch.allclose(before, after)
    assert relative_error(after, forward_torch(model, inputs)) < 1e-5
    model.load_state_dict(tiny_model(seed=5).state_dict())
    assert relative_error(forward(model, inputs), forward_torch(model, inputs)) < 1e-5
    with pytest.raises(DiTOptimumError, match=r"float32 weights are exported"):
        model.to(torch.bfloat16)
        forward(model, (inputs[0].bfloat16(), *inputs[1:]))


def test_two_threads_share_one_runtime():
    model = tiny_model()
    inputs = model_inputs(model)
    model.enable_runtime("openvino", "f32")
    expected = forward(model, inputs)
    results, errors = [], []

    def call():
        try:
            for _ in range(5):
                results.append(forward(model, inputs))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 10
    assert all(torch.equal(result, expected) for result in results)


def test_what_a_runtime_refuses_names_the_reason(tmp_path):
    with pytest.raises(DiTOptimumError, match=r"`backend`='tensorrt' is not a runtime; allowed values: openvino"):
        tiny_model().enable_runtime("tensorrt", "fp32")
    with pytest.raises(DiTOptimumError, match=r"`precision`='fp16' is not supported by the openvino runtime"):
        tiny_model().enable_runtime("openvino", "fp16")
    cached = tiny_model()
    cached.enable_cache(__import__("diffusers").FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(DiTOptimumError, match=r"a step cache is on"):
        cached.enable_runtime("openvino", "bf16")
    running = tiny_model()
    running.enable_runtime("onnxruntime", "fp32")
    with pytest.raises(DiTOptimumError, match=r"call `disable_runtime\(\)` first"):
        running.enable_cache(__import__("diffusers").FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(DiTOptimumError, match=r"chooses its own precision"):
        quantize(running, backend="torch", weights="bf16")
    with pytest.raises(DiTOptimumError, match=r"float32 weights are exported"):
        tiny_model().to(torch.bfloat16).enable_runtime("openvino", "bf16")
    # diffusers' own format cannot hold the graph: the pipeline keeps the package format, saying why
    pipeline = with_runtime(tiny_pixel_pipeline(), "onnxruntime", "fp32")
    assert "runtime=" in stock_format_problem(pipeline.transformer)
    with pytest.raises(DiTOptimumError, match=r"runtime="):
        pipeline.transformer.save_pretrained(tmp_path / "stock", stock_format=True)
    with pytest.raises(DiTOptimumError, match=r"`runtime`=.* must be null or"):
        DiTOptimumTransformer2DModel.from_config({**public_config(tiny_model().config), "runtime": {"backend": "x"}})
    running.disable_runtime()
    assert running.runtime is None and running.config.runtime is None


def test_a_pipeline_with_a_runtime_samples_saves_and_loads(tmp_path):
    pipeline = tiny_pixel_pipeline()
    pipeline.set_sampling_defaults(num_inference_steps=3)
    generator = torch.Generator().manual_seed(0)
    reference = pipeline(class_labels=[1, 2], generator=generator, output_type="pt").images
    fast = with_runtime(pipeline, "openvino", "f32")
    assert pipeline.transformer.runtime is None  # the input is left unchanged
    images = fast(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(images, reference, atol=1e-4)
    fast.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["dit_optimum", "DiTOptimumTransformer2DModel"]
    assert (tmp_path / "transformer" / "openvino_model.xml").is_file()
    loaded = DiTOptimumPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert (
        loaded.transformer.runtime.describe() == "openvino f32" and loaded.sampling_defaults["num_inference_steps"] == 3
    )
    again = loaded(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(again, images)
    # FLOPs are counted in torch; the size counts the graph saved beside the weights
    assert count_gflops(loaded.transformer) == pytest.approx(count_gflops(pipeline.transformer))
    assert saved_size_bytes(loaded.transformer) > 1.9 * saved_size_bytes(pipeline.transformer)


def test_stacks_that_do_not_compose_are_refused_by_declaration():
    for parts, message in (
        (
            {"base": "baseline", "runtime": {"backend": "openvino", "precision": "bf16"}, "cache": {"method": "pab"}},
            r"openvino runtime does not compose with cache",
        ),
        (
            {"base": "baseline", "runtime": {"backend": "onnxruntime", "precision": "fp32"}, "quantization": {}},
            r"does not compose with quantization",
        ),
        (
            {"base": "baseline", "fastest": {}, "runtime": {"backend": "openvino", "precision": "bf16"}},
            r"openvino runtime does not compose with fastest",
        ),
        ({"base": "baseline", "compile": True}, r"Unknown stack parts \['compile'\]"),
    ):
        with pytest.raises(DiTOptimumError, match=message):
            check_stack(parts)
        with pytest.raises(DiTOptimumError, match=message):
            register_technique("never-registered", stacked, "refused", parts)
    assert "never-registered" not in TECHNIQUES
    for name in ("openvino", "openvino-f32", "openvino-int8", "onnxruntime", "onnxruntime-int8"):
        assert TECHNIQUES[name].options["runtime"] == FORWARD_PATHS[name][1]
    check_stack(TECHNIQUES["prune-depth-50-recover+distill-steps-2+fastest"].options)


def test_the_fastest_path_is_measured_cached_and_applied(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    model = tiny_model()
    choice = fastest_path(model, batch_size=2, candidates=["fp32", "bf16", "openvino-f32"], rounds=2)
    assert set(choice.seconds) == {"fp32", "bf16", "openvino-f32"} and choice.name in choice.seconds
    assert choice.seconds[choice.name] == min(choice.seconds.values()) and not choice.cached
    assert choice.speedups()["fp32"] == 1.0 and "openvino-f32" in choice.summary()
    assert choice.measured["batch_size"] == 2 and choice.measured["machine"]
    again = fastest_path(tiny_model(seed=4), batch_size=2, candidates=["fp32", "bf16", "openvino-f32"], rounds=2)
    assert again.cached and again.seconds == choice.seconds  # the weights do not matter, the machine and shape do
    other_batch = fastest_path(model, batch_size=3, candidates=["fp32", "bf16", "openvino-f32"], rounds=2)
    assert not other_batch.cached
    # a damaged cache entry is measured again, never trusted
    for entry in (tmp_path / "cache" / "forward_paths").iterdir():
        entry.write_text('{"name": "bf16", "seconds": {"fp32": NaN}}')
    assert not fastest_path(model, batch_size=2, candidates=["fp32", "bf16", "openvino-f32"], rounds=2).cached
    for bad, message in (
        ({"candidates": ["tensorrt"]}, r"allowed values: fp32, bf16"),
        ({"candidates": []}, r"non-empty list"),
        ({"batch_size": 0}, r"`batch_size`=0 must be a positive integer"),
    ):
        with pytest.raises(DiTOptimumError, match=message):
            fastest_path(model, **bad)
    applied = apply_path(tiny_pixel_pipeline(), "openvino-int8")
    assert applied.transformer.runtime.describe() == "openvino int8"
    with pytest.raises(DiTOptimumError, match=r"Unknown forward path 'fp8'"):
        apply_path(model, "fp8")


def test_inputs_torch_refuses_are_refused_the_same_way_and_data_edits_are_seen(tmp_path):
    model = tame_model()
    inputs = model_inputs(model)
    model.enable_runtime("onnxruntime", "fp32")
    before = forward(model, inputs)
    next(model.parameters()).data.mul_(0)  # through .data: no version counter moves
    assert relative_error(forward(model, inputs), forward_torch(model, inputs)) < 1e-5
    assert not torch.allclose(forward(model, inputs), before)
    for labels in (torch.tensor([11, 11, 11]), torch.tensor([-1, -1, -1])):
        with pytest.raises(IndexError):  # torch's own error, as without a runtime
            forward(model, (inputs[0], inputs[1], labels))
    with pytest.raises((RuntimeError, IndexError)):
        forward(model, (inputs[0], inputs[1], torch.tensor([1.7, 2.2, 3.9])))
    with pytest.raises(RuntimeError, match=r"Double|double"):
        forward(model, (inputs[0].double(), inputs[1], inputs[2]))
    # the graph written by a save matches the weights, whatever edited them
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "runtime.json").read_text())
    assert manifest["weights_sha256"] == runtime_module.weights_digest(model)


def test_hostile_manifests_and_loads_that_cannot_run_the_graph(tmp_path, caplog):
    model = tame_model()
    model.enable_runtime("onnxruntime", "fp32")
    model.save_pretrained(tmp_path)
    (tmp_path / "runtime.json").write_text("[" * 30000 + "]" * 30000)
    with caplog.at_level(logging.WARNING):
        loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path)
    assert "runtime.json is not valid JSON (nested too deeply)" in caplog.text
    inputs = model_inputs(model)
    assert relative_error(forward(loaded, inputs), forward_torch(model, inputs)) < 1e-5
    with pytest.raises(DiTOptimumError, match=r"without `torch_dtype`=torch.bfloat16.*`runtime=None`"):
        DiTOptimumTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    in_torch = DiTOptimumTransformer2DModel.from_pretrained(tmp_path, runtime=None, torch_dtype=torch.bfloat16)
    assert in_torch.runtime is None and in_torch.dtype == torch.bfloat16


def test_openvino_keeps_a_bounded_number_of_compiled_batch_sizes():
    model = tame_model()
    model.enable_runtime("openvino", "f32")
    for batch in range(1, runtime_module.MAX_COMPILED_SHAPES + 4):
        forward(model, model_inputs(model, batch=min(batch, 6)) if batch <= 6 else _batch(model, batch))
    assert len(model.runtime._compiled) == runtime_module.MAX_COMPILED_SHAPES


def _batch(model, batch):
    generator = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, 4, model.config.sample_size, model.config.sample_size, generator=generator)
    return sample, torch.full((batch,), 300), torch.zeros(batch, dtype=torch.long)


def test_forward_path_choices_refuse_runtime_models_and_damaged_cache_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path))
    model = tiny_model()
    running = with_runtime(model, "onnxruntime", "fp32")
    for call in (lambda: apply_path(running, "fp32"), lambda: fastest_path(running, batch_size=2)):
        with pytest.raises(DiTOptimumError, match=r"call `disable_runtime\(\)`"):
            call()
    for bad, message in (("fp32", r"must be a list"), ([["fp32"]], r"allowed values"), (["fp32", "fp32"], "distinct")):
        with pytest.raises(DiTOptimumError, match=message):
            fastest_path(model, candidates=bad)
    with pytest.raises(DiTOptimumError, match=r"`use_cache`='no' must be True or False"):
        fastest_path(model, use_cache="no")
    first = fastest_path(model, batch_size=1, candidates=["fp32", "onnxruntime"], rounds=1)
    (entry,) = (tmp_path / "forward_paths").iterdir()
    stored = json.loads(entry.read_text())
    slowest = max(stored["seconds"], key=stored["seconds"].get)
    for damaged in ({**stored, "name": ["fp32"]}, {**stored, "name": slowest},
                    {**stored, "seconds": {k: str(v) for k, v in stored["seconds"].items()}}):  # fmt: skip
        entry.write_text(json.dumps(damaged))
        again = fastest_path(model, batch_size=1, candidates=["fp32", "onnxruntime"], rounds=1)
        assert not again.cached and again.name in first.seconds


def test_the_card_line_loads_a_runtime_release_and_samples(tmp_path):
    import subprocess
    import sys

    from dit_optimum.hub.cards import loading_code

    pipeline = with_runtime(tiny_pixel_pipeline(), "openvino", "f32")
    pipeline.save_pretrained(tmp_path / "org" / "dit-openvino")
    code = loading_code(
        "org/dit-openvino",
        {"technique": "openvino", "runtime": "openvino f32", "dtype": "float32"},
        needs_package=stock_format_problem(pipeline),
    )
    assert "its transformer runs with openvino f32" in code and "pip install 'dit-optimum[openvino]'" in code
    probe = "\nprint(type(pipe.transformer.runtime).__name__, pipe.transformer.runtime._graph is not None)"
    result = subprocess.run(
        [sys.executable, "-c", code + probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("OpenVINORuntime True") and (tmp_path / "sample.png").is_file()


def test_benchmark_cells_with_runtimes_record_them_and_release_without_half_precision_files(tmp_path, monkeypatch):
    from conftest import TinyFeatureExtractor
    from dit_optimum.benchmark import run_benchmark
    from dit_optimum.benchmark.report import markdown_table, write_report
    from dit_optimum.benchmark.runner import load_results
    from dit_optimum.hub.releases import save_half_precision_variants
    from dit_optimum.hub.space import release_runtime_extras, space_requirements
    from dit_optimum.techniques.registry import Technique
    from test_benchmark import tiny_settings

    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    measured = {"base": "prune-depth-50", "fastest": {"batch_size": 2}}
    monkeypatch.setitem(
        TECHNIQUES, "prune-depth-50+fastest", Technique("prune-depth-50+fastest", stacked, "", measured)
    )
    techniques = ("baseline", "openvino", "onnxruntime", "prune-depth-50+fastest")
    rows = run_benchmark(tiny_settings(tmp_path / "bench", techniques), TinyFeatureExtractor())
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert [row["runtime"] for row in rows[:3]] == ["torch", "openvino bf16", "onnxruntime fp32"]
    choice = rows[3]["forward_path_choice"]  # the path taken and why: every candidate's measured speed
    assert choice["batch_size"] == 2 and choice["speedups"][choice["name"]] == max(choice["speedups"].values())
    part, options = FORWARD_PATHS[choice["name"]]
    assert rows[3]["runtime"] == (f"{options['backend']} {options['precision']}" if part == "runtime" else "torch")
    report = write_report(rows, tmp_path / "bench").read_text()
    assert "## Forward paths measured on this machine" in report and f"**{choice['name']}** at batch 2" in report
    base, openvino, onnx = rows[:3]
    assert base["peak_memory_bytes"] is not None
    # a runtime keeps its buffers outside torch between calls: its memory is not measured rather than near zero
    assert "peak_memory_bytes" not in openvino and "forward_peak_memory_bytes" not in onnx  # n/a, never null
    assert len(load_results(tmp_path / "bench")["rows"]) == 4  # the folder's results read back (a rerun resumes)
    assert onnx["size_bytes"] > 1.9 * base["size_bytes"] and onnx["fid"] == pytest.approx(base["fid"], rel=1e-3)
    table = markdown_table(rows)
    assert "| variant | technique | runtime |" in table and "| openvino bf16 |" in table

    pipeline = with_runtime(tiny_pixel_pipeline(), "openvino", "f32")
    pipeline.save_pretrained(tmp_path / "releases" / "dit-openvino")
    assert save_half_precision_variants(pipeline, tmp_path / "releases" / "dit-openvino") == []
    assert not list((tmp_path / "releases").rglob("*.fp16.safetensors"))
    assert release_runtime_extras(tmp_path / "releases") == ["openvino"]
    assert any(line.startswith("openvino==") for line in space_requirements(["openvino"]))
    # the pipeline's loader takes the transformer's runtime override: None runs torch
    in_torch = DiTOptimumPipeline.from_pretrained(tmp_path / "releases" / "dit-openvino", runtime=None)
    assert in_torch.transformer.runtime is None
