"""Procedural chest x-ray phantoms: labelled, deterministic, any power-of-two size from 32² to 1024².

A phantom is a frontal (PA) chest radiograph drawn from a seed: body outline and soft tissue, two lung
fields with branching vessel markings, heart and mediastinum, spine, ribs, clavicles and diaphragm
domes, varied in anatomy, pose, exposure and noise, plus a visible, measurable signature for each of
the 14 NIH findings it is labelled with (see :mod:`training.phantoms.findings`).

    image = render_phantom(labels, size=64, seed=7)         # float32 [64, 64] in [0, 1]
    image, labels = sample_phantom(index, size=64, seed=0)  # labels drawn from the NIH prior
    scores = measure(image, make_scene(7))                  # each finding's signature, read from pixels
"""

from training.phantoms.dataset import write_dataset
from training.phantoms.measure import MEASUREMENTS, Measurement, measure, measure_finding
from training.phantoms.render import (
    MAX_SIZE,
    MIN_SIZE,
    Scene,
    make_scene,
    render_phantom,
    render_scene,
    request_phantoms,
    sample_phantom,
)
from training.phantoms.sheet import contact_sheet, write_contact_sheet

__all__ = [
    "MAX_SIZE",
    "MEASUREMENTS",
    "MIN_SIZE",
    "Measurement",
    "Scene",
    "contact_sheet",
    "make_scene",
    "measure",
    "measure_finding",
    "render_phantom",
    "render_scene",
    "request_phantoms",
    "sample_phantom",
    "write_contact_sheet",
    "write_dataset",
]
