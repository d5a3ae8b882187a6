"""The metrics the project defines: each registered (or declared) under its name in the registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from training.metrics.registry import MetricResult, declare_metric, register_metric

if TYPE_CHECKING:
    from training.classifier.metrics import LabelAUROC

CLASSIFIER_AUROC = "classifier_auroc"
FRECHET_DISTANCE = "frechet_distance"


@register_metric(
    CLASSIFIER_AUROC,
    "a classifier's AUROC per label, with percentile-bootstrap confidence intervals over images, and "
    "their mean (value), on a labelled split; higher is better",
)
def classifier_auroc(
    probabilities: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    split: str = "test",
    dataset: str = "",
) -> MetricResult:
    """AUROC of [N, 14] `probabilities` against `labels` where `mask` is 1 (see `per_label_auroc`).

    `values` maps each label to its auroc, ci_low, ci_high, positives and negatives; `value` is the mean
    over the labels whose AUROC is defined (None if none is).
    """
    from training.classifier.metrics import (  # here: the classifier trainer imports us
        mean_auroc,
        per_label_auroc,
    )

    per_label = per_label_auroc(probabilities, labels, mask, bootstrap=bootstrap, confidence=confidence,
                                seed=seed)
    protocol = {"split": split, "dataset": dataset, "images": len(probabilities), "bootstrap": bootstrap,
                "confidence": confidence, "seed": seed}
    return MetricResult(CLASSIFIER_AUROC, mean_auroc(per_label),
                        {label: metric.to_dict() for label, metric in per_label.items()}, protocol)


def label_aurocs(result: MetricResult) -> dict[str, LabelAUROC]:
    """A `classifier_auroc` result's per-label entries as LabelAUROC (what TrainedClassifier keeps)."""
    from training.classifier.metrics import LabelAUROC

    return {label: LabelAUROC(**entry) for label, entry in result.values.items()}


# The generator's distance to the real images, which the export records in the bundle's provenance. The
# evaluation suite (training/evaluate/metrics.py) registers its computation on this name.
declare_metric(
    FRECHET_DISTANCE,
    "Fréchet distance between feature statistics of generated and real images (protocol: the feature "
    "network, sample counts and data); lower is better",
)
