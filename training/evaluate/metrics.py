"""The evaluation suite's metrics in the project's registry (`training.metrics`), and the set of
distribution metrics an evaluation reports for one extractor.

`frechet_distance` (declared in `training.metrics.builtin`) is computed here: its result carries the
protocol of both feature sets (extractor, weights sha256, preprocessing, counts), a bootstrap CI, and
is what the GAN trainer logs every `train.metric_images` and the export reads into the bundle.
"""

from __future__ import annotations

from typing import Any

from training.evaluate.distances import (
    PRDC_NEAREST_K,
    bootstrap_interval,
    bootstrap_intervals,
    frechet_distance,
    kernel_inception_distance,
    precision_recall_density_coverage,
)
from training.evaluate.features import FeatureSet
from training.evaluate.statistics import check_comparable
from training.metrics.builtin import FRECHET_DISTANCE
from training.metrics.registry import MetricResult, register_metric


def _protocol(real: FeatureSet, fake: FeatureSet, **settings: Any) -> dict[str, Any]:
    check_comparable(real.protocol, fake.protocol)
    shared = {k: v for k, v in real.protocol.items() if k not in ("count", "source")}
    return {**shared, "real": {"count": len(real), "source": real.protocol.get("source", "")},
            "fake": {"count": len(fake), "source": fake.protocol.get("source", "")}, **settings}


@register_metric(
    FRECHET_DISTANCE,
    "Fréchet distance between Gaussians fitted to real and generated images' features (Heusel et al. 2017), "
    "with a percentile-bootstrap CI; lower is better",
)
def frechet_distance_metric(real: FeatureSet, fake: FeatureSet, *, bootstrap: int = 200,
                            confidence: float = 0.95, seed: int = 0, progress: bool = False) -> MetricResult:
    """FD between two FeatureSets made under one protocol (ProtocolMismatch otherwise).

    `value` is the distance; `values` holds ci_low, ci_high, confidence and the bootstrap count.
    """
    protocol = _protocol(real, fake, bootstrap=bootstrap, confidence=confidence, seed=seed)
    interval = bootstrap_interval(frechet_distance, real.features, fake.features, resamples=bootstrap,
                                  confidence=confidence, seed=seed, progress=progress,
                                  description="Fréchet distance bootstrap")
    return MetricResult(FRECHET_DISTANCE, interval.value, interval.to_dict(), protocol)


def distribution_metrics(real: FeatureSet, fake: FeatureSet, *, bootstrap: int = 200, confidence: float = 0.95,
                         seed: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000,
                         progress: bool = False) -> dict[str, Any]:
    """FD (with CI), KID (mean, SD) and PRDC (k = 5, with 80% subsampling intervals) of `fake` against `real`, one protocol.

    Returns a JSON-able dict: ``frechet_distance`` {value, ci_low, ci_high, ...}, ``kid`` {mean, sd,
    subsets, subset_size ≤ half the smaller set}, ``prdc`` {precision: {value, ci_low, ci_high}, ...}, ``protocol``.
    """
    fd = frechet_distance_metric(real, fake, bootstrap=bootstrap, confidence=confidence, seed=seed,
                                 progress=progress)
    # Subsets of at most half of the smaller set, so that they differ and their SD means something.
    subset_size = max(2, min(kid_subset_size, len(real) // 2, len(fake) // 2))
    kid_mean, kid_sd = kernel_inception_distance(real.features, fake.features, subsets=kid_subsets,
                                                 subset_size=subset_size, seed=seed)
    prdc = {name: interval.to_dict() for name, interval in bootstrap_intervals(
        precision_recall_density_coverage, real.features, fake.features, resamples=min(bootstrap, 50),
        confidence=confidence, seed=seed, subsample=0.8, description="PRDC subsampling", progress=progress).items()}
    return {"frechet_distance": fd.values, "kid": {"mean": kid_mean, "sd": kid_sd, "subsets": kid_subsets,
                                                   "subset_size": subset_size},
            "prdc": {**prdc, "nearest_k": PRDC_NEAREST_K}, "protocol": fd.protocol}
