"""A trained classifier as it leaves the trainer: weights, architecture, thresholds, metrics.

On disk (the run directory's ``classifier/``):

    classifier.safetensors   parameters and BatchNorm statistics (no pickle)
    classifier.json          architecture spec, per-label thresholds, per-label AUROC with CIs,
                             data set, images shown, seed, preset

``training.export`` reads this to build the bundle; evaluation reads the auditor's the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.labels import LABELS
from training.classifier.metrics import LabelAUROC
from training.networks.classifier import ClassifierSpec, build_classifier

WEIGHTS_NAME = "classifier.safetensors"
META_NAME = "classifier.json"
FORMAT = "cxrsynth-classifier/1"


@dataclass
class TrainedClassifier:
    network: nn.Module
    spec: ClassifierSpec
    thresholds: np.ndarray  # float32 [14], probability ≥ threshold means positive
    metrics: dict[str, LabelAUROC]  # held-out split
    dataset: str
    images_shown: int
    preset: str = ""
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_auroc(self) -> float | None:
        values = [m.auroc for m in self.metrics.values() if m.auroc is not None]
        return float(np.mean(values)) if values else None

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write weights and metadata atomically (temporary names, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        meta = {
            "format": FORMAT,
            "spec": self.spec.to_dict(),
            "labels": list(LABELS),
            "thresholds": {label: float(t) for label, t in zip(LABELS, self.thresholds)},
            "metrics": {label: m.to_dict() for label, m in self.metrics.items()},
            "mean_auroc": self.mean_auroc,
            "dataset": self.dataset,
            "images_shown": int(self.images_shown),
            "preset": self.preset,
            "seed": int(self.seed),
            "extra": self.extra,
        }
        weights_tmp = _temp_path(directory, WEIGHTS_NAME)
        meta_tmp = _temp_path(directory, META_NAME)
        try:
            save_file(state, str(weights_tmp))
            meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.replace(weights_tmp, directory / WEIGHTS_NAME)
            os.replace(meta_tmp, directory / META_NAME)
        finally:
            weights_tmp.unlink(missing_ok=True)
            meta_tmp.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TrainedClassifier:
        """Rebuild the network in eval mode from a directory written by :meth:`save`."""
        directory = Path(directory)
        if (directory / "classifier").is_dir() and not (directory / META_NAME).exists():
            directory = directory / "classifier"  # a run directory was given
        meta_path, weights_path = directory / META_NAME, directory / WEIGHTS_NAME
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: pass a trained classifier directory "
                                        "(`cxrsynth-train classifier train` writes <run>/classifier/)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a {FORMAT} file")
        if meta["labels"] != list(LABELS):
            raise ValueError(f"{meta_path} was trained on labels {meta['labels']}, expected {list(LABELS)}")
        spec = ClassifierSpec.from_dict(meta["spec"])
        network = build_classifier(spec)
        network.load_state_dict(load_file(str(weights_path)))
        network.eval()
        return cls(
            network=network,
            spec=spec,
            thresholds=np.array([meta["thresholds"][label] for label in LABELS], dtype=np.float32),
            metrics={label: LabelAUROC(**m) for label, m in meta["metrics"].items()},
            dataset=meta["dataset"],
            images_shown=int(meta["images_shown"]),
            preset=meta.get("preset", ""),
            seed=int(meta.get("seed", 0)),
            extra=meta.get("extra", {}),
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Probabilities [N, 14] for images [N, 1, H, W] in [-1, 1]."""
        self.network.eval()
        outputs = [torch.sigmoid(self.network(images[i:i + batch_size].float())[0])
                   for i in range(0, len(images), batch_size)]
        return torch.cat(outputs).numpy()


def _temp_path(directory: Path, name: str) -> Path:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(path)
