"""``dit-optimum push``: upload one pipeline with its model card (rendered from its results) to the Hub."""

from __future__ import annotations

import argparse

from .common import add_overwrite_argument, input_path, output_path

NAME = "push"
HELP = "Upload a pipeline folder with its model card to a Hub repository (token from HF_TOKEN or `hf auth login`)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline_dir", type=input_path, help="a release folder, or any pipeline folder with --results")
    parser.add_argument("repo_id", help="namespace/name")
    parser.add_argument("--results", type=input_path, help="results file with the pipeline's row (default: its own)")
    parser.add_argument("--technique", help="the row of --results that measured this pipeline")
    parser.add_argument("--variant", help="with --technique, when the results hold several variants")
    parser.add_argument("--base-model", help="repo id of the model this one derives from (default: the baseline)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--dry-run", type=output_path, help="write what would be uploaded into this folder, upload nothing"
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..hub.upload import push

    where = push(
        args.pipeline_dir,
        args.repo_id,
        args.results,
        private=args.private,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        technique=args.technique,
        variant=args.variant,
        base_model=args.base_model,
    )
    print(f"Wrote {where} (nothing uploaded)" if args.dry_run else f"Pushed {args.repo_id}: {where}")
    return 0
