"""The study's metrics on Inception features: FID (pool3), sFID (``mixed_6/conv``) and KID, as declared metrics.

They are kept for comparability with the study and for ImageNet-scale runs; at small scale the domain metrics
(``domain.py``) are the ones that mean something. Features are keyed ``inception.pool`` / ``inception.spatial``.
"""

from __future__ import annotations

import numpy as np
import torch

from .declarations import Metric, declare_metric
from .features import FeatureExtractor, InceptionFeatures
from .metrics import frechet_distance, gaussian_statistics, kernel_inception_distance

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# Each resample of a 2048-d Frechet distance or of KID costs seconds: their intervals use at most this many.
INCEPTION_RESAMPLES = 20


def inception_extractor(weights: str | None = None, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The FID Inception network (weights from ``weights`` or the offline search order)."""
    return InceptionFeatures(weights).to(device)


def fid(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Frechet distance of Inception pool3 features."""
    return frechet_distance(
        gaussian_statistics(generated["inception.pool"], "generated features"),
        gaussian_statistics(reference["inception.pool"], "reference features"),
    )


def sfid(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Frechet distance of Inception ``mixed_6/conv`` spatial features (first 7 channels, 2023-d)."""
    return frechet_distance(
        gaussian_statistics(generated["inception.spatial"], "generated features"),
        gaussian_statistics(reference["inception.spatial"], "reference features"),
    )


def kid(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Unbiased KID of Inception pool3 features (mean over subsets of up to ``KID_SUBSET_SIZE``)."""
    return kernel_inception_distance(
        generated["inception.pool"], reference["inception.pool"], KID_SUBSETS, KID_SUBSET_SIZE
    )[0]


FID = declare_metric(
    Metric(
        "fid",
        "FID",
        "quality",
        statistic=fid,
        features=("inception.pool",),
        frechet=True,
        max_resamples=INCEPTION_RESAMPLES,
        description="Frechet Inception distance (pool3, 2048-d)",
    )
)
SFID = declare_metric(
    Metric(
        "sfid",
        "sFID",
        "quality",
        statistic=sfid,
        features=("inception.spatial",),
        frechet=True,
        max_resamples=INCEPTION_RESAMPLES,
        description="Frechet distance of Inception spatial features (2023-d)",
    )
)
KID = declare_metric(
    Metric(
        "kid",
        "KIDx1e3",
        "quality",
        scale=1e3,
        statistic=kid,
        features=("inception.pool",),
        max_resamples=INCEPTION_RESAMPLES,
        description="kernel Inception distance (unbiased MMD, cubic kernel)",
    )
)
