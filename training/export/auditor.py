"""The auditor as files the service side reads without torch: ``classifier.onnx`` + ``auditor.json``.

The auditor judges LCO's images and never steers them. In a bundle it is ``auditor.onnx``
(``export --auditor``, training/export/bundle.py) for ``verify``; this directory form carries held-out
real images besides, and ``python -m service.demo --data nih:PATH`` reads it with ONNX Runtime
(service/auditor.py):

    python -m training.cli export-auditor --classifier runs/demo-real/auditor --out models/demo-real-auditor

``auditor.json`` holds the format, labels (``service.labels.LABELS`` order), per-label thresholds
(probabilities, Youden's J on the auditor's validation split), the input resolution, preset,
architecture, seed, data set, per-label held-out AUROC and the sha256 of ``classifier.onnx``. For an
auditor trained on NIH ChestX-ray14 it also lists its test split (patients it never trained on) as
``held_out``: each image's "Image Index" and "Finding Labels", and the image itself under ``held_out/``
as the reader decoded it for the auditor (8-bit PNG at its resolution), so the service side shows and
scores real images exactly as the classifiers saw them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from service.auditor import AUDITOR_FORMAT
from service.bundle import sha256_file
from service.labels import LABELS, format_finding_labels
from service.png import encode_png
from training.classifier.artifact import TrainedClassifier
from training.export.onnx_graphs import OPSET, export_classifier

NIH_DATASET_PREFIX = "nih-chestxray14:"  # how the classifier trainer names an NIH data set


def export_auditor(auditor: TrainedClassifier, output_dir: str | os.PathLike[str], *, overwrite: bool = False,
                   opset: int = OPSET) -> Path:
    """Write ``auditor`` to ``output_dir`` (see the module docstring); returns the directory.

    The directory is staged beside its destination and renamed into place only after ONNX Runtime
    agreed with torch on random images (largest logit difference ≤ 1e-3), so nothing half-written is
    ever read. Raises FileExistsError if ``output_dir`` exists and ``overwrite`` is False, and
    RuntimeError if ONNX Runtime and torch disagree.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another directory or pass --overwrite")
    network = auditor.network.eval().requires_grad_(False).cpu()
    resolution = int(auditor.spec.input_size)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        graph = staging / "classifier.onnx"
        export_classifier(network, resolution, graph, opset)
        _check_parity(graph, network, resolution)
        document = {
            "format": AUDITOR_FORMAT,
            "labels": list(LABELS),
            "thresholds": {label: float(t) for label, t in zip(LABELS, auditor.thresholds)},
            "resolution": resolution,
            "preset": auditor.preset,
            "arch": auditor.spec.arch,
            "seed": auditor.seed,
            "dataset": auditor.dataset,
            "auroc": {label: m.auroc for label, m in auditor.metrics.items()},
            "mean_auroc": auditor.mean_auroc,
            "classifier_sha256": sha256_file(graph),
            "held_out": _write_held_out(auditor.dataset, resolution, staging / "held_out"),
        }
        (staging / "auditor.json").write_text(json.dumps(document, indent=2) + "\n")
        staging.chmod(0o755)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _check_parity(graph: Path, network: torch.nn.Module, resolution: int) -> None:
    import onnxruntime as ort

    images = torch.rand(4, 1, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = network(images)[0].numpy()
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images.numpy()})[0]
    difference = float(np.abs(logits - expected).max())
    if difference > 1e-3:
        raise RuntimeError(f"the exported auditor disagrees with torch: largest logit difference {difference:.3g}")


def _write_held_out(dataset: str, resolution: int, folder: Path) -> list[dict[str, str]]:
    """The NIH test split as the reader decodes it, one PNG per image; [] for other data sets."""
    if not dataset.startswith(NIH_DATASET_PREFIX):
        return []
    from training.data import NIHChestXray14

    test = NIHChestXray14(dataset.removeprefix(NIH_DATASET_PREFIX), split="test", size=resolution)
    folder.mkdir()
    entries = []
    for index, name in enumerate(test.image_names):
        image, labels, _ = test[index]
        (folder / str(name)).write_bytes(encode_png(image[0].numpy()))
        entries.append({"Image Index": str(name), "Finding Labels": format_finding_labels(labels.numpy())})
    return entries
