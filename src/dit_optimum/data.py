"""Image and dataset loaders shared by training and evaluation: images as in-memory tensors with labels.

Sources: ``"digits"`` (scikit-learn's 1,797 8x8 handwritten digits, 10 classes; ships with the package, no
download), an image folder (one sub-folder per class, as torchvision's ``ImageFolder`` and ``datasets``'
imagefolder read it), a latents folder written by ``training.data.extract_latents``, or a ``datasets`` id with
``image`` and ``label`` columns. Hidden files and folders are never read; what is skipped is reported.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DiTOptimumError
from .schemas import LATENTS_METADATA as LATENTS_METADATA_SCHEMA
from .schemas import FileContentError, read_json_file, require_regular_file
from .utils import check_source

LATENTS_METADATA = "dit_optimum_latents.json"
# torchvision's ImageFolder extensions, plus GIF; matched case-insensitively.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
SOURCES = "'digits', an image folder (<folder>/<class>/<images>), a latents folder, or a datasets id"
# What reading a bad image raises: corrupt or truncated data, unknown formats and modes, too many pixels.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning)
_SHOWN = 5  # files named in a warning; the rest are counted


@dataclass
class TrainingData:
    """Samples (N, C, H, W) in the model's input space ([-1, 1] for images), labels (N,), class names, the VAE
    the samples need (latents only), and the files left out: unreadable images skipped (``skip_corrupt``) and
    files that are not images in a class folder."""

    samples: torch.Tensor
    labels: torch.Tensor
    id2label: dict[int, str] = field(default_factory=dict)
    vae: str | None = None
    skipped_files: list[Path] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def skipped(self) -> int:
        """How many unreadable images were skipped."""
        return len(self.skipped_files)


@dataclass
class ImageFiles:
    """The image files under a folder (sorted, recursive) and the other files found there."""

    images: list[Path]
    ignored: list[Path]


def list_image_files(root: str | Path) -> ImageFiles:
    """Every image file under ``root`` at any depth (by extension, sorted by path), and the non-image files.

    Hidden files and folders (name starting with ``.``, e.g. ``.ipynb_checkpoints``) are left out entirely, as
    ``datasets``' imagefolder does. Linked folders are followed, each real folder once (no loops).
    """
    root = Path(root)
    images, ignored, seen = [], [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=_unlistable):
        real = os.path.realpath(folder)
        if real in seen:  # reached again through a link: listed already
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))  # sorted: links resolve alike
        for name in names:
            if not name.startswith("."):
                is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                (images if is_image else ignored).append(Path(folder) / name)
    return ImageFiles(sorted(images), sorted(ignored))


def _unlistable(error: OSError) -> None:
    raise DiTOptimumError(f"Cannot list folder {error.filename}: {error.strerror}.") from error


def warn_files(summary: str, files: list[Path], root: Path, details: dict[Path, str] | None = None) -> None:
    """Warn ``summary``, naming the first few ``files`` (relative to ``root``, with their ``details``) and counting
    the rest."""
    details = details or {}
    shown = [str(path.relative_to(root)) + (f" ({details[path]})" if path in details else "") for path in files]
    more = f" and {len(files) - _SHOWN} more" if len(files) > _SHOWN else ""
    warnings.warn(f"{summary}: {', '.join(shown[:_SHOWN])}{more}.", stacklevel=3)


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    # images: (N, C, h, w) in [0, 1] -> (N, C, image_size, image_size) in [-1, 1]
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).contiguous()


def digits_data(image_size: int = 16, channels: int = 1) -> TrainingData:
    """scikit-learn's digits (8x8, 16 grey levels), upscaled bilinearly to ``image_size``; labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    samples = _resize(images, image_size).repeat(1, channels, 1, 1)
    return TrainingData(samples, torch.tensor(digits.target, dtype=torch.long), {i: str(i) for i in range(10)})


