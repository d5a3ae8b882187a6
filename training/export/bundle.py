"""Write a model bundle: the three ONNX graphs (and optionally the auditor's, ``auditor.onnx``), a
sealed manifest, and a parity check before release.

The bundle is assembled in a temporary sibling directory, checked (ONNX Runtime against eager torch
on a few latents, through ``service.bundle.load_bundle`` exactly as the service will load it) and
only then renamed into place, so a failed or interrupted export never leaves a half-written bundle
where the service looks.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.acceptance import ACCEPTANCE_FILE, measure_acceptance
from service.bundle import (
    AUDITOR_FILE,
    GRAPH_FILES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SessionTuning,
    load_bundle,
    seal_manifest,
    sha256_file,
)
from service.labels import LABELS
from training.classifier.artifact import TrainedClassifier
from training.export.lco import LCOObjective, reference_lco_step
from training.export.onnx_graphs import OPSET, export_classifier, export_generator, export_lco_step
from training.networks.classifier import classifier_passes


@dataclass
class GeneratorInfo:
    """What the manifest records about the generator: its data and training length."""

    dataset: str
    images_shown: int
    source: str = ""
    frechet_distance: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ExportCheckError(RuntimeError):
    """The exported graphs disagree with torch; nothing was written."""


def git_commit(directory: Path | None = None) -> str:
    """The repository's HEAD commit (with ``-dirty`` if tracked files changed), or ``unknown``."""
    directory = directory or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def check_parity(bundle_dir: Path, generator: nn.Module, classifier: nn.Module, batch: int = 4,
                 atol: float = 1e-3, min_cosine: float = 0.999, auditor: nn.Module | None = None,
                 steering: nn.Module | None = None) -> dict[str, float]:
    """Compare the bundle's graphs (``auditor``'s too when given) with eager torch on random latents,
    the step graph with LCO on ``steering`` (None: on ``classifier``); raise ExportCheckError if they
    disagree."""
    bundle = load_bundle(bundle_dir, SessionTuning(providers=("CPUExecutionProvider",)))
    generator_rng = torch.Generator().manual_seed(12345)
    z = torch.randn(batch, bundle.manifest.latent_dim, generator=generator_rng)
    target = (torch.rand(batch, len(LABELS), generator=generator_rng) > 0.5).float()
    mask = (torch.rand(batch, len(LABELS), generator=generator_rng) > 0.3).float()
    objective = LCOObjective(generator, classifier if steering is None else steering).eval()
    with torch.no_grad():
        reference = generator(torch.randn(batch, bundle.manifest.latent_dim, generator=generator_rng)).clamp(-1, 1)
    image_pull = (torch.arange(batch, dtype=torch.float32) % 2 * 5.0)[:, None]  # the term off and on
    loss, grad_z, probs, image = reference_lco_step(objective, z, target, mask, reference, image_pull)
    with torch.no_grad():
        logits, embedding = classifier(image)
    onnx_image = bundle.generate(z.numpy())
    onnx_logits, onnx_embedding = bundle.classify(image.numpy())
    step = bundle.lco_step(z.numpy(), target.numpy(), mask.numpy(), reference.numpy(), image_pull.numpy())
    grad = grad_z.numpy().ravel()
    cosine = float(np.dot(step.grad_z.ravel(), grad) / (np.linalg.norm(step.grad_z) * np.linalg.norm(grad) + 1e-30))
    report = {
        "generator_max_abs": float(np.abs(onnx_image - image.numpy()).max()),
        "classifier_max_abs": float(max(np.abs(onnx_logits - logits.numpy()).max(),
                                        np.abs(onnx_embedding - embedding.numpy()).max())),
        "lco_loss_max_abs": float(np.abs(step.loss - loss.numpy()).max()),
        "lco_probs_max_abs": float(np.abs(step.probs - probs.numpy()).max()),
        "lco_grad_cosine": cosine,
    }
    if auditor is not None:
        with torch.no_grad():
            expected = auditor(image)[0].numpy()
        onnx_auditor = bundle.sessions["auditor"].run(["logits"], {"image": image.numpy()})[0]
        report["auditor_max_abs"] = float(np.abs(onnx_auditor - expected).max())
    failures = [f"{k}={v:.3g}" for k, v in report.items() if (k.endswith("max_abs") and v > atol)]
    if cosine < min_cosine:
        failures.append(f"lco_grad_cosine={cosine:.6f}")
    if failures:
        raise ExportCheckError("the exported graphs disagree with torch: " + ", ".join(failures))
    return report


