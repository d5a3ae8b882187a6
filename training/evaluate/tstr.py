"""Train on synthetic, test on real (TSTR; Esteban et al. 2017, "Real-valued (medical) time series generation
with recurrent conditional GANs"; used for chest x-rays by Segal et al. 2021).

One classifier configuration is trained three times — on the real training split ("train-on-real"), on a
synthetic archive ("train-on-synthetic", an archive is an NIH-layout folder the NIH reader reads) and on
both ("real+synthetic") — with the same real validation split (Youden thresholds) and tested on the same
real held-out split: per-label AUROC with percentile-bootstrap 95% CIs (`classifier_auroc`), and ROC
curves of the three side by side.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from service.labels import LABELS

REGIMES = ("train-on-real", "train-on-synthetic", "real+synthetic")


def open_archive(path: str | Path, size: int) -> Dataset:
    """A synthetic archive (NIH layout: Data_Entry CSV + images/) as a data set at size².

    Raises ValueError naming the archive and the count when images its CSV lists are missing.
    """
    from training.data.nih import NIHChestXray14

    dataset = NIHChestXray14(path, split="all", size=size, min_size=1)
    missing = dataset.skipped.get("missing", 0)
    if missing:
        raise ValueError(f"archive {path}: {missing} images listed in its CSV are missing; re-run or repair the "
                         "archive job (`python -m service.archive run` repairs lost images)")
    return dataset


def train_on_synthetic_test_on_real(config, real_train: Dataset, real_val: Dataset, real_test: Dataset,
                                    synthetic: Dataset, run_dir: str | Path, *, progress: bool = True
                                    ) -> dict[str, Any]:
    """Train `config` (a ClassifierTrainConfig) in each of REGIMES under `run_dir/<regime>`; test on real.

    Returns {"regimes": {regime: {"mean_auroc", "per_label": {label: {auroc, ci_low, ci_high, positives,
    negatives}}, "train_images"}}, "test_images", "probabilities": {regime: [N, 14]}, "labels": [N, 14],
    "mask": [N, 14]} (the arrays for the ROC plot; the rest is JSON-able).
    """
    from training.classifier.trainer import Splits, materialize, predict, train_classifier

    if len(synthetic) == 0:  # type: ignore[arg-type]
        raise ValueError("the synthetic archive holds no images")
    workers = 0
    real_train, real_val, real_test = (materialize(d, workers, f"reading real {name}") for name, d in
                                       (("train", real_train), ("val", real_val), ("test", real_test)))
    synthetic = materialize(synthetic, workers, "reading synthetic archive")
    trains = {"train-on-real": real_train, "train-on-synthetic": synthetic,
              "real+synthetic": ConcatDataset([real_train, synthetic])}
    results: dict[str, Any] = {"regimes": {}, "probabilities": {}, "test_images": len(real_test)}
    config = replace(config, workers=0)
    for regime, train in trains.items():
        splits = Splits(train, real_val, real_test, description=f"tstr {regime}")
        trained = train_classifier(config, Path(run_dir) / regime, progress=progress, tensorboard=False,
                                   splits=splits)
        assert trained is not None  # one process: rank 0
        probabilities, labels, mask = predict(trained.network, real_test, torch.device("cpu"))
        results["probabilities"][regime] = probabilities
        results["labels"], results["mask"] = labels, mask
        results["regimes"][regime] = {
            "mean_auroc": trained.mean_auroc, "train_images": len(train),
            "per_label": {label: trained.metrics[label].to_dict() for label in LABELS}}
    return results


def plot_roc_curves(results: dict[str, Any], path: Path) -> Path:
    """ROC curves per label, one line per regime with its AUROC, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, mask = results["labels"], results["mask"]
    figure, axes = plt.subplots(3, 5, figsize=(15, 9.5))
    for column, (axis, name) in enumerate(zip(axes.flat, LABELS)):
        known = mask[:, column] > 0
        y = labels[known, column] > 0.5
        if y.all() or not y.any():
            axis.set_title(f"{name}\n(no {'negatives' if y.all() else 'positives'} in the test split)", fontsize=9)
        else:
            for regime, probabilities in results["probabilities"].items():
                order = np.argsort(-probabilities[known, column])
                tpr = np.r_[0.0, np.cumsum(y[order]) / y.sum()]
                fpr = np.r_[0.0, np.cumsum(~y[order]) / (~y).sum()]
                auroc = results["regimes"][regime]["per_label"][name]["auroc"]
                axis.plot(fpr, tpr, lw=1.3, label=f"{regime} {auroc:.2f}")
            axis.legend(fontsize=6, loc="lower right")
            axis.set_title(f"{name} (positives {int(y.sum())})", fontsize=9)
        axis.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.tick_params(labelsize=7)
    axes.flat[-1].axis("off")
    summary = "\n".join(f"{regime}: mean AUROC {r['mean_auroc']:.3f}" if r["mean_auroc"] is not None else
                        f"{regime}: no AUROC" for regime, r in results["regimes"].items())
    axes.flat[-1].text(0.0, 0.5, f"TSTR, tested on {results['test_images']} real images\n{summary}", fontsize=9)
    figure.supxlabel("false positive rate")
    figure.supylabel("true positive rate")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
