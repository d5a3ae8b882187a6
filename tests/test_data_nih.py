"""The NIH ChestX-ray14 reader against the real Data_Entry table, split lists and an NIH-layout folder."""

from __future__ import annotations

import csv
import gzip
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.labels import LABEL_INDEX, LABELS
from service.nih_format import DATA_ENTRY_COLUMNS
from training.data import DataFormatError, NIHChestXray14, make_loader

NIH_ROWS = 112_120


@pytest.fixture(scope="module")
def real_rows(nih_csv: Path) -> list[dict[str, str]]:
    with gzip.open(nih_csv, "rt", newline="") as file:
        return list(csv.DictReader(file))


def labels_only(nih_csv: Path, split: str, root: Path | None = None, **options) -> NIHChestXray14:
    return NIHChestXray14(
        root or nih_csv.parent, csv_path=nih_csv, split=split, index_images=False, **options
    )


def test_real_csv_rows_and_label_counts(nih_csv: Path, real_rows: list[dict[str, str]]) -> None:
    dataset = labels_only(nih_csv, "all")
    assert len(dataset) == len(real_rows) == NIH_ROWS
    expected = Counter(name for row in real_rows for name in row["Finding Labels"].split("|"))
    assert dataset.label_counts() == {name: expected[name] for name in LABELS}
    assert (dataset.label_mask == 1).all()
    no_finding = dataset.labels.sum(axis=1) == 0
    assert int(no_finding.sum()) == expected["No Finding"]
    # Row order and per-row vectors follow the CSV.
    for i in (0, 1, 4242, NIH_ROWS - 1):
        row = real_rows[i]
        assert dataset.image_names[i] == row["Image Index"]
        want = np.zeros(14, np.float32)
        for name in row["Finding Labels"].split("|"):
            if name != "No Finding":
                want[LABEL_INDEX[name]] = 1
        assert np.array_equal(dataset.labels[i], want)