def _unit_pixels(image: Image.Image) -> np.ndarray:
    """Any PIL mode as float32 in [0, 1]: (H, W) for grey modes, (H, W, 3) for colour ones.

    Integer grey (``I``, ``I;16*``: what 16-bit PNGs and TIFFs open as) is scaled by 65535, float grey (``F``) is
    taken as [0, 1], palettes are looked up, CMYK and other colour spaces converted, alpha dropped (as torchvision's
    loader does).
    """
    if image.mode.startswith("I"):
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0, 1)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    if image.mode in ("1", "L", "LA", "La"):
        return np.asarray(image.getchannel(0).convert("L"), dtype=np.float32) / 255.0
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette colours (and transparency) looked up
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _to_tensor(pixels: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    """(H, W) or (H, W, 3) in [0, 1] -> (channels, image_size, image_size) in [-1, 1]; colour to grey by luma."""
    if channels not in (1, 3):
        raise DiTOptimumError(f"`channels`={channels!r} must be 1 (grey) or 3 (RGB).")
    if pixels.ndim == 3 and channels == 1:
        pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's "L"
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], channels, axis=-1)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    return _resize(tensor[None], image_size)[0]


def pil_to_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image (any mode) as (channels, image_size, image_size) in [-1, 1] (bilinear resize)."""
    return _to_tensor(_unit_pixels(image), image_size, channels)


def _read_pixels(path: str | Path) -> np.ndarray:
    """An image file's pixels (``_unit_pixels``). PIL's errors pass through (``_UNREADABLE``), its decompression-bomb
    warning (more pixels than ``Image.MAX_IMAGE_PIXELS``) raised as an error."""
    require_regular_file(path)  # a FIFO or device named like an image would block or never end the read
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return _unit_pixels(image)


def load_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """An image file as ``pil_to_tensor`` gives it; one that cannot be read (not an image, corrupt, truncated, a
    decompression bomb) raises naming it."""
    try:
        pixels = _read_pixels(path)
    except _UNREADABLE as error:
        raise DiTOptimumError(f"Unreadable image {path}: {error}") from error
    return _to_tensor(pixels, image_size, channels)


def image_folder_data(root: str | Path, image_size: int, channels: int = 3, skip_corrupt: bool = False) -> TrainingData:
    """Images under ``root/<class>/`` at any depth, labelled by class folder in sorted order (``ImageFolder``).

    Hidden entries are left out; files that are not images (or lie outside a class folder) are ignored with a
    warning; a class folder without images is refused. An unreadable image raises naming the file, or with
    ``skip_corrupt`` is skipped and listed (``skipped_files``).
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DiTOptimumError(f"`data`={str(root)!r} has no class sub-folders (expected root/<class>/<image files>).")
    listing = list_image_files(root)
    in_class = [path for path in listing.images if len(path.relative_to(root).parts) > 1]
    outside = [path for path in listing.images if len(path.relative_to(root).parts) == 1]
    ignored = sorted(listing.ignored + outside)
    if ignored:
        warn_files(f"Ignored {len(ignored)} file(s) under {root} (not images, or not in a class folder)", ignored, root)
    label_of = {name: label for label, name in enumerate(classes)}
    labels = [label_of[path.relative_to(root).parts[0]] for path in in_class]
    _refuse_empty_classes(root, classes, set(labels), f"without images ({', '.join(IMAGE_EXTENSIONS)})")
    samples, kept, reasons = [], [], {}
    for path, label in zip(in_class, labels):
        try:
            pixels = _read_pixels(path)
        except _UNREADABLE as error:
            if not skip_corrupt:
                raise DiTOptimumError(
                    f"Unreadable image {path}: {error}. Fix or remove it, or pass skip_corrupt=True (--skip-corrupt) "
                    "to skip unreadable images."
                ) from error
            reasons[path] = str(error)
            continue
        samples.append(_to_tensor(pixels, image_size, channels))
        kept.append(label)
    skipped = list(reasons)
    if skipped:
        warn_files(f"Skipped {len(skipped)} unreadable image(s) under {root}", skipped, root, reasons)
    _refuse_empty_classes(root, classes, set(kept), "with no readable images")
    return TrainingData(
        torch.stack(samples), torch.tensor(kept), dict(enumerate(classes)), skipped_files=skipped, ignored_files=ignored
    )


def _refuse_empty_classes(root: Path, classes: list[str], present: set[int], what: str) -> None:
    empty = [name for label, name in enumerate(classes) if label not in present]
    if empty:
        names = ", ".join(repr(name) for name in empty)
        raise DiTOptimumError(
            f"`data`={str(root)!r} has class folder(s) {what}: {names}. Add images or remove the folder(s): "
            "every class needs samples."
        )


