"""Pieces several commands share: the ``--overwrite`` flag, the output-folder check, a before/after summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DiTOptimumError
from ..files import check_output_path, check_save_target


def input_path(value: str) -> Path:
    """argparse ``type`` for a path the command reads: an empty value is a usage error (it would mean '.')."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the path is empty: give a file or folder")
    return Path(value).expanduser()


def output_path(value: str) -> Path:
    """argparse ``type`` for a path the command writes: an empty value is a usage error (it would mean '.')."""
    try:
        return check_output_path(value, "path")
    except DiTOptimumError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    check_save_target(args.output_dir, "model_index.json", args.overwrite, "output_dir", sources=[args.source])


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