def test_patient_split_is_leak_free_and_complete(nih_csv: Path) -> None:
    parts = {split: labels_only(nih_csv, split) for split in ("train", "val", "test")}
    assert sum(len(part) for part in parts.values()) == NIH_ROWS
    names = np.concatenate([part.image_names for part in parts.values()])
    assert len(set(names.tolist())) == NIH_ROWS
    patients = {split: set(part.patient_ids.tolist()) for split, part in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    total = sum(len(p) for p in patients.values())
    assert total == 30_805
    assert abs(len(patients["test"]) / total - 0.2) < 0.02 and abs(len(patients["val"]) / total - 0.1) < 0.02
    # Deterministic for a seed, different for another.
    assert np.array_equal(labels_only(nih_csv, "val").image_names, parts["val"].image_names)
    other = labels_only(nih_csv, "val", split_seed=1)
    assert not np.array_equal(other.image_names, parts["val"].image_names)


def test_official_lists_are_honoured(nih_csv: Path, real_rows: list[dict[str, str]], tmp_path: Path) -> None:
    # Official-style lists: a patient-level split that differs from the hash split.
    test_names = [r["Image Index"] for r in real_rows if int(r["Patient ID"]) % 4 == 0]
    train_val_names = [r["Image Index"] for r in real_rows if int(r["Patient ID"]) % 4 in (1, 2)]
    (tmp_path / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(train_val_names) + "\n")
    test = labels_only(nih_csv, "test", root=tmp_path)
    train = labels_only(nih_csv, "train", root=tmp_path)
    val = labels_only(nih_csv, "val", root=tmp_path)
    assert sorted(test.image_names.tolist()) == sorted(test_names)
    assert sorted([*train.image_names.tolist(), *val.image_names.tolist()]) == sorted(train_val_names)
    assert not set(train.patient_ids.tolist()) & set(val.patient_ids.tolist())
    assert 0.05 < len(val) / len(train_val_names) < 0.15
    # Rows in neither list belong to no split, only to "all".
    assert len(labels_only(nih_csv, "all", root=tmp_path)) == NIH_ROWS

    # A test list alone: train+val is its complement.
    (tmp_path / "train_val_list.txt").unlink()
    train = labels_only(nih_csv, "train", root=tmp_path)
    val = labels_only(nih_csv, "val", root=tmp_path)
    assert len(train) + len(val) == NIH_ROWS - len(test_names)
    assert not set(train.image_names.tolist()) & set(test_names)


def test_views_filter(nih_csv: Path, real_rows: list[dict[str, str]]) -> None:
    pa = labels_only(nih_csv, "all", views=("PA",))
    assert len(pa) == sum(r["View Position"] == "PA" for r in real_rows)
    assert set(pa.views.tolist()) == {"PA"}


def write_nih_folder(
    root: Path,
    real_rows: list[dict[str, str]],
    count: int,
    nested: bool,
    csv_name: str = "Data_Entry_2017_v2020.csv",
) -> list[dict[str, str]]:
    """An NIH-layout folder (as ``python -m training.phantoms write`` produces) for the first ``count`` rows."""
    rows = real_rows[:count]
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        folder = root / (f"images_{1 + i % 2:03d}/images" if nested else "images")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((96, 96)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / row["Image Index"])
    with open(root / csv_name, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(DATA_ENTRY_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    row[c]
                    for c in (
                        "Image Index",
                        "Finding Labels",
                        "Follow-up #",
                        "Patient ID",
                        "Patient Age",
                        "Patient Gender",
                        "View Position",
                    )
                ]
                + ["1024"] * 4
            )
    return rows


# NIH's own file name, flat and per-archive image folders; and the name this project's archives use.
@pytest.mark.parametrize(
    ("nested", "csv_name"),
    [(False, "Data_Entry_2017_v2020.csv"), (True, "Data_Entry_2017_v2020.csv"), (False, "Data_Entry.csv")],
)
def test_reads_nih_layout_folder(
    tmp_path: Path, real_rows: list[dict[str, str]], nested: bool, csv_name: str
) -> None:
    rows = write_nih_folder(tmp_path, real_rows, 12, nested, csv_name)
    dataset = NIHChestXray14(tmp_path, split="all", size=64)
    assert len(dataset) == 12 and dataset.skipped_total == 0
    for i in (0, 5, 11):
        image, labels, mask = dataset[i]
        assert image.shape == (1, 64, 64) and image.dtype == torch.float32
        assert -1 <= image.min() < -0.5 and 0.5 < image.max() <= 1
        names = {LABELS[j] for j in torch.nonzero(labels).flatten().tolist()}
        assert names == set(rows[i]["Finding Labels"].split("|")) - {"No Finding"}
        assert mask.sum() == 14
    batch = next(iter(make_loader(dataset, batch_size=4, workers=0, seed=0)))
    assert [t.shape for t in batch] == [(4, 1, 64, 64), (4, 14), (4, 14)]


def test_missing_image_files_are_skipped_and_counted(
    tmp_path: Path, real_rows: list[dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    rows = write_nih_folder(tmp_path, real_rows, 10, nested=True)
    gone = [rows[3]["Image Index"], rows[7]["Image Index"]]
    for path in tmp_path.rglob("*.png"):
        if path.name in gone:
            path.unlink()
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = NIHChestXray14(tmp_path, split="all", size=32)
    assert len(dataset) == 8 and dataset.skipped == {"missing": 2, "unreadable": 0, "too_small": 0}
    assert not set(gone) & set(dataset.image_names.tolist())
    assert any("2 of 10 images" in record.getMessage() for record in caplog.records)

    # Label-only mode keeps every row and notices the absence when the item is read.
    lazy = NIHChestXray14(tmp_path, split="all", size=32, index_images=False)
    assert len(lazy) == 10
    flat = tmp_path / "images"
    flat.mkdir()
    for path in list(tmp_path.glob("images_*/images/*.png")):
        path.rename(flat / path.name)
    items = [lazy[i] for i in range(10)]
    assert all(item[0].shape == (1, 32, 32) for item in items)
    assert lazy.skipped == {"missing": 2, "unreadable": 0, "too_small": 0}


def test_folder_without_any_listed_image_is_a_clear_error(
    tmp_path: Path, real_rows: list[dict[str, str]]
) -> None:
    write_nih_folder(tmp_path, real_rows, 3, nested=False)
    for path in (tmp_path / "images").iterdir():
        path.unlink()
    with pytest.raises(DataFormatError, match="index_images=False"):
        NIHChestXray14(tmp_path, split="all")


def test_csv_missing_columns_names_them(tmp_path: Path) -> None:
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Follow-up #,Patient Age\n00000001_000.png,0,57\n"
    )
    with pytest.raises(DataFormatError) as raised:
        NIHChestXray14(tmp_path, split="all", index_images=False)
    message = str(raised.value)
    assert (
        "'Finding Labels'" in message
        and "'Patient ID'" in message
        and "'Image Index'" not in message.split(";")[0]
    )


def test_unknown_label_in_csv_is_an_error_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Patient ID\na.png,Effusion,1\nb.png,Effusion|Broken Arm,2\n"
    )
    with pytest.raises(DataFormatError, match=r"Data_Entry_2017.csv:3.*Broken Arm"):
        NIHChestXray14(tmp_path, split="all", index_images=False)


def test_bad_split_name(nih_csv: Path) -> None:
    with pytest.raises(ValueError, match="train, val, test, all"):
        labels_only(nih_csv, "training")


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_reads_phantom_sets_written_to_disk(tmp_path: Path, bit_depth: int) -> None:
    """``python -m training.phantoms write`` output read by the NIH reader equals the on-the-fly phantoms."""
    from training.data import PhantomDataset
    from training.phantoms.dataset import write_dataset

    count = 24
    write_dataset(tmp_path, count, 32, seed=3, bit_depth=bit_depth, workers=1, progress=False)
    from_disk = NIHChestXray14(tmp_path, split="all", size=32)
    on_the_fly = PhantomDataset(count, 32, seed=3)
    assert len(from_disk) == count and from_disk.skipped_total == 0
    quantum = 2.0 / (2**bit_depth - 1)
    order = np.argsort(from_disk.image_names)  # file names follow the phantom index
    for row, index in enumerate(order[:6]):
        disk_image, disk_labels, _ = from_disk[int(index)]
        image, labels, _ = on_the_fly[row]
        assert torch.equal(disk_labels, labels)
        assert (disk_image - image).abs().max() <= quantum / 2 + 1e-6
    splits = [
        NIHChestXray14(tmp_path, split=s, size=32, val_fraction=0.3, test_fraction=0.3)
        for s in ("train", "val", "test")
    ]
    assert sum(len(s) for s in splits) == count
    patients = [set(s.patient_ids.tolist()) for s in splits]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
