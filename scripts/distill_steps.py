"""`accelerate launch scripts/distill_steps.py --output-dir runs/x --pretrained runs/base/pipeline --student-steps 4`
(or `python`, or `torchrun --nproc_per_node N`): progressive step distillation, one round (the student samples in
--student-steps unguided DDIM steps; chain rounds by passing the previous student as --pretrained).

Thin wrapper over `dit_optimum.training.cli`; `--help` lists the options.
"""

import sys

from dit_optimum.training.cli import main

if __name__ == "__main__":
    sys.exit(main("steps"))