def export_bundle(
    generator: nn.Module,
    classifier: TrainedClassifier,
    output_dir: str | os.PathLike[str],
    *,
    generator_info: GeneratorInfo,
    name: str = "cxrsynth",
    version: str | None = None,
    overwrite: bool = False,
    opset: int = OPSET,
    extra_provenance: dict[str, Any] | None = None,
    acceptance_samples: int = 0,
    auditor: TrainedClassifier | None = None,
    steering: TrainedClassifier | None = None,
) -> Path:
    """Export ``generator`` (the EMA weights) and ``classifier`` as a bundle at ``output_dir``; with
    ``auditor`` also ``auditor.onnx`` (at the generator's resolution) and the manifest's ``auditor``
    section (its thresholds, AUROC and origin), for ``verify`` (service/verify.py). With ``steering``
    (a cheaper network, such as a student of ``classifier``) ``lco_step.onnx`` steers by it and the
    manifest's ``steering`` section holds its thresholds and cost; LCO then accepts an image only when
    ``classifier`` agrees (service/lco.py).

    ``acceptance_samples`` > 0 adds ``acceptance.npz``: the classifier's logits on that many
    unconditional generator samples and the measured cost of one LCO step, from which the engine sets
    each request's rejection budget (service/acceptance.py).

    Returns the bundle directory. Raises :class:`ExportCheckError` (writing nothing) if ONNX Runtime
    and torch disagree, FileExistsError if ``output_dir`` exists and ``overwrite`` is False.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another directory or pass overwrite")
    generator = generator.eval().requires_grad_(False).cpu()
    network = classifier.network.eval().requires_grad_(False).cpu()
    auditor_network = auditor.network.eval().requires_grad_(False).cpu() if auditor is not None else None
    steering_network = steering.network.eval().requires_grad_(False).cpu() if steering is not None else None
    resolution = int(getattr(generator, "resolution", 0))
    if resolution < 4:
        raise TypeError("the generator must expose its output `resolution`")
    with torch.no_grad():
        probe = generator(torch.zeros(1, generator.latent_dim))
        embedding_dim = int(network(probe)[1].shape[1])
    if tuple(probe.shape[1:]) != (1, resolution, resolution):
        raise ValueError(f"the generator makes {tuple(probe.shape[1:])} images, expected (1, {resolution}, {resolution})")

    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    commit = git_commit()
    version = version or f"{created:%Y%m%d.%H%M%S}-{commit[:7]}"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged(output_dir) as staging:
        export_generator(generator, staging / GRAPH_FILES["generator"], opset)
        export_classifier(network, resolution, staging / GRAPH_FILES["classifier"], opset)
        export_lco_step(generator, network if steering_network is None else steering_network,
                        staging / GRAPH_FILES["lco_step"], opset)
        graph_files = list(GRAPH_FILES.values())
        if auditor_network is not None:
            export_classifier(auditor_network, resolution, staging / AUDITOR_FILE, opset)
            graph_files.append(AUDITOR_FILE)
        files = {}
        for filename in sorted(graph_files):
            path = staging / filename
            files[filename] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        document = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version,
            "created": created.isoformat(),
            "labels": list(LABELS),
            "thresholds": {label: float(t) for label, t in zip(LABELS, classifier.thresholds)},
            "resolution": resolution,
            "latent_dim": int(generator.latent_dim),
            "embedding_dim": embedding_dim,
            "opset": opset,
            "pixel": {"range": [-1.0, 1.0], "channels": 1, "dtype": "float32"},
            "files": files,
            "classifier_passes": classifier_passes(network),
            "provenance": {
                "dataset": generator_info.dataset,
                "images_shown": int(generator_info.images_shown),
                "commit": commit,
                "classifier_dataset": classifier.dataset,
                "classifier_arch": classifier.spec.arch,
                "classifier_auroc": {label: m.to_dict() for label, m in classifier.metrics.items()},
                "classifier_mean_auroc": classifier.mean_auroc,
                "frechet_distance": generator_info.frechet_distance,
                "generator_source": generator_info.source,
                "classifier_source": str(classifier.extra.get("source", classifier.preset)),
                "extra": {**generator_info.extra, **(extra_provenance or {})},
            },
        }
        if auditor is not None:
            document["auditor"] = auditor_section(auditor)
        if steering is not None:
            document["steering"] = {**auditor_section(steering), "passes": classifier_passes(steering_network)}
        (staging / MANIFEST_NAME).write_bytes(seal_manifest(document))
        check_parity(staging, generator, network, auditor=auditor_network, steering=steering_network)
        if acceptance_samples > 0:
            add_acceptance_table(staging, document, acceptance_samples)
    return output_dir


def export_step_again(bundle_dir: str | os.PathLike[str], generator: nn.Module, classifier: nn.Module,
                      opset: int = OPSET, probes: int = 8) -> Path:
    """Replace a bundle's ``lco_step.onnx`` with this revision's export of the same networks, when it
    returns exactly what the old one did (a faster export of the same step), keeping the version.

    ``generator`` and ``classifier`` must be the networks the bundle was exported from: they must
    reproduce its generator, classifier and step graphs (``check_parity``). The new step must give the
    old one's loss, gradient, probabilities and image bit for bit on ``probes`` random batches (1 to
    ``probes`` rows, masks with weights above 1, the image term off and on), so every image the bundle
    returns stays what it was and its version still names it; the acceptance table, with its step cost
    as measured at the first export, is kept for the same reason. The manifest records the new graph's
    checksum and, under ``provenance.extra.lco_step_export``, the commit and time. Staged beside the
    bundle and renamed into place. Raises ExportCheckError (nothing changed) when any check fails.
    """
    bundle_dir = Path(bundle_dir)
    generator = generator.eval().requires_grad_(False).cpu()
    classifier = classifier.eval().requires_grad_(False).cpu()
    check_parity(bundle_dir, generator, classifier)
    with staged(bundle_dir) as staging:
        shutil.copytree(bundle_dir, staging, dirs_exist_ok=True)
        step_file = GRAPH_FILES["lco_step"]
        export_lco_step(generator, classifier, staging / step_file, opset)
        document = json.loads((staging / MANIFEST_NAME).read_text())
        document.pop("manifest_sha256")
        path = staging / step_file
        document["files"][step_file] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        document["provenance"]["extra"]["lco_step_export"] = {"commit": git_commit(), "created": created.isoformat()}
        (staging / MANIFEST_NAME).write_bytes(seal_manifest(document))
        _check_same_step(bundle_dir, staging, probes)
    return bundle_dir


def _check_same_step(old_dir: Path, new_dir: Path, probes: int) -> None:
    """ExportCheckError unless the two bundles' step graphs give identical outputs on random batches."""
    tuning = SessionTuning(providers=("CPUExecutionProvider",), intra_op_threads=1)
    old, new = load_bundle(old_dir, tuning), load_bundle(new_dir, tuning)
    rng = np.random.default_rng(20261202)
    latent, side = old.manifest.latent_dim, old.manifest.resolution
    for rows in range(1, probes + 1):
        z = rng.standard_normal((rows, latent)).astype(np.float32)
        target = (rng.random((rows, len(LABELS))) < 0.3).astype(np.float32)
        mask = rng.choice(np.array([0.0, 1.0, 3.5], np.float32), size=(rows, len(LABELS)))
        reference = rng.uniform(-1, 1, (rows, 1, side, side)).astype(np.float32)
        image_pull = (np.arange(rows, dtype=np.float32) % 2 * 10.0)[:, None]
        before = old.lco_step(z, target, mask, reference, image_pull)
        after = new.lco_step(z, target, mask, reference, image_pull)
        for name in ("loss", "grad_z", "probs", "image"):
            if not np.array_equal(getattr(before, name), getattr(after, name)):
                largest = float(np.abs(getattr(before, name) - getattr(after, name)).max())
                raise ExportCheckError(f"the new step graph's {name} differs from the bundle's by up to {largest:.3g} "
                                       f"on {rows} row(s): it would change the images this version names; export "
                                       "a new bundle (a new version) instead")


