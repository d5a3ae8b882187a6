"""The CheXpert reader: label mapping onto the NIH vocabulary under every uncertainty policy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.labels import LABEL_INDEX, LABELS
from training.data import CheXpert, DataFormatError
from training.data.chexpert import CHEXPERT_COLUMNS

# (path, view, AP/PA, {column: value}); blank where a column is not given.
ROWS = [
    (
        "patient00001/study1/view1_frontal.jpg",
        "Frontal",
        "PA",
        {
            "Cardiomegaly": "1.0",
            "Edema": "-1.0",
            "Pleural Effusion": "0.0",
            "Lung Lesion": "0.0",
            "Lung Opacity": "1.0",
        },
    ),
    ("patient00001/study1/view2_lateral.jpg", "Lateral", "", {"Cardiomegaly": "1.0"}),
    (
        "patient00002/study1/view1_frontal.jpg",
        "Frontal",
        "AP",
        {"Atelectasis": "-1.0", "Lung Lesion": "-1.0", "Pneumothorax": "1.0", "Pleural Other": "-1.0"},
    ),
    (
        "patient00003/study2/view1_frontal.jpg",
        "Frontal",
        "PA",
        {"No Finding": "1.0", "Pleural Other": "0.0", "Support Devices": "1.0"},
    ),
]
PREFIX = "CheXpert-v1.0-small/train/"


def write_chexpert(base: Path, rows=ROWS, columns=CHEXPERT_COLUMNS) -> Path:
    """CheXpert-v1.0-small/train.csv and its JPEGs (portrait 80×100 like the downsampled release)."""
    root = base / "CheXpert-v1.0-small"
    rng = np.random.default_rng(1)
    for path, *_ in rows:
        target = root / "train" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((100, 80)) * 255).astype(np.uint8)).save(target, quality=90)
    with open(root / "train.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for path, view, ap_pa, values in rows:
            fixed = {
                "Path": PREFIX + path,
                "Sex": "Female",
                "Age": "60",
                "Frontal/Lateral": view,
                "AP/PA": ap_pa,
            }
            writer.writerow([fixed.get(c, values.get(c, "")) for c in columns])
    return root


def entry(dataset: CheXpert, row: int, label: str) -> tuple[float, float]:
    """(label, mask) of ``label`` for the dataset's ``row``."""
    return float(dataset.labels[row, LABEL_INDEX[label]]), float(dataset.label_mask[row, LABEL_INDEX[label]])


# Frontal rows in order: 0 = patient00001, 1 = patient00002, 2 = patient00003.
EXPECTED = {
    # (row, label): {policy: (label, mask)}
    (0, "Cardiomegaly"): {"zeros": (1, 1), "ones": (1, 1), "ignore": (1, 1)},
    (0, "Edema"): {"zeros": (0, 1), "ones": (1, 1), "ignore": (0, 0)},
    (0, "Effusion"): {"zeros": (0, 1), "ones": (0, 1), "ignore": (0, 1)},
    (0, "Mass"): {"zeros": (0, 1), "ones": (0, 1), "ignore": (0, 1)},  # Lung Lesion 0: no mass, no nodule
    (0, "Nodule"): {"zeros": (0, 1), "ones": (0, 1), "ignore": (0, 1)},
    (0, "Infiltration"): {"zeros": (0, 0), "ones": (0, 0), "ignore": (0, 0)},  # Lung Opacity 1: which one?
    (0, "Atelectasis"): {"zeros": (0, 1), "ones": (0, 1), "ignore": (0, 1)},  # blank = not mentioned
    (1, "Atelectasis"): {"zeros": (0, 1), "ones": (1, 1), "ignore": (0, 0)},
    (1, "Pneumothorax"): {"zeros": (1, 1), "ones": (1, 1), "ignore": (1, 1)},
    (1, "Nodule"): {"zeros": (0, 1), "ones": (0, 0), "ignore": (0, 0)},  # uncertain lesion
    (1, "Pleural_Thickening"): {"zeros": (0, 1), "ones": (0, 0), "ignore": (0, 0)},
    (2, "Pleural_Thickening"): {"zeros": (0, 1), "ones": (0, 1), "ignore": (0, 1)},
    (2, "Cardiomegaly"): {"zeros": (0, 1), "ones": (0, 1), "ignore": (0, 1)},
}


