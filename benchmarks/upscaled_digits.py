"""A 32x32 real image folder made from the embedded digits: the check of a baseline on "the user's own data".

    .venv/bin/python benchmarks/upscaled_digits.py FOLDER [--variants 6] [--seed 0]
    dit-optimum benchmark --data FOLDER --reference FOLDER --image-size 32 --channels 1 --techniques baseline

Each of scikit-learn's 1,797 8x8 digits is upscaled bilinearly to 24x24 and padded to 32x32 (an MNIST-like layout:
28x28-style content with a border), then drawn ``variants`` times with light augmentation (a rotation of up to 10
degrees and a shift of up to 2 pixels; the first variant is the plain image). With the default 6 variants the folder
holds 10,782 grey PNGs in ten class folders ``0`` .. ``9``, the scale of a user's 10,000-image set.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 32
CONTENT = 24  # the digit's box inside the 32x32 image
MAX_ROTATION = 10.0  # degrees
MAX_SHIFT = 2  # pixels


def upscaled_digit(pixels: np.ndarray, angle: float = 0.0, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """One 8x8 digit (values 0-16) as a 32x32 grey image: bilinear to 24x24, centred, rotated, shifted."""
    small = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    content = small.resize((CONTENT, CONTENT), Image.BILINEAR)
    canvas = Image.new("L", (SIDE, SIDE), 0)
    offset = (SIDE - CONTENT) // 2
    canvas.paste(content, (offset + shift[0], offset + shift[1]))
    if angle:
        canvas = canvas.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
    return canvas


def write_upscaled_digits(folder: str | Path, variants: int = 6, seed: int = 0, limit: int | None = None) -> Path:
    """Write the digits as an image folder ``folder/<digit>/<index>_<variant>.png`` (``limit`` digits only, for
    tests); returns ``folder``. Deterministic for a ``seed``."""
    from sklearn.datasets import load_digits

    if variants < 1:
        raise ValueError(f"`variants`={variants!r} must be at least 1.")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    count = len(digits.images) if limit is None else min(limit, len(digits.images))
    for index in range(count):
        for variant in range(variants):
            if variant == 0:
                angle, shift = 0.0, (0, 0)
            else:
                angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
                shift = (int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1)), int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1)))
            image = upscaled_digit(digits.images[index], angle, shift)
            image.save(folder / str(digits.target[index]) / f"{index:04d}_{variant}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--variants", type=int, default=6, help="images per digit (the first one unaugmented)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = write_upscaled_digits(args.folder, args.variants, args.seed)
    total = sum(1 for _ in folder.glob("*/*.png"))
    print(f"Wrote {total} images ({math.ceil(total / 10)} per class on average) to {folder}.")


if __name__ == "__main__":
    main()
