"""Encode images (digits, an imagefolder or a datasets id) to VAE latents once, for latent-space training.

    python scripts/extract_features.py --vae path/to/vae --output-dir latents/ --data digits --image-size 32

Thin wrapper over ``dit_optimum.training.cli.extract_main``.
"""

import sys

from dit_optimum.training.cli import extract_main

if __name__ == "__main__":
    sys.exit(extract_main())
