"""``dit-optimum benchmark``: the main job, the variants x techniques matrix, resumable, with a report."""

from __future__ import annotations

import argparse
import time

from ..benchmark.settings import add_benchmark_arguments

NAME = "benchmark"
HELP = "The multi-method benchmark: variants x techniques, FID/sFID/KID, GFLOPs, speed, memory, size."
DESCRIPTION = (
    "Runs (or resumes) the matrix and writes results.json/.csv, report.md and plots. With no arguments: the "
    "embedded small-scale run on the digits data (about 12 minutes on 2 CPU cores)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_benchmark_arguments(parser)


def print_table(console, rows, title: str) -> None:
    """The report's results table on the terminal."""
    from rich.table import Table

    from ..benchmark.report import table_columns, table_rows

    table = Table(title=title)
    for index, header in enumerate(table_columns(rows)):
        table.add_column(header, justify="left" if index < 2 else "right")
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from rich.console import Console

    from ..benchmark import run_benchmark, write_report
    from ..benchmark.report import weak_baseline_lines
    from ..benchmark.settings import settings_from_arguments
    from ..techniques.registry import TECHNIQUES

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
    if not settings.speed_only:
        note = f" ({settings.recipe_note})" if settings.recipe_note else ""
        console.print(f"Training recipe: {settings.training.summary()}{note}", highlight=False)

    def report_cell(row) -> None:
        status = "ok" if row["status"] == "ok" else f"FAILED ({row['error']})"
        console.print(  # an error's text is not markup: "dit-optimum[openvino]" must print as written
            f"  {row['variant']} / {row['technique']}: {status} in {row['cell_wall_s']:.0f} s",
            highlight=False,
            markup=False,
        )

    rows = run_benchmark(settings, on_cell=report_cell)
    if not PartialState().is_main_process:  # under torchrun / accelerate launch, one process writes the report
        return 0
    elapsed = time.perf_counter() - start
    notes = [f"Command: `dit-optimum {' '.join(args.argv)}`" if args.argv else "Command: `dit-optimum benchmark`"]
    if args.preset in ("default", "study") and settings.data == "digits" and not settings.speed_only:
        notes.append(
            f"Small-scale numbers: DiT-XS/4 trained for {settings.training.steps} steps (the small-data recipe) on "
            "the 1,797 8x8 scikit-learn digits (upscaled to 16x16) and scored on a CPU with the domain metrics, which "
            "mean something at this scale: a digit classifier's conditional accuracy and the Frechet distance in its "
            "feature space, each with a 95% interval and the real-vs-real floor. They rank techniques on this task; "
            "they are not ImageNet FIDs (use `--preset paper` for those)."
        )
    notes.append(f"Wall time of this run: {elapsed:.0f} s (cells finished in earlier runs were skipped).")
    report = write_report(rows, settings.output_dir, notes=notes)
    print_table(console, rows, f"dit-optimum benchmark ({settings.output_dir})")
    for line in weak_baseline_lines(rows):
        console.print(f"[bold red]Weak baseline[/] {line}", highlight=False)
    failed = [row for row in rows if row.get("status") != "ok"]
    console.print(f"Wrote {report} and {settings.output_dir}/results.json ({elapsed:.0f} s; {len(failed)} failed).")
    return 1 if failed else 0
