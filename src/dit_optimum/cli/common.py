"""Pieces several commands share: the ``--overwrite`` flag, the output-folder check, a before/after summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DiTOptimumError
from ..utils import check_save_target


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds other files (they are left alone) or replace a file at that path",
    )


def check_output(args: argparse.Namespace) -> None:
    """Before any work: the output folder must be safe to write, and not the source pipeline itself."""
    if not args.overwrite and Path(args.output_dir).resolve() == Path(args.source).resolve():
        raise DiTOptimumError(
            f"`output_dir`={str(args.output_dir)!r} is the source pipeline: the result would replace the original. "
            "Choose another folder, or pass --overwrite to replace it."
        )
    check_save_target(args.output_dir, "model_index.json", args.overwrite, "output_dir")


def describe_change(before, after, label: str) -> None:
    """Print parameters (and GFLOPs when pruned) before -> after, and how far the outputs moved (same seed)."""
    from ..evaluation.fidelity import compare_pipelines
    from ..evaluation.flops import count_gflops, count_parameters

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