def _read_latents_metadata(path: Path) -> dict:
    """The metadata ``extract_latents`` writes: ``{"vae": str, "id2label": {"<int>": str}}``, checked."""
    try:
        return read_json_file(path, LATENTS_METADATA_SCHEMA, f"Latents metadata {path}")
    except FileContentError as error:
        raise DiTOptimumError(f"{str(error).rstrip('.')}: extract the latents again.") from None


def latents_data(root: str | Path) -> TrainingData:
    """Latents written by ``extract_latents`` (a ``datasets`` folder plus metadata naming the VAE)."""
    from datasets import load_from_disk

    root = Path(root)
    metadata = _read_latents_metadata(root / LATENTS_METADATA)
    for entry in root.iterdir():  # datasets opens them: a FIFO among them would block the load forever
        if not entry.is_dir():
            require_regular_file(entry)
    try:
        dataset = load_from_disk(str(root)).with_format("numpy")
        latents, labels = np.asarray(dataset["latents"]), np.asarray(dataset["label"])
    except (OSError, ValueError, KeyError) as error:
        raise DiTOptimumError(
            f"`data`={str(root)!r} is not a readable latents folder ({type(error).__name__}: {error}): extract the "
            "latents again."
        ) from error
    return TrainingData(
        torch.as_tensor(latents, dtype=torch.float32),
        torch.as_tensor(labels, dtype=torch.long),
        {int(k): v for k, v in metadata.get("id2label", {}).items()},
        vae=metadata["vae"],
    )


def load_hub_dataset(name: str, split: str = "train", parameter: str = "data", columns: tuple[str, ...] = ("image",)):
    """``datasets.load_dataset(name, split=split)``, refused naming ``parameter`` when it cannot be loaded (offline:
    not in the local cache) or lacks ``columns``."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as error:
        raise DiTOptimumError(
            f"`{parameter}`={name!r} is neither a local folder nor a dataset available offline "
            f"({type(error).__name__}: {error}). Give {SOURCES}."
        ) from error
    except (OSError, ValueError) as error:
        raise DiTOptimumError(
            f"`{parameter}`={name!r} (split {split!r}) could not be loaded: {type(error).__name__}: {error}"
        ) from error
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise DiTOptimumError(
            f"`{parameter}`={name!r} has no {', '.join(missing)} column(s) (it has {', '.join(dataset.column_names)})."
        )
    return dataset


def hub_data(name: str, image_size: int, channels: int = 3, split: str = "train") -> TrainingData:
    """A ``datasets`` dataset (Hub id or local script) with ``image`` and ``label`` columns."""
    dataset = load_hub_dataset(name, split, columns=("image", "label"))
    images = [pil_to_tensor(example["image"], image_size, channels) for example in dataset]
    names = getattr(dataset.features["label"], "names", None)
    return TrainingData(torch.stack(images), torch.tensor(dataset["label"]), dict(enumerate(names or [])))


def source_kind(source: str, parameter: str = "data") -> str:
    """What ``source`` names: ``"digits"``, ``"latents"`` (from ``extract_latents``), ``"folder"`` (an image folder)
    or ``"dataset"`` (a ``datasets`` id); a missing path, a file, or a saved dataset without latents metadata is
    refused naming ``parameter``."""
    if source == "digits":
        return "digits"
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / LATENTS_METADATA).exists():  # a FIFO there is refused when read, never waited on
            return "latents"
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            raise DiTOptimumError(
                f"`{parameter}`={source!r} is a saved dataset with no {LATENTS_METADATA} (written by "
                "extract_features.py beside the latents): extract the latents again, or give an image folder."
            )
        return "folder"
    if path.exists():
        raise DiTOptimumError(f"`{parameter}`={source!r} is a file; give {SOURCES}.")
    check_source(source, parameter)  # a mistyped path is not looked up as a dataset id
    return "dataset"


def load_training_data(
    source: str = "digits", image_size: int = 16, channels: int = 1, skip_corrupt: bool = False
) -> TrainingData:
    """Dispatch on ``source``: ``"digits"``, a latents folder, an image folder, or a ``datasets`` id."""
    kind = source_kind(source)
    if kind == "digits":
        return digits_data(image_size, channels)
    path = Path(source).expanduser()
    if kind == "latents":
        return latents_data(path)
    if kind == "folder":
        return image_folder_data(path, image_size, channels, skip_corrupt)
    return hub_data(source, image_size, channels)
