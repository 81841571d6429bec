"""The ``dit-optimum`` command: ``benchmark`` (the main job), ``convert``, ``quantize`` and ``prune``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .benchmark.settings import add_benchmark_arguments
from .configs import preset_names
from .errors import DiTOptimumError
from .evaluation.quality import add_quality_arguments, quality_settings_from_arguments
from .models.attention import ATTENTION_TYPES
from .utils import check_save_target, csv_list


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds other files (they are left alone) or replace a file at that path",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-optimum", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "benchmark",
        help="The multi-method benchmark: variants x techniques, FID/sFID/KID, GFLOPs, speed, memory, size.",
        description="Runs (or resumes) the matrix and writes results.json/.csv, report.md and plots. With no "
        "arguments: the embedded small-scale run on the digits data (about 12 minutes on 2 CPU cores).",
    )
    add_benchmark_arguments(bench)

    evaluate = commands.add_parser(
        "evaluate", help="FID/sFID/KID, GFLOPs, throughput, latency, peak memory and size of one saved pipeline."
    )
    evaluate.add_argument("pipeline", help="pipeline folder or Hub id")
    add_quality_arguments(evaluate)
    evaluate.add_argument("--speed-batch-size", type=int, default=8)
    evaluate.add_argument("--no-speed", action="store_true", help="quality metrics only")
    evaluate.add_argument("--output", type=Path, help="write the result as JSON here")

    arch = commands.add_parser(
        "architecture", help="Parameters, GFLOPs and forward time of every attention type (random weights)."
    )
    arch.add_argument(
        "--presets",
        type=csv_list,
        default=["DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"],
        help=f"comma-separated presets; allowed: {', '.join(preset_names())}",
    )
    arch.add_argument(
        "--attention-types",
        type=csv_list,
        default=list(ATTENTION_TYPES),
        help=f"comma-separated; allowed: {', '.join(ATTENTION_TYPES)}",
    )
    arch.add_argument(
        "--sample-sizes",
        type=lambda v: [int(x) for x in csv_list(v)],
        default=[32],
        help="input sides (latent 32 = 256 tokens at patch 2)",
    )
    arch.add_argument("--batch-size", type=int, default=4)
    arch.add_argument("--repeats", type=int, default=3)
    arch.add_argument("--output-dir", type=Path, default=Path("benchmark-results/architecture"))

    convert = commands.add_parser("convert", help="Convert an original DiT checkpoint or a stock diffusers DiT folder.")
    convert.add_argument("source_format", choices=["original", "diffusers"])
    convert.add_argument("source", help="checkpoint file (original) or pipeline folder / Hub id (diffusers)")
    convert.add_argument("output_dir", type=Path)
    convert.add_argument("--model", dest="model_name", help="preset name to check against, e.g. DiT-XL/2")
    convert.add_argument("--sample-size", type=int, help="input side, if the checkpoint has no pos_embed")
    convert.add_argument("--num-classes", type=int, help="class count (default: class table rows - 1)")
    convert.add_argument("--num-heads", type=int, help="attention heads (default: from --model or the matching preset)")
    convert.add_argument("--vae", help="AutoencoderKL folder or Hub id for latent models")
    convert.add_argument("--id2label", help="JSON file mapping class index to name")
    convert.add_argument("--transformer-only", action="store_true", help="save only the transformer folder")
    _add_overwrite_argument(convert)
    convert.add_argument(
        "--original-timestep-embedding",
        action="store_true",
        help="(diffusers) use the original DiT sinusoid the released weights were trained with",
    )
    quant = commands.add_parser("quantize", help="Quantize (or cast to bf16/fp16) a saved pipeline and save it.")
    quant.add_argument("source", help="pipeline folder")
    quant.add_argument("output_dir", type=Path)
    _add_overwrite_argument(quant)
    quant.add_argument("--backend", default="torchao", help="torch | torchao | quanto")
    quant.add_argument("--weights", default="int8", help="int8 | int4 | float8 | bf16 | fp16")
    quant.add_argument("--activations", default=None, help="int8 | float8 (default: weight-only)")
    quant.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="float dtype of non-quantized layers (default: bfloat16 for torchao, the model's for quanto)",
    )
    quant.add_argument("--keep-float", type=csv_list, default=None, help="module-name prefixes left in float")
    quant.add_argument("--calibration-batches", type=int, default=4, help="(quanto with activations) sampling runs")
    quant.add_argument("--calibration-steps", type=int, default=10, help="(quanto with activations) steps per run")

    prune = commands.add_parser("prune", help="Structurally prune heads, MLP width and blocks of a saved pipeline.")
    prune.add_argument("source", help="pipeline folder")
    prune.add_argument("output_dir", type=Path)
    _add_overwrite_argument(prune)
    prune.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads to remove")
    prune.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP hidden units to remove")
    prune.add_argument("--depth", type=float, default=0.0, help="fraction of blocks to remove")
    prune.add_argument("--importance", default="l1", help="l1 | l2 | taylor | random")
    prune.add_argument("--scope", default="layer", help="layer | global")
    return parser


def _describe_change(before, after, label: str) -> None:
    from .evaluation.fidelity import compare_pipelines
    from .evaluation.flops import count_gflops, count_parameters

    for pipe in (before, after):
        pipe.set_progress_bar_config(disable=True)
    difference = compare_pipelines(before, after, num_inference_steps=10)
    print(
        f"{label}: parameters {count_parameters(before.transformer) / 1e6:.2f}M -> "
        f"{count_parameters(after.transformer) / 1e6:.2f}M; output vs original (same seed, 10 steps): "
        f"PSNR {difference['psnr_db']:.1f} dB, relative error {difference['relative_error']:.4f}"
    )
    if label == "pruned":
        print(f"GFLOPs {count_gflops(before.transformer):.3f} -> {count_gflops(after.transformer):.3f}")


def _check_output(args: argparse.Namespace) -> None:
    # Before any work: the output folder must be safe to write, and not the source pipeline itself.
    if not args.overwrite and Path(args.output_dir).resolve() == Path(args.source).resolve():
        raise DiTOptimumError(
            f"`output_dir`={str(args.output_dir)!r} is the source pipeline: the result would replace the original. "
            "Choose another folder, or pass --overwrite to replace it."
        )
    check_save_target(args.output_dir, "model_index.json", args.overwrite, "output_dir")


def _run_quantize(args: argparse.Namespace) -> int:
    import torch

    from .pipelines.dit import DiTOptimumPipeline
    from .techniques.quantization import DEFAULT_KEEP_FLOAT, SUPPORTED, CalibrationSettings, quantize

    key = (args.backend, args.weights, args.activations)
    if key in SUPPORTED and not SUPPORTED[key][0]:
        raise DiTOptimumError(
            f"backend={args.backend!r} with activations={args.activations!r} cannot be saved as a diffusers pipeline; "
            "use --backend torchao --weights int8 --activations int8 for saved int8 activations."
        )
    _check_output(args)
    pipe = DiTOptimumPipeline.from_pretrained(args.source)
    calibration = None
    if args.backend == "quanto" and args.activations is not None:
        calibration = CalibrationSettings(
            num_batches=args.calibration_batches, num_inference_steps=args.calibration_steps
        )
    quantized = quantize(
        pipe,
        backend=args.backend,
        weights=args.weights,
        activations=args.activations,
        calibration=calibration,
        keep_float=DEFAULT_KEEP_FLOAT if args.keep_float is None else args.keep_float,
        dtype=None if args.dtype is None else getattr(torch, args.dtype),
    )
    _describe_change(pipe, quantized, "quantized")
    quantized.save_pretrained(args.output_dir, overwrite=args.overwrite)
    print(f"Saved {args.output_dir}")
    return 0


def _run_prune(args: argparse.Namespace) -> int:
    from .pipelines.dit import DiTOptimumPipeline
    from .techniques.pruning import prune

    _check_output(args)
    pipe = DiTOptimumPipeline.from_pretrained(args.source)
    pruned = prune(pipe, heads=args.heads, mlp=args.mlp, depth=args.depth, importance=args.importance, scope=args.scope)
    _describe_change(pipe, pruned, "pruned")
    pruned.save_pretrained(args.output_dir, overwrite=args.overwrite)
    print(f"Saved {args.output_dir}")
    return 0


def _print_table(console, rows, title: str) -> None:
    from rich.table import Table

    from .benchmark.report import table_columns, table_rows

    table = Table(title=title)
    for index, header in enumerate(table_columns(rows)):
        table.add_column(header, justify="left" if index < 2 else "right")
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)


def _run_benchmark(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from rich.console import Console

    from .benchmark import run_benchmark, write_report
    from .benchmark.settings import settings_from_arguments
    from .techniques.registry import TECHNIQUES

    console = Console(width=200)
    if args.list:
        for name, technique in TECHNIQUES.items():
            console.print(f"{name:22s} {technique.description}")
        return 0
    settings = settings_from_arguments(args)

    start = time.perf_counter()
    cells = len(settings.variants) * len(settings.techniques)
    console.print(
        f"Benchmark: {cells} cells ({', '.join(settings.variants)} x {len(settings.techniques)} techniques) "
        f"-> {settings.output_dir}"
    )

    def report_cell(row) -> None:
        status = "ok" if row["status"] == "ok" else f"FAILED ({row['error']})"
        console.print(
            f"  {row['variant']} / {row['technique']}: {status} in {row['cell_wall_s']:.0f} s", highlight=False
        )

    rows = run_benchmark(settings, on_cell=report_cell)
    if not PartialState().is_main_process:  # under torchrun / accelerate launch, one process writes the report
        return 0
    elapsed = time.perf_counter() - start
    notes = [f"Command: `dit-optimum {' '.join(args.argv)}`" if args.argv else "Command: `dit-optimum benchmark`"]
    if args.preset == "default" and settings.data == "digits" and not settings.speed_only:
        notes.append(
            f"Small-scale numbers: DiT-XS/4 trained for {settings.training.steps} steps (the small-data recipe) on "
            "the 1,797 8x8 scikit-learn digits (upscaled to 16x16) and scored on a CPU with the domain metrics, which "
            "mean something at this scale: a digit classifier's conditional accuracy and the Frechet distance in its "
            "feature space, each with a 95% interval and the real-vs-real floor. They rank techniques on this task; "
            "they are not ImageNet FIDs (use `--preset paper` for those)."
        )
    notes.append(f"Wall time of this run: {elapsed:.0f} s (cells finished in earlier runs were skipped).")
    report = write_report(rows, settings.output_dir, notes=notes)
    _print_table(console, rows, f"dit-optimum benchmark ({settings.output_dir})")
    failed = [row for row in rows if row.get("status") != "ok"]
    console.print(f"Wrote {report} and {settings.output_dir}/results.json ({elapsed:.0f} s; {len(failed)} failed).")
    return 1 if failed else 0


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    import torch
    from accelerate import PartialState

    from .evaluation.efficiency import SpeedSettings, efficiency_metrics
    from .evaluation.hardware import hardware_description
    from .evaluation.quality import QualitySettings, evaluate_quality
    from .pipelines.dit import DiTOptimumPipeline
    from .utils import write_json_atomic

    settings = quality_settings_from_arguments(args, QualitySettings())
    speed = SpeedSettings(
        batch_size=args.speed_batch_size,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
    )
    settings.validate()
    speed.validate()
    if args.output is not None and args.output.is_dir():
        raise DiTOptimumError(f"`--output`={str(args.output)!r} is a folder; give the path of a JSON file.")
    state = PartialState(cpu=not torch.cuda.is_available())  # one process per GPU under torchrun / accelerate
    pipeline = DiTOptimumPipeline.from_pretrained(args.pipeline).to(state.device)
    pipeline.set_progress_bar_config(disable=True)
    result = evaluate_quality(pipeline, settings, state=state).metrics
    if not result:  # not the main process
        return 0
    if not args.no_speed:
        result.update(efficiency_metrics(pipeline, speed))
    result.update(pipeline=args.pipeline, hardware=hardware_description())
    print(json.dumps(result, indent=2, default=str))
    if args.output:
        write_json_atomic(args.output, result)
    return 0


def _run_architecture(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .benchmark.architecture import architecture_benchmark, markdown_table
    from .evaluation.hardware import hardware_description
    from .utils import write_json_atomic

    console = Console(width=140)
    start = time.perf_counter()
    rows = architecture_benchmark(
        presets=args.presets,
        attention_types=args.attention_types,
        sample_sizes=args.sample_sizes,
        batch_size=args.batch_size,
        repeats=args.repeats,
    )
    table = Table(title=f"DiT attention variants (batch {args.batch_size}, fp32, forward median of {args.repeats})")
    for column in (
        "model",
        "attention",
        "tokens",
        "params (M)",
        "GFLOPs",
        "attn-core GFLOPs",
        "forward (s)",
        "vs sdpa",
    ):
        table.add_column(column, justify="left" if column in ("model", "attention") else "right")
    for row in rows:
        table.add_row(
            row["preset"],
            row["attention_type"],
            str(row["tokens"]),
            f"{row['params_m']:.2f}",
            f"{row['gflops']:.3f}",
            f"{row['attention_core_gflops']:.3f}",
            f"{row['forward_s']:.4f}",
            f"{row['time_ratio']:.2f}x",
        )
    console.print(table)
    hardware = hardware_description()
    elapsed = time.perf_counter() - start
    write_json_atomic(args.output_dir / "architecture.json", {"hardware": hardware, "rows": rows, "wall_s": elapsed})
    report = (
        "# dit-optimum architecture benchmark\n\nSmall-scale numbers: random weights, forward pass only. "
        f"Hardware: {hardware}. Wall time {elapsed:.0f} s.\n\n" + markdown_table(rows)
    )
    (args.output_dir / "report.md").write_text(report)
    console.print(f"Wrote {args.output_dir / 'architecture.json'} and report.md ({elapsed:.0f} s).")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert_diffusers_pipeline, convert_original_checkpoint

    if args.source_format == "original":
        out = convert_original_checkpoint(
            args.source,
            args.output_dir,
            model_name=args.model_name,
            sample_size=args.sample_size,
            num_classes=args.num_classes,
            num_heads=args.num_heads,
            vae=args.vae,
            id2label=args.id2label,
            transformer_only=args.transformer_only,
            overwrite=args.overwrite,
        )
    else:
        out = convert_diffusers_pipeline(
            args.source, args.output_dir, args.original_timestep_embedding, overwrite=args.overwrite
        )
    print(f"Saved {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dit-optimum`` console script."""
    args = _build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        runners = {
            "benchmark": _run_benchmark,
            "evaluate": _run_evaluate,
            "architecture": _run_architecture,
            "convert": _run_convert,
            "quantize": _run_quantize,
            "prune": _run_prune,
        }
        return runners[args.command](args)
    except DiTOptimumError as error:  # known failures: one line; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
