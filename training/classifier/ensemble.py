"""Combine trained classifiers into one ensemble classifier (``ClassifierEnsemble``) and evaluate it.

The result is an ordinary trained-classifier directory (spec, weights, thresholds, held-out AUROC), so
the export, the bundle and the service take it like any other classifier. Thresholds are chosen again,
by Youden's J on the evaluation preset's validation split, and AUROC is measured on its test split;
neither split may overlap the members' training data (phantom presets draw each split from its own
seed, so pick members trained on other ``data.seed`` values than the evaluation preset's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from training.classifier.artifact import TrainedClassifier
from training.classifier.config import ClassifierTrainConfig
from training.networks.classifier import ClassifierEnsemble, ClassifierSpec

# Two views besides the image itself, a few pixels off in different directions.
DEFAULT_SHIFTS: tuple[tuple[int, int], ...] = ((2, 1), (-1, -2))
# A member's vote saturates at ±3 logits: with LCO's 1.5-logit margin, no single member can carry it.
DEFAULT_VOTE_CLIP = 3.0


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
    (with ``run_dir``/roc.png), as ``classifier train`` does."""
    from training.classifier.trainer import build_splits, evaluate, save_roc_picture

    if not members:
        raise ValueError("an ensemble needs at least one member classifier")
    network = combine(members, shifts, vote_clip)
    if config.data.kind == "phantoms":  # only the validation and test splits are read: draw no training set
        config = config.override(["data.train_count=1"])
    splits = build_splits(config)
    thresholds, metrics = evaluate(network, splits.val, splits.test, torch.device("cpu"), config.bootstrap, config.seed)
    result = TrainedClassifier(
        network=network, spec=network.spec, thresholds=thresholds, metrics=metrics, dataset=splits.description,
        images_shown=sum(member.images_shown for member in members), preset=config.name, seed=config.seed,
        extra={"source": str(run_dir / "classifier"), "members": [
            {"source": str(m.extra.get("source", "")), "arch": m.spec.arch, "preset": m.preset, "seed": m.seed,
             "dataset": m.dataset, "mean_auroc": m.mean_auroc} for m in members]},
    )
    result.save(run_dir / "classifier")
    save_roc_picture(network, splits.test, torch.device("cpu"), metrics, run_dir / "roc.png",
                     f"ensemble of {len(members)} ({', '.join(m.spec.arch for m in members)}), {len(shifts) + 1} views"
                     + (f", votes clipped at ±{vote_clip:g}" if vote_clip > 0 else ""))
    return result
