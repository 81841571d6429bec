"""Compression on DiT-S/2 (32x32x4 latents, 256 tokens): every quantization option and pruning level vs fp32.

    .venv/bin/python benchmarks/compression.py [--repeats 5] [--skip-compile]

One run, one process: the fp32 baseline is timed in the same round-robin as every option, so ratios are
comparable on a noisy machine. Writes benchmarks/results/compression_<device>.json and .md.
Throughput = images/s of one transformer forward; size = bytes of the saved transformer (safetensors);
peak memory = saved weights + peak RSS growth (CPU) or allocator peak growth (GPU) during one forward;
error = relative L2 error of the forward output vs fp32 (random weights: numeric fidelity, not image quality).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from dit_optimum import DiTOptimumTransformer2DModel, count_gflops, count_parameters, prune, quantize
from dit_optimum.evaluation.hardware import hardware_description
from dit_optimum.evaluation.inputs import example_inputs
from dit_optimum.evaluation.memory import peak_memory_bytes
from dit_optimum.evaluation.size import saved_size_bytes
from dit_optimum.evaluation.speed import interleaved_median_times
from dit_optimum.techniques.quantization import CalibrationSettings
from dit_optimum.utils import write_json_atomic

RESULTS = Path(__file__).parent / "results"
QUANTIZATION_OPTIONS = {
    "bf16": {"backend": "torch", "weights": "bf16"},
    "torchao int8 weight-only": {"backend": "torchao", "weights": "int8"},
    "torchao int8 w8a8 (dynamic)": {"backend": "torchao", "weights": "int8", "activations": "int8"},
    "torchao int8 w8a8 (dynamic), fp32 compute": {
        "backend": "torchao",
        "weights": "int8",
        "activations": "int8",
        "dtype": torch.float32,
    },
    "quanto int8 weight-only": {"backend": "quanto", "weights": "int8"},
    "quanto int4 weight-only": {"backend": "quanto", "weights": "int4"},
    "quanto float8 weight-only": {"backend": "quanto", "weights": "float8"},
    "quanto int8 w8a8 (static)": {"backend": "quanto", "weights": "int8", "activations": "int8"},
}
COMPILED = (
    "fp32",
    "bf16",
    "torchao int8 weight-only",
    "torchao int8 w8a8 (dynamic)",
    "torchao int8 w8a8 (dynamic), fp32 compute",
)


def cast_inputs(inputs, model):
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def measure(models: dict, batch_size: int, repeats: int, reference_name: str = "fp32") -> dict[str, dict]:
    base = models[reference_name]
    inputs = example_inputs(base, batch_size)
    # Each model gets inputs of its own dtype; all are timed round-robin in the same rounds.
    wrapped = {name: _Caster(model) for name, model in models.items()}
    times = interleaved_median_times(wrapped, inputs, warmup=1, repeats=repeats)
    with torch.no_grad():
        reference = base(*inputs).sample.float()
    rows = {}
    for name, model in models.items():
        model_inputs = cast_inputs(inputs, model)
        with torch.no_grad():
            output = model(*model_inputs).sample.float()
            memory = peak_memory_bytes(lambda m=model, x=model_inputs: m(*x))
        rows[name] = {
            "batch_size": batch_size,
            "forward_s": times[name],
            "images_per_s": batch_size / times[name],
            "peak_memory_bytes": memory,
            "forward_memory_bytes": memory,
            "relative_error": ((output - reference).norm() / reference.norm()).item(),
        }
    for row in rows.values():
        row["throughput_ratio"] = row["images_per_s"] / rows[reference_name]["images_per_s"]
    return rows


class _Caster(torch.nn.Module):
    """Calls a model with inputs cast to its dtype; timing wrappers see one signature."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*cast_inputs(inputs, self.model))


