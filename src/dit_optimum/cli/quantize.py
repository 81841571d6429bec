"""``dit-optimum quantize``: quantize (or cast to bf16/fp16) a saved pipeline and save it."""

from __future__ import annotations

import argparse

from ..errors import DiTOptimumError
from ..utils import csv_list
from .common import add_overwrite_argument, check_output, describe_change, output_path

NAME = "quantize"
HELP = "Quantize (or cast to bf16/fp16) a saved pipeline and save it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="pipeline folder")
    parser.add_argument("output_dir", type=output_path)
    add_overwrite_argument(parser)
    parser.add_argument("--backend", default="torchao", help="torch | torchao | quanto")
    parser.add_argument("--weights", default="int8", help="int8 | int4 | float8 | bf16 | fp16")
    parser.add_argument("--activations", default=None, help="int8 | float8 (default: weight-only)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="float dtype of non-quantized layers (default: bfloat16 for torchao, the model's for quanto)",
    )
    parser.add_argument("--keep-float", type=csv_list, default=None, help="module-name prefixes left in float")
    parser.add_argument("--calibration-batches", type=int, default=4, help="(quanto with activations) sampling runs")
    parser.add_argument("--calibration-steps", type=int, default=10, help="(quanto with activations) steps per run")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..pipelines.dit import DiTOptimumPipeline
    from ..techniques.quantization import DEFAULT_KEEP_FLOAT, SUPPORTED, CalibrationSettings, quantize

    key = (args.backend, args.weights, args.activations)
    if key in SUPPORTED and not SUPPORTED[key][0]:
        raise DiTOptimumError(
            f"backend={args.backend!r} with activations={args.activations!r} cannot be saved as a diffusers pipeline; "
            "use --backend torchao --weights int8 --activations int8 for saved int8 activations."
        )
    check_output(args)
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
    describe_change(pipe, quantized, "quantized")
    quantized.save_pretrained(args.output_dir, overwrite=args.overwrite)
    print(f"Saved {args.output_dir}")
    return 0
