"""``dit-optimum export-space``: a ready Hugging Face Space (Gradio demo) for a folder of releases."""

from __future__ import annotations

import argparse

from .common import add_overwrite_argument, input_path, output_path

NAME = "export-space"
HELP = "Write a Hugging Face Space (Gradio app, pinned requirements, front matter) for a folder of releases."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release_dir", type=input_path, help="the folder `dit-optimum release` wrote")
    parser.add_argument("output_dir", type=output_path, help="the Space folder to write")
    parser.add_argument("--title", default=None, help="the Space's title")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..hub.space import DEFAULT_TITLE, export_space

    folder = export_space(args.release_dir, args.output_dir, args.title or DEFAULT_TITLE, args.overwrite)
    print(f"Wrote the Space to {folder}; upload it with `hf upload --repo-type space NAME {folder}`.")
    return 0
