"""Counterfactual pairs: the same synthetic patient with a finding added or removed (behind POST /edit).

An earlier image is named by what made it: the bundle version, its seed, its labels and its LCO
options. LCO is deterministic (docs/ARCHITECTURE.md, "LCO engine"), so running that request again
gives back the image and its latent z0 without any state kept on the server. The edit then runs LCO
from z0 towards the changed request:

- the labels the change names, and the reference's own constraints, are *judged*: the edited image is
  satisfied, and stops, when each lies past its threshold on the requested side (the usual margin);
- every other label is steered towards the probability the classifier gave the original (a soft
  target in the same masked BCE), so findings the edit does not name stay where they were;
- the named labels weigh in that BCE as much as all the others together: held at weight 1 each, the
  13 soft targets outweighed an added finding thirteen to one and, with the pull, kept the edit from
  drawing it (docs/lco-quality.md, "Counterfactual edits");
- an image proximity term, image_pull times the mean squared pixel difference between the edited
  image and the original, keeps what the change does not need where it was (anatomy, position,
  exposure, texture); it is part of the LCO step graph, whose gradient runs back through the
  generator (training/export/lco.py);
- optionally a latent proximity term (pull / 2) * |z - z0|^2 (service/lco.py runs it in the Adam
  graph, on the device).

Why pixels rather than the latent alone: the generator is not disentangled, so a latent pull strong
enough to keep the pair close also keeps the finding from being drawn, and one weak enough to let it
be drawn lets texture and exposure drift everywhere (docs/lco-quality.md, "Counterfactual edits"); the
image term lets the latent move as far as the finding needs while charging every pixel that changes.
What it keeps is measured by benchmarks/bench_edit.py: the auditor's verdict on the added finding, the
other labels' sides, and the pair's SSIM against two unrelated images of the same request.
The HTTP request around it: service/edit.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.labels import LABEL_INDEX, LABELS, NO_FINDING, NUM_LABELS, UnknownLabelError, parse_label
from service.lco import LCOOptions, SampleRequest, SampleResult, weigh_equally

# The proximity weights /edit uses unless asked otherwise (latent, image); `bench_edit --proximity
# --image-proximity` measures others (docs/lco-quality.md).
DEFAULT_PULL = 0.0
MAX_PULL = 10.0
DEFAULT_IMAGE_PULL = 10.0
MAX_IMAGE_PULL = 1000.0


class EditError(ValueError):
    """A change that cannot be applied to its reference; the message says what to fix."""


@dataclass(frozen=True)
class EditSpec:
    """The edited request's label vectors [14], in ``service.labels.LABELS`` order.

    ``target``/``judged`` hold the named and the reference's constraints; every other label is left
    to :func:`edit_sample`, which steers it towards the original's probability.
    """

    target: np.ndarray
    judged: np.ndarray
    add: tuple[str, ...]
    remove: tuple[str, ...]


def plan_edit(reference_target: np.ndarray, reference_mask: np.ndarray, add: list[str], remove: list[str]) -> EditSpec:
    """The edited constraints: the reference's, with ``add`` present and ``remove`` absent.

    Raises EditError for an empty change, an unknown or "No Finding" label, a label both added and
    removed, one added that the reference already requests present, or one removed that it already
    requests absent.
    """
    if not add and not remove:
        raise EditError('the change is empty: name findings to "add" and/or "remove"')
    named: dict[str, bool] = {}
    for names, present in ((add, True), (remove, False)):
        for raw in names:
            try:
                name = parse_label(raw)
            except UnknownLabelError as error:
                raise EditError(str(error)) from None
            if name == NO_FINDING:
                raise EditError('"No Finding" cannot be added or removed; remove (or add) the findings themselves')
            if name in named:
                raise EditError(f"{name} is named twice in the change; add or remove it once")
            index = LABEL_INDEX[name]
            if reference_mask[index] > 0.5 and (reference_target[index] > 0.5) == present:
                side = "present" if present else "absent"
                raise EditError(f"the reference already requests {name} {side}; "
                                f"{'add' if present else 'remove'} a finding it does not")
            named[name] = present
    target = np.asarray(reference_target, np.float32).copy()
    judged = np.asarray(reference_mask, np.float32).copy()
    for name, present in named.items():
        target[LABEL_INDEX[name]] = 1.0 if present else 0.0
        judged[LABEL_INDEX[name]] = 1.0
    return EditSpec(target, judged, tuple(n for n, p in named.items() if p), tuple(n for n, p in named.items() if not p))


def edit_sample(spec: EditSpec, original: SampleResult, pull: float, image_pull: float,
                options: LCOOptions | None) -> SampleRequest:
    """The LCO sample that edits ``original``: starts at its latent, judged on ``spec``, every label the
    edit does not judge steered towards the original's probability; the named labels' loss weights
    sum to the others' (mask values above 1, ``SampleRequest``); ``pull`` and ``image_pull`` weigh the
    latent and the image proximity to the original."""
    target = np.where(spec.judged > 0.5, spec.target, original.probabilities).astype(np.float32)
    named = np.isin(np.asarray(LABELS), spec.add + spec.remove)
    weights = weigh_equally(np.ones(NUM_LABELS, bool), named)
    return SampleRequest(target, weights, original.seed, options, start=original.latent, pull=pull,
                         judged=spec.judged, reference=original.image if image_pull > 0 else None,
                         image_pull=image_pull)


def difference_png(before: np.ndarray, after: np.ndarray) -> tuple[bytes, float]:
    """The signed difference after - before of two [H, W] images in [-1, 1] as an RGB PNG, and its scale.

    Red where the edited image is brighter, blue where darker, white where equal; full colour at
    ``scale``, the largest absolute difference (in the images' [-1, 1] units; 0 for identical images).
    """
    difference = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    scale = float(np.abs(difference).max())
    t = difference / scale if scale > 0 else np.zeros_like(difference)
    brighter, darker = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb = np.stack([1 - darker, 1 - brighter - darker, 1 - brighter], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue(), scale


def probabilities_by_label(probabilities: np.ndarray) -> dict[str, float]:
    return {name: round(float(p), 6) for name, p in zip(LABELS, probabilities)}
