"""The package's forward paths against the CPU runtimes a user could pick instead, DiT-S/2 (256 tokens, batch 8),
one transformer forward, the same weights, interleaved rounds in one process (a new random order each round).

    .venv/bin/python benchmarks/cpu_peers.py [--rounds 7] [--batch-size 8] [--skip-compile]

Peers, each as a user would set it up by hand: torch eager and ``torch.compile`` (fp32; bf16 with inductor weight
freezing, which was the package's recommended path before), OpenVINO (``openvino.convert_model`` + the CPU plugin
with default settings, and with f32 forced) and ONNX Runtime (``torch.onnx.export`` + a default session). The
package's paths: its saveable runtimes (``enable_runtime``: OpenVINO bf16 / int8 / f32, ONNX Runtime) and the path
``fastest_path`` picks on this machine. Reported: the median of the per-round speed-ups over fp32 eager with their
range, the relative error against fp32, and the bf16 torch forward as a fraction of the bf16 matmul roofline
measured in the same run. Writes ``benchmarks/results/cpu_peers_<cpu>.json``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dit_optimum import DiTOptimumTransformer2DModel, quantize
from dit_optimum.evaluation.flops import count_gflops
from dit_optimum.evaluation.hardware import hardware_description
from dit_optimum.models.runtimes import INPUT_NAMES
from dit_optimum.techniques.quantization import compile_for_inference
from dit_optimum.techniques.runtimes import apply_path, fastest_path, with_runtime
from fast_paths import matmul_rates  # the roofline, measured as there (this script's folder is on the path)

RESULTS = Path(__file__).parent / "results"


class Forward(torch.nn.Module):
    """(sample, timestep, labels) -> prediction, as a user exporting the model by hand would wrap it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep=timestep, class_labels=labels, return_dict=False)[0]


