"""Domain metrics for labelled data at small scale: a small CNN classifier trained on the fly on the real images.

Inception FID needs thousands of samples and natural images; on 16x16 digits scored with a few hundred samples it
ranks noise. A classifier trained in seconds on the real data's ``fit`` set (``reference.real_split``) gives two
numbers that do mean something there: **conditional accuracy** (the share of generated samples the classifier
assigns to the class they were asked for; its held-out accuracy on real images is the ceiling) and **FD_domain**
(the Frechet distance between generated and real images in the classifier's 64-d feature space). It works for
digits and any labelled image folder or ``datasets`` id; the trained classifier is cached like reference features.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DiTOptimumError
from ..files import write_cache_entry
from ..schemas import CLASSIFIER_METADATA, read_json_file
from .checks import check_features, check_labels
from .declarations import Metric, declare_metric
from .features import clean_resize
from .metrics import frechet_distance, gaussian_statistics
from .reference import RealSplit, cache_dir, dataset_key, digest_indices, real_images

FEATURE_DIM = 64
CLASSIFIER_VERSION = 1  # part of the cache key: bump when the architecture or the training recipe changes
MIN_FIT_PER_CLASS = 5


class DomainClassifier(nn.Module):
    """Three convolutions and a 64-d feature layer; input (B, 3, S, S) in [0, 255] like the FID extractor, output
    ``features`` (B, 64) and ``logits`` (B, classes). Follows the feature-extractor protocol of ``features.py``."""

    def __init__(self, num_classes: int, input_size: int, width: int = 32):
        super().__init__()
        self.input_size = input_size
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.name = "domain_classifier"
        self.weights_hash = "untrained"
        self.feature_dims = {"features": FEATURE_DIM, "logits": num_classes}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(images / 127.5 - 1)
        return {"features": features, "logits": self.head(features)}

    def seal(self, weights_hash: str) -> DomainClassifier:
        """Freeze after training; ``weights_hash`` keys the cached real features of this classifier."""
        self.weights_hash = weights_hash
        return self.eval().requires_grad_(False)


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained: Adam, random shifts of up to 1/8 of the side, seeded; ``epochs`` over the fit
    set, but at most ``max_steps`` batches in all, so a large labelled folder costs no more than the digits do
    (60 epochs of the digits' ~1,000 fit images are ~940 batches; 10,000 images get 12 epochs)."""

    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    max_steps: int = 2000

    def epochs_for(self, num_images: int) -> int:
        """The epochs over ``num_images`` fit images: ``epochs``, fewer where they would pass ``max_steps``."""
        batches = max(1, -(-num_images // self.batch_size))
        return max(1, min(self.epochs, self.max_steps // batches))


def _preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    # uint8 (N, H, W, C) -> float (N, 3, size, size) in [0, 255], as the extractor path resizes generated images
    return clean_resize(images, size) if len(images) else torch.zeros(0, 3, size, size)


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # random translations with edge padding: the generator's digits are not centred exactly like the real ones
    side = images.shape[-1]
    pad = max(1, side // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + side, dx : dx + side]


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: ClassifierRecipe = ClassifierRecipe()
) -> DomainClassifier:
    """A ``DomainClassifier`` fitted to uint8 images (N, H, W, C) and their labels (a few seconds on a CPU)."""
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < MIN_FIT_PER_CLASS:
        raise DiTOptimumError(
            f"The domain classifier needs at least {MIN_FIT_PER_CLASS} real images per class to fit on, but class "
            f"{int(counts.argmin())} has {int(counts.min())} after the reference and floor sets are drawn: lower "
            "`reference_samples` / `num_samples`, or use more real images."
        )
    size = images.shape[1]
    torch.manual_seed(recipe.seed)
    model = DomainClassifier(num_classes, size)
    inputs, targets = _preprocess(images, size), torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    epochs = recipe.epochs_for(len(inputs))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(inputs) // recipe.batch_size))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = F.cross_entropy(model(_shift(inputs[batch], generator))["logits"], targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predictions(model: DomainClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted classes of uint8 images (N, H, W, C)."""
    inputs = _preprocess(images, model.input_size)
    chunks = [
        model(inputs[start : start + batch_size])["logits"].argmax(1) for start in range(0, len(inputs), batch_size)
    ]
    return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.int64)


@dataclass
class TrainedClassifier:
    """The classifier and what it was checked on: accuracy on the real held-out images (reference + floor sets)."""

    model: DomainClassifier
    held_out_accuracy: float
    held_out_samples: int
    num_classes: int


def classifier_cache_path(real: RealSplit, resolution: int, recipe: ClassifierRecipe) -> Path:
    """Where the classifier fitted on ``real``'s fit set at ``resolution`` with ``recipe`` is cached."""
    fit = real.fit
    name = (
        f"{dataset_key(real.dataset)}_{real.split}_{resolution}px_fit{len(fit)}-{digest_indices(fit)}_"
        f"v{CLASSIFIER_VERSION}_{hashlib.sha256(json.dumps(asdict(recipe)).encode()).hexdigest()[:8]}"
    )
    return cache_dir() / "classifiers" / f"{name}.safetensors"


def domain_classifier(
    real: RealSplit, resolution: int, recipe: ClassifierRecipe = ClassifierRecipe(), use_cache: bool = True
) -> TrainedClassifier:
    """The domain classifier of ``real`` at ``resolution``: loaded from the cache, or trained on the fit set, checked
    on the held-out real images and cached. Refuses unlabelled data, naming it."""
    path = classifier_cache_path(real, resolution, recipe)
    if use_cache and path.is_file():
        try:
            state = load_file(path)
            metadata = read_json_file(path.with_suffix(".json"), CLASSIFIER_METADATA)  # counts and accuracy checked
            model = DomainClassifier(metadata["num_classes"], resolution)
            model.load_state_dict(state)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            return TrainedClassifier(
                model.seal(digest), metadata["held_out_accuracy"], metadata["held_out_samples"], metadata["num_classes"]
            )
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
            warnings.warn(f"Domain classifier cache {path} is unreadable ({error}); training it again.", stacklevel=2)
    fit = real_images(real, "fit", resolution)
    if fit.labels is None:
        raise DiTOptimumError(
            f"`reference`={real.dataset!r} has no class labels (a folder without class folders): the domain metrics "
            "(class_accuracy, fd_domain) need labelled real images; use the Inception metrics (fid, sfid, kid)."
        )
    num_classes = max(int(fit.labels.max()) + 1, len(fit.classes))
    model = train_classifier(fit.images, fit.labels, num_classes, recipe)
    held_out = [real_images(real, role, resolution) for role in ("reference", "floor")]
    images = np.concatenate([part.images for part in held_out])
    labels = np.concatenate([part.labels for part in held_out])
    accuracy = float(np.mean(predictions(model, images) == labels)) if len(labels) else float("nan")
    metadata = {"num_classes": num_classes, "held_out_accuracy": accuracy, "held_out_samples": len(labels)}
    if use_cache:
        cached = write_cache_entry(path, lambda temporary: save_file(model.state_dict(), temporary))
        cached = cached and write_cache_entry(
            path.with_suffix(".json"), lambda temporary: temporary.write_text(json.dumps(metadata))
        )
    if use_cache and cached:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    return TrainedClassifier(model.seal(digest), accuracy, len(labels), num_classes)


# --- the metrics -------------------------------------------------------------------------------------------------


def class_accuracy(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Share of samples the classifier assigns to the class they were generated (or labelled) as."""
    logits = check_features("generated domain.logits", generated["domain.logits"])
    return float(np.mean(logits.argmax(axis=1) == check_labels(labels, len(logits))))


def domain_frechet_distance(
    generated: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray
) -> float:
    """Frechet distance between the generated and the real reference set in the classifier's feature space."""
    return frechet_distance(
        gaussian_statistics(generated["domain.features"], "generated features"),
        gaussian_statistics(reference["domain.features"], "reference features"),
    )


CLASS_ACCURACY = declare_metric(
    Metric(
        "class_accuracy",
        "class acc (%)",
        "quality",
        better="higher",
        format="{:.1f}",
        scale=100,
        statistic=class_accuracy,
        features=("domain.logits",),
        description="share of samples the domain classifier assigns to the requested class",
    )
)
DOMAIN_FRECHET = declare_metric(
    Metric(
        "fd_domain",
        "FD_domain",
        "quality",
        format="{:.2f}",
        statistic=domain_frechet_distance,
        features=("domain.features",),
        frechet=True,
        description="Frechet distance to real images in the domain classifier's 64-d feature space",
    )
)
