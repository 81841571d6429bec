"""The ``dit-optimum`` command: a dispatcher over one small module per subcommand (its arguments and its run).

``benchmark`` is the main job; ``optimize`` searches for the best pipeline within a quality budget;
``evaluate``, ``architecture``, ``convert``, ``quantize`` and ``prune`` work on
single pipelines; ``release``, ``push`` and ``export-space`` take results to the Hub.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import DiTOptimumError, error_line
from . import architecture, benchmark, convert, evaluate, export_space, optimize, prune, push, quantize, release

# Each module: NAME, HELP, optional DESCRIPTION, add_arguments(parser), run(args) -> exit code.
COMMANDS = (benchmark, optimize, evaluate, architecture, convert, quantize, prune, release, push, export_space)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one sub-parser per command module."""
    parser = argparse.ArgumentParser(prog="dit-optimum", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        sub = commands.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", None))
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dit-optimum`` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except DiTOptimumError as error:  # known failures: one line; anything else keeps its traceback
        print(error_line(error), file=sys.stderr)
        return 2
    finally:
        end_process_group()


def end_process_group() -> None:
    """Under torchrun, leave the process group before exiting: a process that exits with gloo's threads still
    running can abort ("terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
