"""`accelerate launch scripts/train.py --output-dir runs/x ...` (or `python`, or `torchrun --nproc_per_node N`).

Thin wrapper over `dit_optimum.training.cli`; `--help` lists the options.
"""

import sys

from dit_optimum.training.cli import main

if __name__ == "__main__":
    sys.exit(main("base"))
