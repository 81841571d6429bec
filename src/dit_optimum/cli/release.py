"""``dit-optimum release``: one Hub-ready folder per finished cell of a benchmark results folder."""

from __future__ import annotations

import argparse

from ..utils import csv_list
from .common import add_overwrite_argument, input_path, output_path

NAME = "release"
HELP = "Write a Hub-ready folder (pipeline + model card + samples + results) for every finished benchmark cell."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", type=input_path, help="a benchmark output folder (results.json and models/)")
    parser.add_argument("org", help="the Hub user or organisation the repo ids are named under")
    parser.add_argument(
        "--dry-run",
        type=output_path,
        default=None,
        help="write the release folders here and upload nothing (without it: each is uploaded to ORG/<name>)",
    )
    parser.add_argument("--private", action="store_true", help="create new repositories private")
    parser.add_argument("--techniques", type=csv_list, default=None, help="only these cells (comma-separated)")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from ..hub.cards import RESULTS_FILE
    from ..hub.releases import release
    from ..hub.upload import require_token, upload_folder

    if args.dry_run is not None:
        released = release(args.results_dir, args.org, args.dry_run, args.techniques, args.overwrite)
        for item in released:
            print(f"{item.repo_id}: {item.folder}")
        print(f"Wrote {len(released)} release folder(s) into {args.dry_run} (nothing uploaded).")
        return 0
    require_token()  # before any work
    with tempfile.TemporaryDirectory(prefix="dit-optimum-release-") as folder:
        for item in release(args.results_dir, args.org, folder, args.techniques):
            url = upload_folder(item.folder, item.repo_id, RESULTS_FILE, private=args.private)  # ready as released
            print(f"Pushed {item.repo_id}: {url}")
    return 0
