"""NIH ChestX-ray14: the Data_Entry CSV plus the image folder, with leak-free patient-level splits.

Reads ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``, gzipped or not) as NIH publishes it
and phantom data sets written by ``python -m training.phantoms write`` (same layout). Images are looked
up in ``root/images/`` or the per-archive folders ``root/images_0XX/images/`` (Kaggle layout), with
one directory listing per folder instead of one ``stat`` per image.

Splits: when ``train_val_list.txt`` / ``test_list.txt`` (NIH's official lists) sit in ``root`` or
next to the CSV they decide test versus train+val; otherwise each patient is assigned by a hash of
``split_seed`` and the Patient ID. Validation is carved out of train+val by the same patient hash, so
in every case no patient appears in two of train, val and test.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.labels import NUM_LABELS, UnknownLabelError, parse_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS, REQUIRED_COLUMNS
from training.data.base import DataFormatError, ImageDataset
from training.data.images import DEFAULT_MIN_SIZE

log = logging.getLogger("training.data")

CSV_NAMES: tuple[str, ...] = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")


class DataEntryTable:
    """The parsed Data_Entry CSV: one entry per row, read-only numpy columns (cheap to share with workers)."""

    def __init__(
        self, image_names: np.ndarray, patient_ids: np.ndarray, views: np.ndarray, labels: np.ndarray
    ):
        self.image_names = image_names
        self.patient_ids = patient_ids
        self.views = views
        self.labels = labels
        for array in (image_names, patient_ids, views, labels):
            array.setflags(write=False)

    def __len__(self) -> int:
        return len(self.image_names)


def find_data_entry_csv(root: str | Path) -> Path:
    """The Data_Entry CSV in ``root``: the NIH file names first, then any ``Data_Entry*.csv[.gz]``."""
    root = Path(root)
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    others = sorted(p for p in root.glob("Data_Entry*.csv*") if p.is_file())
    if others:
        return others[0]
    raise DataFormatError(
        f"no Data_Entry CSV in {root}; expected one of {', '.join(CSV_NAMES)} or pass csv_path="
    )


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, newline="", encoding="utf-8-sig")


def read_data_entry(csv_path: str | Path) -> DataEntryTable:
    """Parse a Data_Entry CSV; the result is memoised per file version (train/val/test share one parse)."""
    path = Path(csv_path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataFormatError(f"Data_Entry CSV {path} does not exist") from None
    return _read_data_entry(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_data_entry(path: str, mtime_ns: int, byte_size: int) -> DataEntryTable:
    del mtime_ns, byte_size  # part of the memo key only
    with _open_text(Path(path)) as file:
        reader = csv.reader(file)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise DataFormatError(f"{path} is empty; expected the NIH Data_Entry header") from None
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise DataFormatError(
                f"{path} is missing required column(s) {', '.join(repr(m) for m in missing)}; "
                f"found {header}. An NIH Data_Entry CSV has the columns {', '.join(DATA_ENTRY_COLUMNS)}"
            )
        name_at, labels_at, patient_at = (header.index(name) for name in REQUIRED_COLUMNS)
        view_at = header.index("View Position") if "View Position" in header else None
        names: list[str] = []
        patients: list[str] = []
        views: list[str] = []
        vectors: list[np.ndarray] = []
        parsed: dict[str, np.ndarray] = {}  # ~800 distinct label combinations in 112k rows
        for line_number, row in enumerate(reader, start=2):
            if not row or not any(field.strip() for field in row):
                continue
            if len(row) <= max(name_at, labels_at, patient_at):
                raise DataFormatError(
                    f"{path}:{line_number}: row has {len(row)} fields, fewer than the header"
                )
            field = row[labels_at].strip()
            if field not in parsed:
                try:
                    parsed[field] = parse_finding_labels(field)
                except UnknownLabelError as error:
                    raise DataFormatError(f"{path}:{line_number}: {error}") from None
            names.append(row[name_at].strip())
            patients.append(_normalise_patient_id(row[patient_at]))
            views.append(row[view_at].strip() if view_at is not None and len(row) > view_at else "")
            vectors.append(parsed[field])
    if not names:
        raise DataFormatError(f"{path} has a header but no rows")
    labels = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, NUM_LABELS), np.float32)
    return DataEntryTable(np.array(names), np.array(patients), np.array(views), labels)


def _normalise_patient_id(value: str) -> str:
    """ "00012" and "12" are the same patient; non-numeric IDs are kept as written."""
    value = value.strip()
    return str(int(value)) if value.isdigit() else value


def patient_fraction(patient_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row, fixed by (seed, patient): rows of one patient always agree."""
    unique, inverse = np.unique(patient_ids, return_inverse=True)
    values = np.empty(len(unique), dtype=np.float64)
    for i, patient in enumerate(unique):
        digest = hashlib.blake2b(f"{seed}/{patient}".encode(), digest_size=8).digest()
        values[i] = int.from_bytes(digest, "little") / 2.0**64
    return values[inverse]


def read_image_list(path: Path) -> set[str]:
    """Image names in an NIH split list (one per line)."""
    with open(path, encoding="utf-8") as file:
        return {line.strip() for line in file if line.strip()}