def build_quantized(base, skip_compile: bool) -> tuple[dict, dict]:
    models, build_seconds = {"fp32": base}, {}
    calibration = CalibrationSettings(num_batches=4, batch_size=4, num_inference_steps=10)
    for name, options in QUANTIZATION_OPTIONS.items():
        start = time.perf_counter()
        extra = {"calibration": calibration} if options.get("activations") and options["backend"] == "quanto" else {}
        models[name] = quantize(base, **options, **extra)
        build_seconds[name] = time.perf_counter() - start
    if not skip_compile:
        for name in COMPILED:
            if name == "fp32":
                compiled = copy.deepcopy(base)
                compiled.compile(dynamic=False)
            else:
                compiled = quantize(base, **QUANTIZATION_OPTIONS[name], compile=True)
            models[f"{name} + compile"] = compiled
    return models, build_seconds


def pruning_rows(base, batch_sizes, repeats) -> list[dict]:
    variants = {"unpruned": base}
    for what in ("heads", "mlp", "depth"):
        for ratio in (0.25, 0.5):
            variants[f"{what} {int(ratio * 100)}%"] = prune(base, **{what: ratio})
    rows = []
    base_params, base_gflops = count_parameters(base), count_gflops(base)
    for batch_size in batch_sizes:
        times = interleaved_median_times(variants, example_inputs(base, batch_size), warmup=1, repeats=repeats)
        for name, model in variants.items():
            rows.append(
                {
                    "variant": name,
                    "batch_size": batch_size,
                    "params_m": count_parameters(model) / 1e6,
                    "params_ratio": count_parameters(model) / base_params,
                    "gflops": count_gflops(model),
                    "gflops_ratio": count_gflops(model) / base_gflops,
                    "forward_s": times[name],
                    "latency_ratio": times[name] / times["unpruned"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[8, 1])
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    base = DiTOptimumTransformer2DModel.from_preset("DiT-S/2").eval()
    models, build_seconds = build_quantized(base, args.skip_compile)
    sizes = {name: saved_size_bytes(model) for name, model in models.items() if "compile" not in name}
    quantization = []
    for batch_size in args.batch_sizes:
        for name, row in measure(models, batch_size, args.repeats).items():
            size = sizes[name.replace(" + compile", "")]
            quantization.append({"option": name, **row, "size_bytes": size, "size_ratio": size / sizes["fp32"]})
    for row in quantization:
        # Peak inference memory = the weights (their saved size) + the peak extra memory of one forward.
        row["peak_memory_bytes"] += row["size_bytes"]
        baseline = next(r for r in quantization if r["option"] == "fp32" and r["batch_size"] == row["batch_size"])
        row["memory_ratio"] = row["peak_memory_bytes"] / (baseline["size_bytes"] + baseline["forward_memory_bytes"])
    pruning = pruning_rows(base, args.batch_sizes, args.repeats)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    payload = {
        "hardware": hardware_description(),
        "model": "DiT-S/2, 32x32x4 input, random weights",
        "quantization": quantization,
        "pruning": pruning,
        "build_seconds": build_seconds,
        "wall_s": time.perf_counter() - start,
    }
    write_json_atomic(RESULTS / f"compression_{device}.json", payload)
    lines = [
        f"# Compression of DiT-S/2 ({device})",
        "",
        f"Hardware: {payload['hardware']}. Median of {args.repeats} forwards after warm-up; "
        f"wall {payload['wall_s']:.0f} s.",
        "",
        "| option | batch | images/s | throughput vs fp32 | size vs fp32 | peak memory vs fp32 | rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in quantization:
        lines.append(
            f"| {row['option']} | {row['batch_size']} | {row['images_per_s']:.1f} | {row['throughput_ratio']:.2f}x "
            f"| {row['size_ratio']:.1%} | {row['memory_ratio']:.2f} | {row['relative_error']:.4f} |"
        )
    lines += ["", "| pruning | batch | params (M) | params | GFLOPs | latency |", "|---|---:|---:|---:|---:|---:|"]
    for row in pruning:
        lines.append(
            f"| {row['variant']} | {row['batch_size']} | {row['params_m']:.2f} | {row['params_ratio']:.2f} "
            f"| {row['gflops_ratio']:.2f} | {row['latency_ratio']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / f"compression_{device}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
