"""Forward fast paths of DiT-S/2 (256 tokens, batch 8) against this machine's matmul roofline, measured in one run.

    .venv/bin/python benchmarks/fast_paths.py [--rounds 5] [--batch-size 8] [--options fp32,bf16,...] [--device cuda]

First the roofline: the best of several 2048^3 matmuls in fp32, bf16 and int8 (``torch._int_mm``), and the same for
the model's own GEMM shape (tokens x width x 4 width). Then each forward option, timed in interleaved rounds against
fp32 eager (same process, same inputs), reported as a speed-up, as achieved GFLOP/s (the model's FLOPs by
``torch.utils.flop_counter``, 2 per multiply-add) and as a fraction of the roofline of the dtype its GEMMs run in.
Compile time is reported apart. Untrained weights: speed does not depend on them. On a CUDA GPU (the default when
there is one) it adds fp8 to the roofline (compute capability 8.9+) and CUDA graphs, float8 and diffusers' attention
backends to the options: the one prepared script for a lent GPU. Writes
``benchmarks/results/fast_paths_<cpu|gpu>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from dit_optimum import DiTOptimumTransformer2DModel, quantize
from dit_optimum.evaluation.flops import count_gflops
from dit_optimum.evaluation.hardware import cpu_features, hardware_description
from dit_optimum.evaluation.speed import interleaved_call_times
from dit_optimum.techniques.quantization import compile_for_inference

RESULTS = Path(__file__).parent / "results"


def best_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (the package's timer, device-synchronised)."""
    return min(interleaved_call_times({"run": run}, device, warmup=1, repeats=repeats)["run"])