def add_acceptance_table(staging: Path, document: dict[str, Any], samples: int) -> None:
    """Measure the acceptance table on the staged graphs, write it and list it in the manifest."""
    bundle = load_bundle(staging, SessionTuning(providers=("CPUExecutionProvider",)))
    table = measure_acceptance(bundle.generator, bundle.classifier, bundle.lco_session, bundle.manifest.latent_dim,
                               samples)
    path = staging / ACCEPTANCE_FILE
    path.write_bytes(table.to_bytes())
    document["files"][ACCEPTANCE_FILE] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (staging / MANIFEST_NAME).write_bytes(seal_manifest(document))


def auditor_section(auditor: TrainedClassifier) -> dict[str, Any]:
    """The manifest's ``auditor`` section (service.bundle.AuditorInfo) for a trained auditor; also the
    ``steering`` section's origin and thresholds (service.bundle.SteeringInfo)."""
    return {
        "thresholds": {label: float(t) for label, t in zip(LABELS, auditor.thresholds)},
        "preset": auditor.preset,
        "arch": auditor.spec.arch,
        "seed": int(auditor.seed),
        "dataset": auditor.dataset,
        "auroc": {label: m.to_dict() for label, m in auditor.metrics.items()},
        "mean_auroc": auditor.mean_auroc,
        "source": str(auditor.extra.get("source", auditor.preset)),
    }


@contextlib.contextmanager
def staged(output_dir: Path) -> Iterator[Path]:
    """A temporary sibling of ``output_dir`` to write into: renamed into place if the block completes,
    removed if it raises, so a failed or interrupted export never leaves a half-written bundle."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        yield staging
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by ``staging`` with renames only (an old bundle stays until the swap)."""
    staging.chmod(0o755)
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    retired = output_dir.with_name(f".{output_dir.name}.retired")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(output_dir, retired)
    os.replace(staging, output_dir)
    shutil.rmtree(retired, ignore_errors=True)
