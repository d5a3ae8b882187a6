"""Combine trained classifiers into one ensemble classifier (``ClassifierEnsemble``) and evaluate it.

The result is an ordinary trained-classifier directory (spec, weights, thresholds, held-out AUROC), so
the export, the bundle and the service take it like any other classifier. Its thresholds are all 0.5
(a mean vote of 0): every vote is already centred on its member's own Youden threshold, and choosing
thresholds again would move LCO's target for a label by up to ±1.6 logits, past what clipped votes can
reach for some labels and barely past the members' thresholds for others. AUROC is measured on the
evaluation preset's test split, which must not overlap the members' training data (phantom presets
draw each split from its own seed, so pick members trained on other ``data.seed`` values than the
evaluation preset's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from service.labels import NUM_LABELS
from training.classifier.artifact import TrainedClassifier
from training.classifier.config import ClassifierTrainConfig
from training.networks.classifier import ClassifierEnsemble, ClassifierSpec

# Two views besides the image itself, a few pixels off in different directions.
DEFAULT_SHIFTS: tuple[tuple[int, int], ...] = ((2, 1), (-1, -2))
# A member's vote saturates at ±2 logits: to pass LCO's 1.8-logit margin (a mean vote of 1.8 of at most
# 2), the members may fall short of certainty by 0.2 logits each on average. A member at its threshold
# uses the slack of ten, so among nine every member has to lean firmly the requested way.
DEFAULT_VOTE_CLIP = 2.0


def combine(members: Sequence[TrainedClassifier], shifts: Sequence[tuple[int, int]] = DEFAULT_SHIFTS,
            vote_clip: float = DEFAULT_VOTE_CLIP) -> ClassifierEnsemble:
    """The ensemble network of ``members`` (their weights copied, thresholds as logit centres)."""
    if not vote_clip >= 0:
        raise ValueError(f"vote_clip must be 0 (no clipping) or a positive number of logits, got {vote_clip}")
    sizes = {member.spec.input_size for member in members}
    if len(sizes) != 1:
        raise ValueError(f"ensemble members read different input sizes {sorted(sizes)}; train them at one size")
    spec = ClassifierSpec(arch="ensemble", input_size=sizes.pop(), members=tuple(m.spec for m in members),
                          shifts=tuple((int(r), int(c)) for r, c in shifts), vote_clip=float(vote_clip))
    network = ClassifierEnsemble(spec)
    with torch.no_grad():
        for target, member in zip(network.members, members):
            target.load_state_dict(member.network.state_dict())
        for row, member in enumerate(members):
            probabilities = torch.as_tensor(member.thresholds, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
            network.centres[row] = torch.logit(probabilities)
    return network.eval()


def build_ensemble(members: Sequence[TrainedClassifier], config: ClassifierTrainConfig, run_dir: Path,
                   shifts: Sequence[tuple[int, int]] = DEFAULT_SHIFTS,
                   vote_clip: float = DEFAULT_VOTE_CLIP) -> TrainedClassifier:
    """Combine ``members``, evaluate on ``config``'s held-out splits; save to ``run_dir``/classifier
    (with ``run_dir``/roc.png and the AUROC in ``run_dir``/metric-classifier_auroc.jsonl), as
    ``classifier train`` does."""
    from training.classifier.trainer import held_out_auroc, save_roc_picture
    from training.metrics import report_metric
    from training.metrics.builtin import label_aurocs

    if not members:
        raise ValueError("an ensemble needs at least one member classifier")
    network = combine(members, shifts, vote_clip)
    metric, splits = held_out_auroc(network, config)
    metrics = label_aurocs(metric)
    thresholds = np.full(NUM_LABELS, 0.5, np.float32)  # a mean vote of 0 (see the module docstring)
    images_shown = sum(member.images_shown for member in members)
    result = TrainedClassifier(
        network=network, spec=network.spec, thresholds=thresholds, metrics=metrics, dataset=splits.description,
        images_shown=images_shown, preset=config.name, seed=config.seed,
        extra={"source": str(run_dir / "classifier"), "members": [
            {"source": str(m.extra.get("source", "")), "arch": m.spec.arch, "preset": m.preset, "seed": m.seed,
             "dataset": m.dataset, "mean_auroc": m.mean_auroc} for m in members]},
    )
    result.save(run_dir / "classifier")
    report_metric(metric, run_dir, images_shown=images_shown, snapshot=run_dir / "classifier")
    save_roc_picture(network, splits.test, torch.device("cpu"), metrics, run_dir / "roc.png",
                     f"ensemble of {len(members)} ({', '.join(m.spec.arch for m in members)}), {len(shifts) + 1} views"
                     + (f", votes clipped at ±{vote_clip:g}" if vote_clip > 0 else ""))
    return result
