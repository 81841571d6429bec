"""``dit-optimum optimize``: the best pipeline on a target within a quality budget, with its card and report."""

from __future__ import annotations

import argparse

NAME = "optimize"
HELP = "Search the registered stacks for the fastest (or smallest) pipeline within a quality budget."
DESCRIPTION = (
    "Tries stacks of pruning with recovery, step distillation, solvers, precisions, CPU runtimes and saved step "
    "caches on PIPELINE, judges each against it with the benchmark's paired test, and writes the best one with its "
    "card, a report of every candidate and the search log into --output-dir (a killed search resumes there)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.quality import add_quality_arguments
    from ..optimizer.budget import NO_SIGNIFICANT_CHANGE
    from ..optimizer.costs import TARGETS
    from ..utils import csv_list

    parser.add_argument("pipeline", help="the baseline pipeline (a folder or a Hub id)")
    parser.add_argument(
        "--budget",
        default=NO_SIGNIFICANT_CHANGE,
        help=f"{NO_SIGNIFICANT_CHANGE} (default), or METRIC=DROP,... e.g. class_accuracy=1,fd_domain=10 (points for "
        "accuracy, percent of the baseline for distances)",
    )
    parser.add_argument("--target", default="sampling", help=f"what to make best: {' | '.join(TARGETS)}")
    parser.add_argument("--time-budget", type=float, default=600.0, help="seconds of search in all (default 600)")
    parser.add_argument("--max-size", type=float, help="largest saved size allowed, as a fraction of the baseline's")
    parser.add_argument("--data", help="training data of recoveries and students (default: --reference)")
    parser.add_argument("--screen-samples", type=int, default=100, help="N of the cheap screen (0: none)")
    parser.add_argument("--bases", type=csv_list, help="search only these registered bases (default: all)")
    parser.add_argument("--paths", type=csv_list, help="search only these forward paths (default: all that run here)")
    parser.add_argument("--repo-id", default=None, help="the Hub id the card's loading line names")
    parser.add_argument("--output-dir", default="optimized")
    add_quality_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..benchmark.settings import BenchmarkSettings
    from ..evaluation.quality import quality_settings_from_arguments
    from ..optimizer.api import DEFAULT_REPO_ID, optimize

    defaults = BenchmarkSettings()
    quality = quality_settings_from_arguments(args, replace(defaults.quality, reference=args.reference or "digits"))
    speed = replace(
        defaults.speed,
        num_inference_steps=quality.num_inference_steps,
        guidance_scale=quality.guidance_scale,
    )
    result = optimize(
        args.pipeline,
        reference=quality.reference,
        budget=args.budget,
        target=args.target,
        output_dir=args.output_dir,
        time_budget=args.time_budget,
        max_size=args.max_size,
        data=args.data,
        quality=quality,
        speed=speed,
        repo_id=args.repo_id or DEFAULT_REPO_ID,
        screen_samples=args.screen_samples,
        bases=args.bases,
        paths=args.paths,
    )
    row = result.row
    span = row.get("sampling_speedup_range") or [0, 0]
    print(
        f"Chose {result.search.candidate.name}: sampling {row['sampling_speedup']:.2f}x [{span[0]:.2f}, "
        f"{span[1]:.2f}] vs the baseline on {row['hardware']['cpu']}, verdict: {row.get('quality_verdict')}; "
        f"{len(result.search.records)} candidates in {result.search.elapsed_s:.0f} s."
    )
    print(f"Wrote {result.pipeline_dir} (pipeline + card), {result.report} and {result.output_dir / 'search.json'}.")
    return 0
