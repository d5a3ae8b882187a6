"""The NIH ChestX-ray14 label vocabulary, shared by training and serving (no torch).

Names are spelled exactly as the NIH Data_Entry CSV spells them; parsing accepts any case and the
aliases that other data sets and the NIH bounding-box file use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
NUM_LABELS = len(LABELS)
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}

# Spellings seen in CheXpert, the NIH bounding-box file and radiology reports.
_ALIASES = {
    "pleural effusion": "Effusion",
    "pleural thickening": "Pleural_Thickening",
    "pleural-thickening": "Pleural_Thickening",
    "infiltrate": "Infiltration",
    "infiltrates": "Infiltration",
    "enlarged heart": "Cardiomegaly",
    "nofinding": NO_FINDING,
    "no_finding": NO_FINDING,
    "normal": NO_FINDING,
}
_CANONICAL = {name.lower(): name for name in (*LABELS, NO_FINDING)} | _ALIASES


class UnknownLabelError(ValueError):
    """A label name that is neither an NIH label nor a known alias."""

    def __init__(self, name: object):
        self.name = name
        valid = ", ".join((*LABELS, NO_FINDING))
        super().__init__(f"unknown label {name!r}; valid labels are: {valid}")


def parse_label(name: str) -> str:
    """Return the canonical NIH spelling of ``name`` (any case, aliases allowed)."""
    if not isinstance(name, str):
        raise UnknownLabelError(name)
    key = " ".join(name.strip().split()).lower()
    if key in _CANONICAL:
        return _CANONICAL[key]
    if key.replace(" ", "_") in _CANONICAL:
        return _CANONICAL[key.replace(" ", "_")]
    raise UnknownLabelError(name)


def labels_to_vector(names: Iterable[str]) -> np.ndarray:
    """Multi-hot float32 vector of length 14; "No Finding" contributes nothing."""
    vector = np.zeros(NUM_LABELS, dtype=np.float32)
    for name in names:
        label = parse_label(name)
        if label != NO_FINDING:
            vector[LABEL_INDEX[label]] = 1.0
    return vector


def parse_finding_labels(field: str) -> np.ndarray:
    """Parse an NIH "Finding Labels" field ("Effusion|Mass" or "No Finding")."""
    return labels_to_vector(part for part in field.split("|") if part.strip())


def format_finding_labels(vector: Sequence[float] | np.ndarray) -> str:
    """The NIH "Finding Labels" field for a multi-hot vector."""
    names = [LABELS[i] for i, value in enumerate(vector) if value > 0.5]
    return "|".join(names) if names else NO_FINDING
