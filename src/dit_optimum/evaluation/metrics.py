"""Distribution distances between feature sets: Frechet distance (FID, sFID) and unbiased KID.

Frechet distances need a full-rank covariance estimate, so they refuse fewer samples than feature dimensions + 1;
KID (an unbiased MMD estimate with the cubic polynomial kernel) is unbiased at any N >= 2 and is the comparable
number for small-N runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from ..errors import DiTOptimumError
from ..models.resources import check_resources
from ..utils import check_positive_integers
from .checks import check_features, check_finite_result


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean and covariance of a feature set, and how many samples they came from."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int


def minimum_samples_for_frechet(dimension: int) -> int:
    """Fewest samples whose covariance can be full rank in ``dimension`` features."""
    return dimension + 1


def gaussian_statistics(features: np.ndarray, name: str = "features") -> GaussianStatistics:
    """Mean and (unbiased) covariance of (N, D) features; refuses N <= D, where the covariance is singular."""
    features = check_features(name, features, minimum=0)
    count, dimension = features.shape
    needed = minimum_samples_for_frechet(dimension)
    if count < needed:
        raise DiTOptimumError(
            f"`{name}` has N={count} samples of {dimension}-d features: a Frechet distance (FID/sFID) needs "
            f"N >= {needed} for a full-rank covariance. Use more samples, or KID, which is unbiased at small N."
        )
    with np.errstate(over="ignore", invalid="ignore"):
        mean, covariance = features.mean(axis=0), np.cov(features, rowvar=False)
    if not (np.isfinite(mean).all() and np.isfinite(covariance).all()):
        raise DiTOptimumError(
            f"`{name}` is too large for float64 statistics (its covariance overflows): rescale the features."
        )
    return GaussianStatistics(mean, covariance, count)


def frechet_distance(first: GaussianStatistics, second: GaussianStatistics, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (as in clean-fid and the FID paper)."""
    if first.mean.shape != second.mean.shape:
        raise DiTOptimumError(f"Feature dimensions differ: {first.mean.shape} vs {second.mean.shape}.")
    difference = first.mean - second.mean
    with np.errstate(over="ignore", invalid="ignore"):
        product = first.covariance @ second.covariance
    check_finite_result("The product of the two covariances", float(np.abs(product).max(initial=0.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covariance_mean = linalg.sqrtm(product)
        if not np.isfinite(covariance_mean).all():
            # Near-singular product: shift both covariances slightly, as the reference implementations do.
            offset = np.eye(len(first.mean)) * eps
            covariance_mean = linalg.sqrtm((first.covariance + offset) @ (second.covariance + offset))
    covariance_mean = np.real(covariance_mean)
    distance = (
        difference @ difference
        + np.trace(first.covariance)
        + np.trace(second.covariance)
        - 2 * np.trace(covariance_mean)
    )
    distance = check_finite_result("The Frechet distance", distance)
    return max(0.0, distance)  # a distance: rounding of two near-identical sets must not go below 0


def _polynomial_mmd_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    # k(a, b) = (a.b / d + 1)^3; unbiased MMD^2 drops the diagonal of the within-set kernel matrices.
    dimension = x.shape[1]
    k_xx = (x @ x.T / dimension + 1) ** 3
    k_yy = (y @ y.T / dimension + 1) ** 3
    k_xy = (x @ y.T / dimension + 1) ** 3
    m, n = len(x), len(y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(
    generated: np.ndarray,
    reference: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Unbiased KID (MMD^2, cubic polynomial kernel): mean and standard deviation over random subsets.

    Subsets hold ``min(subset_size, N_generated, N_reference)`` samples of each set; with that equal to both N
    every subset is the whole set and the estimate is exact.
    """
    check_positive_integers(num_subsets=num_subsets, subset_size=subset_size)
    check_resources(seed=seed, parameter="seed")
    generated = check_features("generated features", generated, minimum=0)
    reference = check_features("reference features", reference, minimum=0)
    if generated.shape[1] != reference.shape[1]:
        raise DiTOptimumError(f"KID needs (N, D) features of equal D, got {generated.shape} and {reference.shape}.")
    size = min(subset_size, len(generated), len(reference))
    if size < 2:
        raise DiTOptimumError(f"KID needs at least 2 samples in each set, got {len(generated)} and {len(reference)}.")
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore", invalid="ignore"):
        values = [
            _polynomial_mmd_unbiased(
                generated[rng.choice(len(generated), size, replace=False)],
                reference[rng.choice(len(reference), size, replace=False)],
            )
            for _ in range(num_subsets)
        ]
        mean, spread = float(np.mean(values)), float(np.std(values))
    return check_finite_result("KID", mean), spread
