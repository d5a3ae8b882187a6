"""The independent auditor, read without torch: what ``training.cli export-auditor`` wrote, or the
``auditor.onnx`` of a bundle (``export --auditor``).

The auditor (another architecture and seed than the bundle's classifier, never used by LCO) judges
whether an LCO image shows what was asked. Its directory holds ``classifier.onnx`` (image [B, 1, H, W]
in [-1, 1] → logits [B, 14], embedding [B, E]) and ``auditor.json`` (thresholds, resolution,
held-out real images; see training/export/auditor.py). In a bundle the graph is ``auditor.onnx``, at
the bundle's resolution, with its thresholds in the manifest's ``auditor`` section
(service/bundle.py), checksummed like the other graphs; :meth:`Auditor.of_bundle` reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import Bundle, SessionTuning, sha256_file
from service.labels import LABELS, NO_FINDING, parse_finding_labels
from service.png import decode_png

AUDITOR_FORMAT = "cxrsynth-auditor/1"


class AuditorError(ValueError):
    """An auditor directory that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class HeldOutImage:
    """A real image of the auditor's test split: its NIH "Image Index", labels [14] and PNG path."""

    name: str
    labels: np.ndarray
    path: Path


@dataclass
class Auditor:
    path: Path
    session: Any
    thresholds: np.ndarray  # float32 [14], probability ≥ threshold means the finding is present
    resolution: int
    description: str  # preset, architecture and seed, for captions and logs
    held_out: list[HeldOutImage]

    @classmethod
    def load(cls, directory: str | Path) -> Auditor:
        """Open ``directory``; AuditorError if a file is missing, of another format or altered."""
        import onnxruntime as ort

        directory = Path(directory)
        meta_path, graph = directory / "auditor.json", directory / "classifier.onnx"
        for path in (meta_path, graph):
            if not path.is_file():
                raise AuditorError(f"{path} not found: write the auditor with "
                                   "`python -m training.cli export-auditor --classifier RUN --out DIR`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != AUDITOR_FORMAT or meta.get("labels") != list(LABELS):
            raise AuditorError(f"{meta_path} is not a {AUDITOR_FORMAT} file over the 14 NIH labels")
        if sha256_file(graph) != meta["classifier_sha256"]:
            raise AuditorError(f"{graph} does not match the sha256 in {meta_path}: export the auditor again")
        tuning = SessionTuning(providers=("CPUExecutionProvider",))
        session = ort.InferenceSession(str(graph), sess_options=tuning.session_options(),
                                       providers=tuning.resolved_providers())
        held_out = [HeldOutImage(entry["Image Index"], parse_finding_labels(entry["Finding Labels"]),
                                 directory / "held_out" / entry["Image Index"]) for entry in meta["held_out"]]
        return cls(path=directory, session=session,
                   thresholds=np.array([meta["thresholds"][label] for label in LABELS], dtype=np.float32),
                   resolution=int(meta["resolution"]),
                   description=f"{meta['preset']} ({meta['arch']}, seed {meta['seed']})", held_out=held_out)

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> Auditor | None:
        """The auditor in ``bundle`` (its session, thresholds and the bundle's resolution), or None
        when the bundle has none."""
        info = bundle.manifest.auditor
        if info is None:
            return None
        return cls(path=bundle.path, session=bundle.sessions["auditor"], thresholds=info.threshold_array,
                   resolution=int(bundle.manifest.resolution),
                   description=f"{info.preset} ({info.arch}, seed {info.seed})", held_out=[])

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, 14] for images [N, H, W] in [-1, 1] at the auditor's resolution."""
        if images.ndim != 3 or images.shape[1:] != (self.resolution, self.resolution):
            raise ValueError(f"the auditor reads [N, {self.resolution}, {self.resolution}] images, got {list(images.shape)}")
        if not len(images):
            return np.zeros((0, len(LABELS)), np.float32)
        logits = self.session.run(["logits"], {"image": np.ascontiguousarray(images[:, None], np.float32)})[0]
        return 1.0 / (1.0 + np.exp(-logits))

    def agrees(self, probabilities: np.ndarray, finding: str) -> np.ndarray:
        """Per row of ``probabilities`` [N, 14]: does the auditor see ``finding`` ("No Finding": none of
        the 14 at or above its threshold)?"""
        positive = probabilities >= self.thresholds[None, :]
        if finding == NO_FINDING:
            return ~positive.any(axis=1)
        return positive[:, LABELS.index(finding)]

    def examples(self, finding: str, count: int) -> list[tuple[HeldOutImage, np.ndarray]]:
        """The first ``count`` held-out real images labelled ``finding`` (by name), each with its pixels
        [H, W] in [-1, 1]."""
        chosen = [image for image in self.held_out
                  if (not image.labels.any() if finding == NO_FINDING else image.labels[LABELS.index(finding)] > 0.5)]
        return [(image, decode_png(image.path.read_bytes())) for image in chosen[:count]]
