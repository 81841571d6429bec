"""``dit-optimum architecture``: parameters, GFLOPs and forward time of every attention type (random weights)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..configs import preset_names
from ..models.attention import ATTENTION_TYPES
from ..utils import csv_list
from .common import output_path

NAME = "architecture"
HELP = "Parameters, GFLOPs and forward time of every attention type (random weights)."
COLUMNS = ("model", "attention", "tokens", "params (M)", "GFLOPs", "attn-core GFLOPs", "forward (s)", "vs sdpa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--presets",
        type=csv_list,
        default=["DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"],
        help=f"comma-separated presets; allowed: {', '.join(preset_names())}",
    )
    parser.add_argument(
        "--attention-types",
        type=csv_list,
        default=list(ATTENTION_TYPES),
        help=f"comma-separated; allowed: {', '.join(ATTENTION_TYPES)}",
    )
    parser.add_argument(
        "--sample-sizes",
        type=lambda v: [int(x) for x in csv_list(v)],
        default=[32],
        help="input sides (latent 32 = 256 tokens at patch 2)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", type=output_path, default=Path("benchmark-results/architecture"))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..benchmark.architecture import architecture_benchmark, markdown_table
    from ..evaluation.hardware import hardware_description
    from ..files import check_writable, claim_files, write_json, write_text

    claim_files(args.output_dir, ["architecture.json", "report.md"])
    check_writable(args.output_dir)
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
    for column in COLUMNS:
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
    write_json(args.output_dir, "architecture.json", {"hardware": hardware, "rows": rows, "wall_s": elapsed})
    report = (
        "# dit-optimum architecture benchmark\n\nSmall-scale numbers: random weights, forward pass only. "
        f"Hardware: {hardware}. Wall time {elapsed:.0f} s.\n\n" + markdown_table(rows)
    )
    write_text(args.output_dir, "report.md", report)
    console.print(f"Wrote {args.output_dir / 'architecture.json'} and report.md ({elapsed:.0f} s).")
    return 0