def matmul_rates(m: int, k: int, n: int, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Best GFLOP/s (GOP/s for int8, fp8) of an (m x k) @ (k x n) product in each dtype on ``device``; fp8
    (``torch._scaled_mm``) only on CUDA GPUs of compute capability 8.9+."""
    generator = torch.Generator().manual_seed(0)
    rates = {}

    def rate(run: Callable[[], object]) -> float:
        return 2 * m * k * n / best_seconds(run, repeats, device) / 1e9

    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(m, k, generator=generator).to(device, dtype)
        b = torch.randn(k, n, generator=generator).to(device, dtype)
        rates[name] = rate(lambda a=a, b=b: a @ b)
    a = torch.randint(-127, 127, (m, k), dtype=torch.int8, generator=generator).to(device)
    b = torch.randint(-127, 127, (k, n), dtype=torch.int8, generator=generator).to(device)
    rates["int8"] = rate(lambda: torch._int_mm(a, b))
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        a8 = torch.randn(m, k, generator=generator).to(device, torch.float8_e4m3fn)
        b8 = torch.randn(n, k, generator=generator).to(device, torch.float8_e4m3fn).t()  # column-major, as required
        one = torch.ones((), device=device)
        rates["fp8"] = rate(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16))
    return rates


def build_options(
    model: DiTOptimumTransformer2DModel, device: torch.device
) -> dict[str, tuple[Callable[[], torch.nn.Module], str]]:
    """option -> (builder, dtype whose roofline bounds its GEMMs). "compile" is ``compile_for_inference`` (whole
    model, inductor weight freezing; what ``quantize(..., compile=True)`` does); "regional compile" is diffusers'
    ``compile_repeated_blocks`` (one DiT block compiled, reused by all). On CUDA the options add CUDA graphs,
    float8 and diffusers' attention backends."""

    def fused(source: torch.nn.Module) -> torch.nn.Module:
        source.fuse_qkv_projections()
        return source

    def regional(source: torch.nn.Module) -> torch.nn.Module:
        source.compile_repeated_blocks(fullgraph=False)
        return source

    def cuda_graphs(source: torch.nn.Module) -> torch.nn.Module:
        source.compile(dynamic=False, options={"freezing": True, "triton.cudagraphs": True})
        return source

    def backend(source: torch.nn.Module, name: str) -> torch.nn.Module:
        source.set_attention_backend(name)
        return source

    def fp32() -> torch.nn.Module:
        return copy.deepcopy(model)

    def bf16() -> torch.nn.Module:
        return quantize(model, backend="torch", weights="bf16")

    def int8_weights() -> torch.nn.Module:
        return quantize(model, backend="torchao", weights="int8")

    def int8_dynamic() -> torch.nn.Module:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        return quantize(model, backend="torchao", weights="int8", activations="int8", dtype=dtype)

    def float8_dynamic() -> torch.nn.Module:
        return quantize(model, backend="torchao", weights="float8", activations="float8")

    options = {
        "fp32": (fp32, "fp32"),
        "fp32 + fused qkv": (lambda: fused(fp32()), "fp32"),
        "fp32 + compile": (lambda: compile_for_inference(fp32()), "fp32"),
        "bf16": (bf16, "bf16"),
        "bf16 + fused qkv": (lambda: fused(bf16()), "bf16"),
        "bf16 + regional compile": (lambda: regional(bf16()), "bf16"),
        "bf16 + compile": (lambda: compile_for_inference(bf16()), "bf16"),
        "bf16 + fused qkv + compile": (lambda: compile_for_inference(fused(bf16())), "bf16"),
        "int8 weight-only": (int8_weights, "bf16"),
        "int8 weight-only + compile": (lambda: compile_for_inference(int8_weights()), "bf16"),
        "int8 dynamic (w8a8)": (int8_dynamic, "int8"),
        "int8 dynamic (w8a8) + compile": (lambda: compile_for_inference(int8_dynamic()), "int8"),
    }
    if device.type == "cuda":
        options["bf16 + compile + CUDA graphs"] = (lambda: cuda_graphs(bf16()), "bf16")
        options["int8 dynamic (w8a8) + compile + CUDA graphs"] = (lambda: cuda_graphs(int8_dynamic()), "int8")
        for name in ("_native_flash", "_native_efficient", "_native_cudnn"):
            options[f"bf16 + compile, attention {name}"] = (
                lambda name=name: compile_for_inference(backend(bf16(), name)),
                "bf16",
            )
        if torch.cuda.get_device_capability(device) >= (8, 9):
            options["float8 dynamic"] = (float8_dynamic, "fp8")
            options["float8 dynamic + compile"] = (lambda: compile_for_inference(float8_dynamic()), "fp8")
            options["float8 dynamic + compile + CUDA graphs"] = (lambda: cuda_graphs(float8_dynamic()), "fp8")
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="DiT-S/2")
    parser.add_argument("--latent-size", type=int, default=32, help="32: 256 tokens at patch 2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="forwards per option per round")
    parser.add_argument("--options", help="comma-separated subset of the options (fp32 is always measured)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    roofline = matmul_rates(2048, 2048, 2048, device)
    model = DiTOptimumTransformer2DModel.from_preset(args.variant, sample_size=args.latent_size).eval().to(device)
    tokens = args.batch_size * (args.latent_size // model.config.patch_size) ** 2
    gemm = matmul_rates(tokens, model.inner_dim, 4 * model.inner_dim, device)
    print("roofline 2048^3:", {k: round(v) for k, v in roofline.items()}, "| model GEMM:", {k: round(v) for k, v in
          gemm.items()}, flush=True)  # fmt: skip

    sample = torch.randn(args.batch_size, model.config.in_channels, args.latent_size, args.latent_size).to(device)
    timestep = torch.randint(0, 1000, (args.batch_size,)).to(device)
    labels = torch.randint(0, model.config.num_embeds_ada_norm, (args.batch_size,)).to(device)
    gflops = 2 * count_gflops(model) * args.batch_size  # count_gflops: multiply-adds per image
    options = build_options(model, device)
    chosen = ["fp32"] + [o for o in (args.options.split(",") if args.options else options) if o != "fp32"]
    unknown = [o for o in chosen if o not in options]
    if unknown:
        raise SystemExit(f"Unknown options {unknown}; allowed: {', '.join(options)}")

    built, compile_s, outputs = {}, {}, {}

    def build(name: str) -> None:  # timed whole: building, compiling (first calls) and one more call
        module = options[name][0]()
        dtype = next(module.parameters()).dtype
        inputs = (sample.to(dtype) if dtype.is_floating_point else sample, timestep, labels)
        outputs[name] = module(*inputs).sample.float()
        module(*inputs)
        built[name] = (module, inputs)

    for name in chosen:
        compile_s[name] = interleaved_call_times({name: lambda name=name: build(name)}, device, 0, 1)[name][0]
        print(f"built {name} in {compile_s[name]:.1f} s", flush=True)

    def forwards(name: str) -> None:
        module, inputs = built[name]
        for _ in range(args.repeats):
            module(*inputs)

    # interleaved rounds (every option once per round, so drifts hit all alike); seconds per forward
    rounds = interleaved_call_times({name: lambda name=name: forwards(name) for name in chosen}, device, 0, args.rounds)
    times = {name: [seconds / args.repeats for seconds in values] for name, values in rounds.items()}

    reference = outputs["fp32"]
    rows = []
    for name in chosen:
        seconds = statistics.median(times[name])
        ratios = [base / own for base, own in zip(times["fp32"], times[name])]
        rate = gflops / seconds
        bound = options[name][1]
        error = ((outputs[name] - reference).norm() / reference.norm()).item()
        rows.append(
            {
                "option": name,
                "seconds": seconds,
                "speedup": statistics.median(ratios),
                "speedup_range": [min(ratios), max(ratios)],
                "gflops_per_s": rate,
                "bound_by": bound,
                "roofline_fraction": rate / roofline[bound],
                "gemm_shape_fraction": rate / gemm[bound],
                "build_and_compile_s": compile_s[name],
                "relative_error_vs_fp32": error,
            }
        )
    result = {
        "hardware": hardware_description(),
        "device": str(device),
        "cpu_features": cpu_features(),
        "variant": args.variant,
        "tokens_per_image": (args.latent_size // model.config.patch_size) ** 2,
        "batch_size": args.batch_size,
        "gflop_per_forward": gflops,
        "roofline_gflops_per_s": roofline,
        "model_gemm_gflops_per_s": gemm,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "rows": rows,
    }
    output = args.output or RESULTS / f"fast_paths_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{result['hardware'].get('gpu', result['hardware']['cpu'])}; {args.variant}, "
        f"{result['tokens_per_image']} tokens, "
        f"batch {args.batch_size}, {gflops:.1f} GFLOP per forward"
    )
    print("| option | ms | speed-up vs fp32 | GFLOP/s | of roofline | build+compile s | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        low, high = row["speedup_range"]
        print(
            f"| {row['option']} | {1000 * row['seconds']:.0f} | {row['speedup']:.2f}x [{low:.2f}, {high:.2f}] | "
            f"{row['gflops_per_s']:.0f} | {100 * row['roofline_fraction']:.0f}% of {row['bound_by']} | "
            f"{row['build_and_compile_s']:.0f} | {row['relative_error_vs_fp32']:.1e} |"
        )


if __name__ == "__main__":
    main()