def peer_paths(model: DiTOptimumTransformer2DModel, inputs: tuple, skip_compile: bool) -> dict[str, Callable]:
    """name -> builder returning a callable of no arguments that runs one forward (the peers, set up by hand)."""
    import onnxruntime
    import openvino

    numpy_inputs = [inputs[0].numpy(), inputs[1].float().numpy(), inputs[2].numpy()]

    def torch_call(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Callable:
        sample = inputs[0].to(dtype)
        return lambda: module(sample, timestep=inputs[1], class_labels=inputs[2]).sample

    def openvino_call(config: dict) -> Callable:
        graph = openvino.convert_model(Forward(copy.deepcopy(model)), example_input=(inputs[0], inputs[1].float(),
                                                                                     inputs[2]))  # fmt: skip
        compiled = openvino.Core().compile_model(graph, "CPU", config)
        return lambda: torch.from_numpy(compiled(numpy_inputs)[0])

    def onnxruntime_call() -> Callable:
        buffer = io.BytesIO()
        torch.onnx.export(Forward(copy.deepcopy(model)), (inputs[0], inputs[1].float(), inputs[2]), buffer,
                          dynamo=False, opset_version=18, input_names=list(INPUT_NAMES))  # fmt: skip
        session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        feed = dict(zip(INPUT_NAMES, numpy_inputs))
        return lambda: torch.from_numpy(session.run(None, feed)[0])

    paths = {
        "peer: torch fp32 eager": lambda: torch_call(model),
        "peer: torch bf16 eager": lambda: torch_call(quantize(model, backend="torch", weights="bf16"), torch.bfloat16),
        "peer: OpenVINO, default settings": lambda: openvino_call({}),
        "peer: OpenVINO, f32": lambda: openvino_call({"INFERENCE_PRECISION_HINT": "f32"}),
        "peer: ONNX Runtime fp32": onnxruntime_call,
    }
    if not skip_compile:
        paths["peer: torch fp32 + compile"] = lambda: torch_call(compile_for_inference(copy.deepcopy(model)))
        paths["peer: torch bf16 + compile (the old recommended path)"] = lambda: torch_call(
            compile_for_inference(quantize(model, backend="torch", weights="bf16")), torch.bfloat16
        )
    return paths


def package_paths(model: DiTOptimumTransformer2DModel, inputs: tuple) -> dict[str, Callable]:
    """The package's saveable runtime paths, each through ``with_runtime`` (what a saved pipeline runs)."""

    def runtime_call(backend: str, precision: str) -> Callable:
        module = with_runtime(model, backend, precision)
        return lambda: module(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample

    return {
        "dit-optimum: openvino (bf16)": lambda: runtime_call("openvino", "bf16"),
        "dit-optimum: openvino-int8": lambda: runtime_call("openvino", "int8"),
        "dit-optimum: openvino-f32": lambda: runtime_call("openvino", "f32"),
        "dit-optimum: onnxruntime": lambda: runtime_call("onnxruntime", "fp32"),
        "dit-optimum: onnxruntime-int8": lambda: runtime_call("onnxruntime", "int8"),
    }


def path_call(model: DiTOptimumTransformer2DModel, name: str, inputs: tuple) -> Callable:
    """One forward of ``model`` with forward path ``name`` applied (``apply_path``)."""
    module = apply_path(model, name)
    sample = inputs[0].to(next(module.parameters()).dtype)
    return lambda: module(sample, timestep=inputs[1], class_labels=inputs[2]).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="DiT-S/2")
    parser.add_argument("--latent-size", type=int, default=32, help="32: 256 tokens at patch 2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile peers")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DiTOptimumTransformer2DModel.from_preset(args.variant, sample_size=args.latent_size).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=generator),
        torch.randint(0, 1000, (args.batch_size,), generator=generator),
        torch.randint(0, 1000, (args.batch_size,), generator=generator),
    )
    roofline = matmul_rates(2048, 2048, 2048, torch.device("cpu"))
    gflop = 2 * count_gflops(model) * args.batch_size

    choice = fastest_path(model, batch_size=args.batch_size, use_cache=False)
    print(choice.summary(), flush=True)
    builders = {**peer_paths(model, inputs, args.skip_compile), **package_paths(model, inputs)}
    builders[f"dit-optimum: fastest_path's choice ({choice.name})"] = lambda: path_call(model, choice.name, inputs)
    calls, outputs, build_seconds = {}, {}, {}
    with torch.no_grad():
        for name, build in builders.items():  # timed whole: building, exporting or compiling (first call)
            start = time.perf_counter()
            calls[name] = build()
            outputs[name] = calls[name]().float()
            build_seconds[name] = time.perf_counter() - start
            print(f"built {name} in {build_seconds[name]:.1f} s", flush=True)
        # every path once per round, in a new random order each round: what one path leaves behind (busy threads,
        # caches) falls on a different neighbour each time
        rounds: dict[str, list[float]] = {name: [] for name in calls}
        order = random.Random(0)
        for round_index in range(args.rounds + 1):
            names = list(calls)
            order.shuffle(names)
            for name in names:
                start = time.perf_counter()
                calls[name]()
                if round_index:  # the first round warms up
                    rounds[name].append(time.perf_counter() - start)
    reference_name = "peer: torch fp32 eager"
    reference = outputs[reference_name]
    rows = []
    for name, times in rounds.items():
        ratios = [base / own for base, own in zip(rounds[reference_name], times)]
        seconds = statistics.median(times)
        rows.append(
            {
                "path": name,
                "ms": 1000 * seconds,
                "speedup": statistics.median(ratios),
                "speedup_range": [min(ratios), max(ratios)],
                "gflops_per_s": gflop / seconds,
                "relative_error_vs_fp32": ((outputs[name] - reference).norm() / reference.norm()).item(),
                "build_s": build_seconds[name],
            }
        )
    bf16 = next(row for row in rows if row["path"] == "peer: torch bf16 eager")
    compiled_bf16 = next((row for row in rows if row["path"].startswith("peer: torch bf16 + compile")), None)
    best_peer = max((row for row in rows if row["path"].startswith("peer:")), key=lambda row: row["speedup"])
    best_package = max((row for row in rows if row["path"].startswith("dit-optimum:")), key=lambda row: row["speedup"])
    result = {
        "hardware": hardware_description(),
        "variant": args.variant,
        "batch_size": args.batch_size,
        "tokens_per_image": (args.latent_size // model.config.patch_size) ** 2,
        "gflop_per_forward": gflop,
        "rounds": args.rounds,
        "roofline_gflops_per_s": roofline,
        "bf16_torch_roofline_fraction": {
            "eager": bf16["gflops_per_s"] / roofline["bf16"],
            "compiled": None if compiled_bf16 is None else compiled_bf16["gflops_per_s"] / roofline["bf16"],
        },
        "fastest_path_choice": {"name": choice.name, "speedups": choice.speedups()},
        "best_peer": best_peer["path"],
        "best_package_path": best_package["path"],
        "package_at_least_as_fast": best_package["speedup"] >= best_peer["speedup"],
        "rows": rows,
    }
    tag = re.sub(r"[^a-z0-9]+", "_", result["hardware"]["cpu"].lower()).strip("_")[:40]
    output = args.output or RESULTS / f"cpu_peers_{tag}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")  # a NaN is an error, not a token
    print(f"\n{result['hardware']['cpu']}, {result['hardware']['threads']} threads; {args.variant}, "
          f"{result['tokens_per_image']} tokens, batch {args.batch_size}, {gflop:.1f} GFLOP per forward, "
          f"{args.rounds} interleaved rounds; bf16 matmul roofline {roofline['bf16']:.0f} GFLOP/s")  # fmt: skip
    print("| path | ms | speed-up vs torch fp32 eager [range] | GFLOP/s | rel. error vs fp32 | build s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        low, high = row["speedup_range"]
        print(f"| {row['path']} | {row['ms']:.0f} | {row['speedup']:.2f}x [{low:.2f}, {high:.2f}] | "
              f"{row['gflops_per_s']:.0f} | {row['relative_error_vs_fp32']:.1e} | {row['build_s']:.1f} |")  # fmt: skip
    fractions = result["bf16_torch_roofline_fraction"]
    print(f"\nbf16 torch forward: {100 * fractions['eager']:.0f}% of the bf16 roofline eager"
          + ("" if fractions["compiled"] is None else f", {100 * fractions['compiled']:.0f}% compiled"))  # fmt: skip
    print(f"best peer: {best_peer['path']} {best_peer['speedup']:.2f}x; best dit-optimum path: "
          f"{best_package['path']} {best_package['speedup']:.2f}x -> at least as fast: "
          f"{result['package_at_least_as_fast']}")  # fmt: skip


if __name__ == "__main__":
    main()