@pytest.mark.parametrize("policy", ["zeros", "ones", "ignore"])
def test_uncertain_policies(tmp_path: Path, policy: str) -> None:
    dataset = CheXpert(write_chexpert(tmp_path), split="train", size=32, uncertain=policy)
    assert len(dataset) == 3  # the lateral view is left out
    for (row, label), by_policy in EXPECTED.items():
        assert entry(dataset, row, label) == by_policy[policy], (row, label, policy)
    # No CheXpert counterpart: never known.
    for label in ("Emphysema", "Fibrosis", "Hernia"):
        assert dataset.label_mask[:, LABEL_INDEX[label]].sum() == 0
    # A label is positive only where it is known.
    assert (dataset.labels <= dataset.label_mask).all()
    assert list(dataset.patient_ids) == ["00001", "00002", "00003"]


def test_blank_as_unknown(tmp_path: Path) -> None:
    dataset = CheXpert(write_chexpert(tmp_path), uncertain="zeros", blank="unknown")
    assert entry(dataset, 0, "Atelectasis") == (0, 0)
    assert entry(dataset, 0, "Effusion") == (0, 1)  # an explicit 0 stays known
    assert entry(dataset, 2, "Cardiomegaly") == (0, 0)
    assert entry(dataset, 2, "Pleural_Thickening") == (0, 1)


def test_items_and_path_resolution(tmp_path: Path) -> None:
    root = write_chexpert(tmp_path)
    # Root = the release folder (Path loses its first component) or its parent (Path as written).
    inside = CheXpert(root, split="train", size=48, frontal_only=False)
    outside = CheXpert(tmp_path, csv_path=root / "train.csv", size=48, frontal_only=False)
    assert len(inside) == len(outside) == 4
    for i in range(4):
        image, labels, mask = inside[i]
        assert image.shape == (1, 48, 48) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1 and image.std() > 0.2
        assert labels.shape == mask.shape == (14,)
        assert torch.equal(image, outside[i][0])
    assert inside.skipped_total == outside.skipped_total == 0
    lateral = inside[1]
    assert lateral[0][0, 0, 0] != inside[0][0][0, 0, 0]
    assert {LABELS[j] for j in torch.nonzero(lateral[1]).flatten().tolist()} == {"Cardiomegaly"}


def test_views_filter(tmp_path: Path) -> None:
    dataset = CheXpert(write_chexpert(tmp_path), views=("AP",))
    assert [str(p) for p in dataset.paths] == [PREFIX + ROWS[2][0]]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    columns = tuple(c for c in CHEXPERT_COLUMNS if c not in ("Edema", "Pleural Effusion"))
    root = write_chexpert(tmp_path, columns=columns)
    with pytest.raises(DataFormatError) as raised:
        CheXpert(root)
    assert "'Edema'" in str(raised.value) and "'Pleural Effusion'" in str(raised.value)


def test_invalid_label_value(tmp_path: Path) -> None:
    rows = [*ROWS[:1], ("patient00009/study1/view1_frontal.jpg", "Frontal", "PA", {"Edema": "maybe"})]
    with pytest.raises(DataFormatError, match=r"Edema = 'maybe' for .*patient00009"):
        CheXpert(write_chexpert(tmp_path, rows=rows))


def test_invalid_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="zeros, ones, ignore"):
        CheXpert(write_chexpert(tmp_path), uncertain="half")


def test_open_dataset_spec(tmp_path: Path) -> None:
    from training.data import open_dataset

    root = write_chexpert(tmp_path)
    dataset = open_dataset(f"chexpert:{root}", 32, uncertain="ones")
    assert isinstance(dataset, CheXpert) and dataset.uncertain == "ones"
    assert np.array_equal(dataset.label_mask, CheXpert(root, uncertain="ones").label_mask)
    with pytest.raises(DataFormatError, match="valid.csv does not exist"):
        open_dataset(f"chexpert:{root}", 32, split="val")


def test_images_are_read_as_a_viewer_shows_them(tmp_path: Path) -> None:
    root = write_chexpert(tmp_path)
    # The first frontal film, stored with its top half white and EXIF Orientation 6 (turn 90° clockwise).
    pixels = np.zeros((64, 64), np.uint8)
    pixels[:32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(root / "train" / ROWS[0][0], exif=exif, quality=95)
    image = CheXpert(root, size=64)[0][0][0]
    assert image[:, :30].mean() < -0.9 and image[:, 34:].mean() > 0.9