def assign_splits(
    table: DataEntryTable,
    list_dirs: Sequence[Path] = (),
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """Split name per row ("train", "val", "test", or "" for rows the official lists leave out)."""
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and their sum < 1; got {val_fraction}, {test_fraction}"
        )
    fraction = patient_fraction(table.patient_ids, seed)
    train_val_list = test_list = None
    for directory in list_dirs:
        if train_val_list is None and (directory / TRAIN_VAL_LIST).is_file():
            train_val_list = read_image_list(directory / TRAIN_VAL_LIST)
        if test_list is None and (directory / TEST_LIST).is_file():
            test_list = read_image_list(directory / TEST_LIST)
    if train_val_list is None and test_list is None:
        in_test = fraction < test_fraction
        # Both fractions are shares of all patients: [0, test) test, [test, test + val) val, rest train.
        in_val = ~in_test & (fraction < test_fraction + val_fraction)
        in_train_val = ~in_test
    else:
        # One list alone defines the other as its complement.
        names = table.image_names
        in_test = (
            np.isin(names, list(test_list))
            if test_list is not None
            else ~np.isin(names, list(train_val_list))
        )
        in_train_val = (
            np.isin(names, list(train_val_list)) & ~in_test if train_val_list is not None else ~in_test
        )
        in_val = in_train_val & (fraction < val_fraction)
    splits = np.full(len(table), "", dtype="<U5")
    splits[in_train_val] = "train"
    splits[in_val] = "val"
    splits[in_test] = "test"
    return splits


class NIHChestXray14(ImageDataset):
    """NIH ChestX-ray14 (Wang et al. 2017) in its published layout.

    Args:
        root: folder holding the CSV (unless ``csv_path``), the images and optionally the split lists.
        csv_path: the Data_Entry CSV; found in ``root`` when omitted.
        split: "train", "val", "test" or "all".
        size: side of the square images returned.
        views: keep only these "View Position" values (e.g. ``("PA",)``); all when None.
        val_fraction, test_fraction: patient shares for the hash split (test only without official lists).
        split_seed: seed of the patient hash.
        index_images: list the image folders once and drop rows whose file is absent (warned, counted in
            ``skipped["missing"]``). With False, nothing on disk is required: labels are indexed for all
            rows, images are looked for in ``root/images/`` then ``root`` when read, and an absent one is
            skipped then.
        cache_dir: resize cache directory (see :mod:`training.data.cache`); none when None.
        min_size: smallest accepted image side; smaller images are skipped.
    """

    def __init__(
        self,
        root: str | Path,
        csv_path: str | Path | None = None,
        split: str = "train",
        size: int = 256,
        *,
        views: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        index_images: bool = True,
        cache_dir: str | Path | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        self.root = Path(root)
        self.csv_path = Path(csv_path) if csv_path is not None else find_data_entry_csv(self.root)
        self.split = split
        table = read_data_entry(self.csv_path)
        row_splits = assign_splits(
            table, (self.root, self.csv_path.parent), val_fraction, test_fraction, split_seed
        )
        keep = np.ones(len(table), dtype=bool) if split == "all" else row_splits == split
        if views is not None:
            wanted = [view.strip().upper() for view in views]
            keep &= np.isin(np.char.upper(table.views), wanted)

        missing_count = 0
        if index_images:
            self._dirs, dir_of = self._index_image_dirs(table.image_names)
            found = dir_of >= 0
            missing_count = int((keep & ~found).sum())
            if missing_count:
                log.warning(
                    "%d of %d images listed in %s for split %r are not under %s; skipped",
                    missing_count,
                    int(keep.sum()),
                    self.csv_path.name,
                    split,
                    self.root,
                )
            keep &= found
            self._dir_index = dir_of[keep].astype(np.int32)
        else:
            self._dirs = []  # looked up per read in image_path
            self._dir_index = np.zeros(int(keep.sum()), dtype=np.int32)

        self.image_names = table.image_names[keep]
        self.patient_ids = table.patient_ids[keep]
        self.views = table.views[keep]
        self.labels = table.labels[keep]
        self.label_mask = np.ones_like(self.labels)
        self._init_images(size, cache_dir, min_size, {"missing": missing_count})

    def _index_image_dirs(self, names: np.ndarray) -> tuple[list[Path], np.ndarray]:
        """Folder index per row (-1 when absent) from one listing of each candidate folder."""
        candidates = [
            self.root / "images",
            *sorted(self.root.glob("images_*/images")),
            *sorted(p for p in self.root.glob("images_*") if p.is_dir()),
            self.root,
        ]
        dirs: list[Path] = []
        location: dict[str, int] = {}
        for directory in candidates:
            if not directory.is_dir() or directory in dirs:
                continue
            dirs.append(directory)
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name not in location and entry.is_file():
                        location[entry.name] = len(dirs) - 1
        dir_of = np.fromiter((location.get(name, -1) for name in names), dtype=np.int32, count=len(names))
        if len(names) and (dir_of < 0).all():
            raise DataFormatError(
                f"none of the {len(names)} images named in {self.csv_path.name} exist under {self.root} "
                "(looked in images/, images_*/images/, images_*/ and the root itself); "
                "pass index_images=False to read the labels without images"
            )
        return dirs, dir_of

    def image_path(self, index: int) -> Path:
        name = str(self.image_names[index])
        if self._dirs:
            return self._dirs[self._dir_index[index]] / name
        # Label-only index: the flat NIH layout, else the root itself.
        flat = self.root / "images" / name
        return flat if flat.is_file() else self.root / name

    def __repr__(self) -> str:
        return f"NIHChestXray14(root={str(self.root)!r}, split={self.split!r}, size={self.size}, items={len(self)})"
