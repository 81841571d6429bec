"""Convert an original DiT / fast-DiT checkpoint, or a stock diffusers DiT folder, to a dit-optimum pipeline.

    python scripts/convert_dit_checkpoint.py original DiT-XL-2-256x256.pt out/ \
        --model DiT-XL/2 --vae stabilityai/sd-vae-ft-ema
    python scripts/convert_dit_checkpoint.py diffusers facebook/DiT-XL-2-256 out/ --original-timestep-embedding

Thin wrapper over ``dit-optimum convert`` (``dit_optimum.conversion``); the key mapping is documented there.
"""

import sys

from dit_optimum.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
