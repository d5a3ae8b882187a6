"""Multi-label evaluation: per-label AUROC with bootstrap confidence intervals, Youden-J thresholds.

AUROC is computed exactly as the Mann-Whitney U statistic from mid-ranks (ties count one half), the
same value as the area under the empirical ROC curve. Confidence intervals are percentile bootstrap
intervals over images (resampling whole images keeps the labels' correlation), vectorised over the
resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from service.labels import LABELS


@dataclass(frozen=True)
class LabelAUROC:
    """AUROC of one label; ``auroc`` is None when the split lacks positives or negatives."""

    auroc: float | None
    ci_low: float | None
    ci_high: float | None
    positives: int
    negatives: int

    def to_dict(self) -> dict:
        return {"auroc": self.auroc, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "positives": self.positives, "negatives": self.negatives}


def auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC along the last axis. ``scores``, ``labels``: [..., N]; returns [...] (NaN if undefined)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    ranks = rankdata(scores, axis=-1)
    positives = labels.sum(axis=-1)
    negatives = labels.shape[-1] - positives
    rank_sum = np.where(labels, ranks, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = rank_sum - positives * (positives + 1) / 2.0
        return np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)


def per_label_auroc(
    scores: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, LabelAUROC]:
    """AUROC per label over images where the label is known (mask = 1), with bootstrap CIs.

    scores, labels, mask: [N, 14]. ``bootstrap`` = 0 skips the intervals.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    mask = np.ones_like(labels) if mask is None else np.asarray(mask)
    rng = np.random.default_rng(seed)
    results: dict[str, LabelAUROC] = {}
    for column, name in enumerate(LABELS):
        known = mask[:, column] > 0
        s, y = scores[known, column], labels[known, column] > 0.5
        pos, neg = int(y.sum()), int((~y).sum())
        if pos == 0 or neg == 0:
            results[name] = LabelAUROC(None, None, None, pos, neg)
            continue
        value = float(auroc(s, y))
        low = high = None
        if bootstrap > 0:
            picks = rng.integers(0, len(s), size=(bootstrap, len(s)))
            resampled = auroc(s[picks], y[picks])
            resampled = resampled[np.isfinite(resampled)]
            if len(resampled):
                tail = (1.0 - confidence) / 2.0 * 100.0
                low, high = (float(v) for v in np.percentile(resampled, [tail, 100.0 - tail]))
        results[name] = LabelAUROC(value, low, high, pos, neg)
    return results


def mean_auroc(results: dict[str, LabelAUROC]) -> float | None:
    """Mean over the labels whose AUROC is defined."""
    values = [r.auroc for r in results.values() if r.auroc is not None]
    return float(np.mean(values)) if values else None


def youden_thresholds(
    probabilities: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    default: float = 0.5,
    clip: float = 1e-4,
) -> np.ndarray:
    """Per-label probability threshold maximising Youden's J = sensitivity + specificity − 1.

    A sample counts as positive when its probability is ≥ the threshold. The threshold is placed
    midway between the optimal score and the next lower one, so it does not sit on a training point.
    Labels without both classes in the split get ``default``. Returns float32 [14] in (0, 1).
    """
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    mask = np.ones_like(labels) if mask is None else np.asarray(mask)
    thresholds = np.full(len(LABELS), default, dtype=np.float64)
    for column in range(len(LABELS)):
        known = mask[:, column] > 0
        p, y = probabilities[known, column], labels[known, column] > 0.5
        pos, neg = int(y.sum()), int((~y).sum())
        if pos == 0 or neg == 0:
            continue
        order = np.argsort(-p, kind="stable")
        p_sorted, y_sorted = p[order], y[order]
        tpr = np.cumsum(y_sorted) / pos
        fpr = np.cumsum(~y_sorted) / neg
        # Only cut between distinct scores: the last index of each run of equal scores.
        distinct = np.r_[p_sorted[1:] != p_sorted[:-1], True]
        j = np.where(distinct, tpr - fpr, -np.inf)
        best = int(np.argmax(j))
        below = p_sorted[best + 1] if best + 1 < len(p_sorted) else 0.0
        thresholds[column] = (p_sorted[best] + below) / 2.0
    return np.clip(thresholds, clip, 1.0 - clip).astype(np.float32)
