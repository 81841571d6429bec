"""`accelerate launch scripts/train_lora.py --pretrained PIPE --data DATA --output-dir runs/x ...` (or `python`, or
`torchrun --nproc_per_node N`): fine-tune a pretrained pipeline on new data and classes with LoRA (or
`--finetune bias_norm` / `full`). The adapter lands in `<output-dir>/lora`, the merged pipeline in
`<output-dir>/pipeline`.

Thin wrapper over `dit_optimum.training.cli`; `--help` lists the options.
"""

import sys

from dit_optimum.training.cli import main

if __name__ == "__main__":
    sys.exit(main("lora"))
