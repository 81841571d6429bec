"""``dit-optimum prune``: structurally prune heads, MLP width and blocks of a saved pipeline and save it."""

from __future__ import annotations

import argparse

from .common import add_overwrite_argument, check_output, describe_change, output_path

NAME = "prune"
HELP = "Structurally prune heads, MLP width and blocks of a saved pipeline."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="pipeline folder")
    parser.add_argument("output_dir", type=output_path)
    add_overwrite_argument(parser)
    parser.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads to remove")
    parser.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP hidden units to remove")
    parser.add_argument("--depth", type=float, default=0.0, help="fraction of blocks to remove")
    parser.add_argument("--importance", default="l1", help="l1 | l2 | taylor | random")
    parser.add_argument("--scope", default="layer", help="layer | global")


def run(args: argparse.Namespace) -> int:
    from ..pipelines.dit import DiTOptimumPipeline
    from ..techniques.pruning import prune

    check_output(args)
    pipe = DiTOptimumPipeline.from_pretrained(args.source)
    pruned = prune(pipe, heads=args.heads, mlp=args.mlp, depth=args.depth, importance=args.importance, scope=args.scope)
    describe_change(pipe, pruned, "pruned")
    pruned.save_pretrained(args.output_dir, overwrite=args.overwrite)
    print(f"Saved {args.output_dir}")
    return 0
