"""What findings the images show: the label distribution of unconditional samples, and LCO's label fidelity.

- Label distribution (Segal et al. 2021, "Evaluating the clinical realism of synthetic chest x-rays
  generated using progressively growing GANs", SN Computer Science): the per-label prevalence among N
  unconditional samples, as judged by the LCO classifier (the bundle's, at its thresholds) and by the
  independent auditor (at its own), against the prevalence in the training set.
- LCO label fidelity: per request (a finding, "No Finding", a combination), the share of LCO images
  on which the LCO classifier reports every constraint met, and the share on which the auditor agrees.

Every share comes with its Clopper–Pearson ("exact") interval (statsmodels `proportion_confint`,
method="beta"), since per-finding counts are small.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from statsmodels.stats.proportion import proportion_confint
from tqdm import tqdm

from service.labels import LABELS, NO_FINDING

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Proportion:
    """`successes` of `trials`, its share and Clopper–Pearson interval at `confidence`."""

    successes: int
    trials: int
    value: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, flags: np.ndarray, confidence: float = CONFIDENCE) -> Proportion:
        flags = np.asarray(flags, dtype=bool)
        successes, trials = int(flags.sum()), int(flags.size)
        if trials == 0:
            raise ValueError("a proportion needs at least one trial")
        low, high = proportion_confint(successes, trials, alpha=1.0 - confidence, method="beta")
        return cls(successes, trials, successes / trials, float(low), float(high))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def met(probs: np.ndarray, thresholds: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows [N] of probabilities [N, 14] on the requested side of `thresholds` [14] for every label
    constrained by `mask` [14] (target [14]: 1 present, 0 absent)."""
    positive = probs >= thresholds[None, :]
    ok = np.where(target[None, :] > 0.5, positive, ~positive)
    return np.all(ok | (mask[None, :] < 0.5), axis=1)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def bundle_probabilities(bundle, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The bundle classifier's probabilities [N, 14] for images [N, 1, R, R] at the bundle's resolution."""
    return np.concatenate([sigmoid(bundle.classify(images[i:i + batch_size])[0])
                           for i in range(0, len(images), batch_size)])


def auditor_probabilities(auditor, images: np.ndarray) -> np.ndarray:
    """An auditor's probabilities [N, 14] for images [N, 1, H, W] in [-1, 1]: a TrainedClassifier (torch)
    or an exported one on ONNX Runtime (service.auditor.Auditor: a bundle's auditor.onnx)."""
    import torch

    from service.auditor import Auditor

    if isinstance(auditor, Auditor):
        return auditor.probabilities(np.asarray(images)[:, 0])
    return auditor.predict(torch.from_numpy(np.ascontiguousarray(images, np.float32)))


def label_distribution(generated_lco: np.ndarray, lco_thresholds: np.ndarray, generated_audit: np.ndarray | None,
                       audit_thresholds: np.ndarray | None, training_labels: np.ndarray,
                       confidence: float = CONFIDENCE) -> dict[str, dict[str, Any]]:
    """Per label (and "No Finding"): prevalence among generated images by the LCO classifier and by the
    auditor (probabilities [N, 14] at their thresholds [14]), and in the training labels [M, 14].

    Returns {label: {"training": Proportion, "lco_classifier": Proportion, "auditor": Proportion|None}}
    as dicts.
    """
    lco_positive = generated_lco >= lco_thresholds[None, :]
    audit_positive = None if generated_audit is None else generated_audit >= audit_thresholds[None, :]
    training_positive = training_labels > 0.5
    table: dict[str, dict[str, Any]] = {}
    for column, name in enumerate([*LABELS, NO_FINDING]):
        table[name] = {judge: _prevalence(positive, name, column, confidence) for judge, positive in
                       (("training", training_positive), ("lco_classifier", lco_positive), ("auditor", audit_positive))}
    return table


def _prevalence(positive: np.ndarray | None, name: str, column: int, confidence: float) -> dict[str, Any] | None:
    if positive is None:
        return None
    flags = ~positive.any(axis=1) if name == NO_FINDING else positive[:, column]
    return Proportion.of(flags, confidence).to_dict()


DEFAULT_COMBINATION = ("Effusion + Atelectasis, no Pneumothorax",
                       {"Effusion": True, "Atelectasis": True, "Pneumothorax": False})


def default_requests() -> list[tuple[str, dict[str, bool] | list[str]]]:
    """Each single finding, "No Finding", and one two-present-one-absent combination."""
    return [(name, [name]) for name in LABELS] + [(NO_FINDING, [NO_FINDING]), DEFAULT_COMBINATION]


@dataclass
class FidelityRow:
    request: str
    lco_classifier: Proportion  # LCO reports every constraint met (judged at the bundle's thresholds)
    auditor: Proportion | None  # the auditor agrees, at its own thresholds
    mean_steps: float
    images: np.ndarray  # [n, R, R] in [-1, 1]
    auditor_flags: np.ndarray | None  # [n] per image
    step_evaluations: int = 0  # lco_step rows the engine ran for this request
    checks: int = 0  # images the classifier checked during LCO (a bundle with a steering network)

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.request, "lco_classifier": self.lco_classifier.to_dict(),
                "auditor": None if self.auditor is None else self.auditor.to_dict(), "mean_steps": self.mean_steps,
                "images": len(self.images), "step_evaluations": self.step_evaluations, "checks": self.checks}


def lco_fidelity(engine, auditor, requests: list[tuple[str, dict[str, bool] | list[str]]], images_per_request: int,
                 *, seed: int = 1_000_000, confidence: float = CONFIDENCE, progress: bool = True) -> list[FidelityRow]:
    """LCO label fidelity: `images_per_request` LCO images per request from `engine` (a
    `service.lco.LCOEngine`), judged by its classifier and by `auditor` (a TrainedClassifier, or None).

    Request r's sample i uses seed ``seed * (r + 1) + i``.
    """
    from service.lco import SampleRequest
    from service.schemas import resolve_labels

    if images_per_request < 1:
        raise ValueError(f"images_per_request must be at least 1, got {images_per_request}")
    rows = []
    for number, (title, constraints) in enumerate(tqdm(requests, desc="LCO requests", unit="request",
                                                       disable=not progress)):
        spec = resolve_labels(constraints, exclusive=False)
        samples = [SampleRequest(spec.target, spec.mask, seed * (number + 1) + i) for i in range(images_per_request)]
        steps_before, checks_before = engine.stats.step_samples, engine.stats.checked_samples
        results = engine.generate(samples)
        images = np.stack([r.image for r in results])
        flags = None
        if auditor is not None:
            flags = met(auditor_probabilities(auditor, images[:, None]), auditor.thresholds, spec.target, spec.mask)
        rows.append(FidelityRow(title, Proportion.of([r.satisfied for r in results], confidence),
                                None if flags is None else Proportion.of(flags, confidence),
                                float(np.mean([r.steps for r in results])), images, flags,
                                engine.stats.step_samples - steps_before, engine.stats.checked_samples - checks_before))
    return rows
