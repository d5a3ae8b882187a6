"""CheXpert (Irvin et al. 2019): ``train.csv`` / ``valid.csv`` mapped onto the NIH label vocabulary.

Label values in CheXpert are 1 (positive), 0 (negative), -1 (uncertain) and blank (not mentioned).

* Seven findings map one to one: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
  (-> Effusion), Pneumonia, Pneumothorax.
* Three CheXpert findings are wider than NIH ones: Lung Lesion contains Mass and Nodule, Lung Opacity
  contains Infiltration, Pleural Other contains Pleural_Thickening. Their negative makes the narrower
  NIH labels known negatives; their positive leaves them unknown (mask 0), since it does not say which.
* Emphysema, Fibrosis and Hernia have no CheXpert counterpart: always mask 0.
* Blank defaults to negative (``blank="negative"``), as in the CheXpert paper's baselines: the labeller
  found no mention. ``blank="unknown"`` masks blanks out instead.
* Uncertain (-1) follows ``uncertain``: "zeros" (U-Zeros), "ones" (U-Ones), or "ignore" (mask 0).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.labels import LABEL_INDEX, NUM_LABELS
from training.data.base import DataFormatError, ImageDataset
from training.data.images import DEFAULT_MIN_SIZE

DIRECT_MAP: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
SUPERSET_MAP: dict[str, tuple[str, ...]] = {
    "Lung Lesion": ("Mass", "Nodule"),
    "Lung Opacity": ("Infiltration",),
    "Pleural Other": ("Pleural_Thickening",),
}
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("Path", *DIRECT_MAP, *SUPERSET_MAP)
UNCERTAIN_POLICIES: tuple[str, ...] = ("zeros", "ones", "ignore")
BLANK_POLICIES: tuple[str, ...] = ("negative", "unknown")
_PATIENT = re.compile(r"patient(\d+)")


def _resolve(values: np.ndarray, uncertain: str, blank: str) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert values (1, 0, -1, NaN) -> (label, known) float32 under the two policies."""
    label = (values == 1).astype(np.float32)
    known = (values == 1) | (values == 0)
    if blank == "negative":
        known |= np.isnan(values)
    if uncertain == "ones":
        label[values == -1] = 1.0
    if uncertain in ("zeros", "ones"):
        known |= values == -1
    return label, known.astype(np.float32)


