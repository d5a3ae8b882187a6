"""Distances between two sets of image features: Fréchet distance, KID, precision/recall/density/coverage.

Features are float arrays [N, D] (one row per image, see `training.evaluate.features`). Every function
here is pure numpy/scipy on features; which network made them is the caller's protocol.

- Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
  local Nash equilibrium"; FID when the features are InceptionV3 pool features):
  ``|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½)``. The trace of the cross term is taken in
  this symmetric form, from eigenvalues of symmetric positive semi-definite matrices (negative rounding
  clipped to 0), so it stays real and finite when the covariances are singular (N < D) where
  ``scipy.linalg.sqrtm(S1 @ S2)`` returns complex values or blows up.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD² estimate under the cubic
  polynomial kernel ``k(x, y) = (x·y / D + 1)³``, averaged over random subsets, with its standard
  deviation over the subsets.
- Precision, recall, density, coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics
  for generative models"), k = 5, computed by the authors' `prdc` package.
- Percentile-bootstrap confidence intervals over images for any of them (`bootstrap_interval`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

PRDC_NEAREST_K = 5  # Naeem et al. 2020's recommended k
KID_SUBSETS = 100  # torch-fidelity's and stylegan2-ada's default
KID_SUBSET_SIZE = 1000


class TooFewSamples(ValueError):
    """A metric got fewer images than it needs; the message says how many it needs."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap confidence interval (`confidence`, e.g. 0.95)."""

    value: float
    low: float | None
    high: float | None
    confidence: float
    resamples: int

    def to_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "confidence": self.confidence,
                "bootstrap": self.resamples}


def _as_features(features: np.ndarray, name: str, minimum: int) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, D] features, got shape {list(array.shape)}")
    if len(array) < minimum:
        raise TooFewSamples(f"{name} has {len(array)} images; this metric needs at least {minimum}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite features ({int((~np.isfinite(array)).sum())} values)")
    return array


def mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (N − 1 in the denominator) of features [N, D], N ≥ 2."""
    array = _as_features(features, "features", 2)
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (negative rounding
    clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                                     sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means [D], covariances [D, D].

    Returns a float ≥ 0 (squared feature units). Raises ValueError for mismatched shapes.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances "
                         f"{sigma1.shape} and {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    difference = mu1 - mu2
    distance = float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_cross)
    return max(distance, 0.0)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to features [N1, D] and [N2, D] (N ≥ 2 each)."""
    return frechet_distance_from_statistics(*mean_and_covariance(real), *mean_and_covariance(fake))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, *, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID: (mean, standard deviation) over `subsets` random subsets of the unbiased MMD² estimate.

    real, fake: features [N, D]; each subset draws min(subset_size, N_real, N_fake) rows of each set
    without replacement. Unbiased: on two draws of one distribution its expectation is 0 (it can be
    negative). Raises TooFewSamples below 2 images per set.
    """
    real, fake = _as_features(real, "real", 2), _as_features(fake, "fake", 2)
    size = min(subset_size, len(real), len(fake))
    dim = real.shape[1]
    rng = np.random.default_rng(seed)
    estimates = np.empty(subsets)
    for index in range(subsets):
        x = real[rng.choice(len(real), size, replace=False)]
        y = fake[rng.choice(len(fake), size, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        off_diagonal = size * (size - 1)
        estimates[index] = ((k_xx.sum() - np.trace(k_xx)) / off_diagonal + (k_yy.sum() - np.trace(k_yy))
                            / off_diagonal - 2.0 * k_xy.mean())
    return float(estimates.mean()), float(estimates.std(ddof=1)) if subsets > 1 else 0.0


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, *,
                                      nearest_k: int = PRDC_NEAREST_K) -> dict[str, float]:
    """Naeem et al.'s precision, recall, density and coverage with k-NN balls (k = 5).

    Precision and coverage measure fidelity and diversity against the real manifold, in [0, 1];
    density may exceed 1. Needs more than k images in each set (TooFewSamples otherwise).
    """
    from prdc import compute_prdc

    real = _as_features(real, "real", nearest_k + 1)
    fake = _as_features(fake, "fake", nearest_k + 1)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        values = compute_prdc(real, fake, nearest_k)
    return {name: float(value) for name, value in values.items()}


def bootstrap_intervals(statistic: Callable[[np.ndarray, np.ndarray], dict[str, float]], real: np.ndarray,
                        fake: np.ndarray, *, resamples: int = 200, confidence: float = 0.95, seed: int = 0,
                        progress: bool = False, description: str = "bootstrap",
                        subsample: float | None = None) -> dict[str, Interval]:
    """Named statistics `statistic(real, fake)` -> {name: value}, each with a percentile-bootstrap CI:
    both sets resampled with replacement, the same resamples for every name.

    subsample: instead draw this fraction of each set without replacement (a subsampling interval), for
    statistics built on nearest neighbours, which repeated rows would break (PRDC's k-NN radii).
    resamples = 0 gives the point estimates alone. Note that plug-in distances such as FD are biased
    upwards at small N, and a resample holds repeated rows, so the interval says how much the number
    moves with the images drawn, not where the infinite-sample value lies.
    """
    values = {name: float(value) for name, value in statistic(real, fake).items()}
    if resamples <= 0:
        return {name: Interval(value, None, None, confidence, 0) for name, value in values.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in values}
    for _ in tqdm(range(resamples), desc=description, unit="resample", disable=not progress, leave=False):
        resampled = statistic(real[_draw(rng, len(real), subsample)], fake[_draw(rng, len(fake), subsample)])
        for name in values:
            draws[name].append(resampled[name])
    tail = (1.0 - confidence) / 2.0 * 100.0
    intervals = {}
    for name, value in values.items():
        low, high = np.percentile(np.asarray(draws[name], np.float64), [tail, 100.0 - tail])
        intervals[name] = Interval(value, float(low), float(high), confidence, resamples)
    return intervals


def bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], float], real: np.ndarray, fake: np.ndarray,
                       **options) -> Interval:
    """One statistic with its CI (`bootstrap_intervals`' options)."""
    return bootstrap_intervals(lambda r, f: {"value": statistic(r, f)}, real, fake, **options)["value"]


def _draw(rng: np.random.Generator, count: int, subsample: float | None) -> np.ndarray:
    if subsample is None:
        return rng.integers(0, count, count)
    return rng.choice(count, max(2, round(subsample * count)), replace=False)