class CheXpert(ImageDataset):
    """CheXpert images with NIH-vocabulary labels and a known-label mask.

    Args:
        root: the folder holding ``train.csv``/``valid.csv`` (``CheXpert-v1.0-small/``) or its parent;
            the CSV's ``Path`` column is resolved against it, with or without its first component.
        split: "train" or "valid" (reads ``root/<split>.csv``) unless ``csv_path`` is given.
        uncertain: policy for -1 labels: "zeros", "ones" or "ignore" (mask 0).
        blank: "negative" (default) or "unknown" for labels the report does not mention.
        frontal_only: keep frontal views only (the GAN and classifiers work on frontal films).
        views: keep only these "AP/PA" values; all when None.
    """

    def __init__(
        self,
        root: str | Path,
        csv_path: str | Path | None = None,
        split: str = "train",
        size: int = 256,
        *,
        uncertain: str = "zeros",
        blank: str = "negative",
        frontal_only: bool = True,
        views: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
    ):
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}; got {uncertain!r}")
        if blank not in BLANK_POLICIES:
            raise ValueError(f"blank must be one of {', '.join(BLANK_POLICIES)}; got {blank!r}")
        split = "valid" if split == "val" else split
        self.root = Path(root)
        if csv_path is None:
            if split not in ("train", "valid"):
                raise ValueError(f"split must be 'train' or 'valid'; got {split!r}")
            csv_path = self.root / f"{split}.csv"
        self.csv_path = Path(csv_path)
        self.split, self.uncertain, self.blank = split, uncertain, blank

        header, rows = self._read_csv(frontal_only, views)
        column = {name: i for i, name in enumerate(header)}
        paths = [row[column["Path"]].strip() for row in rows]
        raw = {
            name: self._column_values(rows, column[name], name, paths)
            for name in REQUIRED_COLUMNS
            if name != "Path"
        }

        labels = np.zeros((len(rows), NUM_LABELS), dtype=np.float32)
        mask = np.zeros_like(labels)
        for chexpert_name, nih_name in DIRECT_MAP.items():
            target = LABEL_INDEX[nih_name]
            labels[:, target], mask[:, target] = _resolve(raw[chexpert_name], uncertain, blank)
        for chexpert_name, nih_names in SUPERSET_MAP.items():
            label, known = _resolve(raw[chexpert_name], uncertain, blank)
            negative_known = known * (1.0 - label)
            for nih_name in nih_names:
                mask[:, LABEL_INDEX[nih_name]] = negative_known  # label stays 0

        self.paths = np.array(paths)
        self.patient_ids = np.array([m.group(1) if (m := _PATIENT.search(p)) else "" for p in paths])
        self.labels, self.label_mask = labels, mask
        self._strip_first = self._detect_path_base()
        self._init_images(size, cache_dir, min_size)

    def _read_csv(self, frontal_only: bool, views: Sequence[str] | None) -> tuple[list[str], list[list[str]]]:
        if not self.csv_path.is_file():
            raise DataFormatError(f"CheXpert CSV {self.csv_path} does not exist")
        with open(self.csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            needed = [
                *REQUIRED_COLUMNS,
                *(["Frontal/Lateral"] if frontal_only else []),
                *(["AP/PA"] if views else []),
            ]
            missing = [name for name in needed if name not in header]
            if missing:
                raise DataFormatError(
                    f"{self.csv_path} is missing required column(s) {', '.join(repr(m) for m in missing)}; "
                    f"found {header}. A CheXpert CSV has the columns {', '.join(CHEXPERT_COLUMNS)}"
                )
            rows = [row for row in reader if row and any(field.strip() for field in row)]
        short = next((i for i, row in enumerate(rows) if len(row) < len(header)), None)
        if short is not None:
            raise DataFormatError(f"{self.csv_path}:{short + 2}: row has fewer fields than the header")
        if frontal_only:
            at = header.index("Frontal/Lateral")
            rows = [row for row in rows if row[at].strip().lower() == "frontal"]
        if views:
            at, wanted = header.index("AP/PA"), {view.strip().upper() for view in views}
            rows = [row for row in rows if row[at].strip().upper() in wanted]
        return header, rows

    def _column_values(self, rows: list[list[str]], at: int, name: str, paths: list[str]) -> np.ndarray:
        values = np.full(len(rows), np.nan, dtype=np.float64)
        for i, row in enumerate(rows):
            text = row[at].strip()
            if not text:
                continue
            try:
                values[i] = float(text)
            except ValueError:
                values[i] = np.inf  # reported below with the valid values
            if values[i] not in (-1.0, 0.0, 1.0):
                raise DataFormatError(
                    f"{self.csv_path}: {name} = {text!r} for {paths[i]}; CheXpert labels are 1, 0, -1 or blank"
                )
        return values

    def _detect_path_base(self) -> bool:
        """Whether ``Path`` must lose its first component ("CheXpert-v1.0-small/") to exist under root."""
        for path in self.paths[:16]:
            if (self.root / path).is_file():
                return False
            if (self.root / _without_first(path)).is_file():
                return True
        return False

    def image_path(self, index: int) -> Path:
        path = str(self.paths[index])
        return self.root / (_without_first(path) if self._strip_first else path)

    def __repr__(self) -> str:
        return (
            f"CheXpert(root={str(self.root)!r}, split={self.split!r}, uncertain={self.uncertain!r}, "
            f"size={self.size}, items={len(self)})"
        )


def _without_first(path: str) -> str:
    parts = Path(path).parts
    return str(Path(*parts[1:])) if len(parts) > 1 else path
