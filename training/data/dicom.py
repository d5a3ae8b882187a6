"""DICOM radiographs: a folder tree of ``.dcm`` files, unlabelled or labelled by a CSV, read as a viewer shows them.

Stored values become display values by the DICOM grayscale pipeline (PS3.3 C.11 and C.7.6.3.1.2,
PS3.4 N.2), through pydicom's own functions:

1. pixel data decoded by pydicom (compressed transfer syntaxes by its plugins: pylibjpeg with
   pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-libjpeg for JPEG and JPEG-LS, Pillow built with
   OpenJPEG, or gdcm); ``BitsStored``
   and ``PixelRepresentation`` decide the integer range;
2. Modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence): ``apply_modality_lut``;
3. VOI: the first VOI LUT Sequence item, else the first ``WindowCenter``/``WindowWidth`` pair under
   ``VOILUTFunction`` (``apply_voi_lut``), scaled to [0, 1] by that transform's output range; with
   neither, a robust window from the 0.5th to the 99.5th percentile of the image's non-padding pixels;
4. ``MONOCHROME1`` (high values dark) inverted, so 1 is white (bone) and 0 black (air) for every file;
5. pixels equal to ``PixelPaddingValue`` (up to ``PixelPaddingRangeLimit`` when given) set to 0: they
   are outside the detector, not anatomy, and are left out of the percentile window.

The result is kept at 16 bits (``uint16``, 65535 = white) through the resize to the tensor, so a 12- to
16-bit film keeps its grey levels. Only frontal views are read by default (``ViewPosition`` PA or AP; a
file without ``ViewPosition`` is kept, since nothing says it is lateral). Files that are not a single
grey radiograph (no pixel data, not an image, several frames, colour, CT/MR/PET/NM/US) or that pydicom
cannot parse are left out when the tree is listed, warned about in one line and counted in
``dataset.excluded`` by kind and in ``dataset.skipped["unreadable"]``; laterals are counted in
``excluded["not_frontal"]`` only. A transfer syntax whose decoder is not installed stops the reader with
:class:`DecoderMissingError`, which names the package to install.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.decoders.pylibjpeg import DECODER_DEPENDENCIES as PYLIBJPEG_DEPENDENCIES
from pydicom.uid import UID
from tqdm.auto import tqdm

from service.labels import LABEL_INDEX, NO_FINDING, UnknownLabelError, parse_finding_labels, parse_label
from training.data.base import DataFormatError, ImageDataset, empty_targets
from training.data.images import DEFAULT_MIN_SIZE, ImageSkipped, resize_square
from training.data.nih import DataEntryTable, assign_splits
from training.data.walk import walk_files

log = logging.getLogger("training.data")

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
# Volumetric and ultrasound modalities (PS3.3 C.7.3.1.1.1 defined terms): slices, not radiographs.
CROSS_SECTIONAL_MODALITIES: frozenset[str] = frozenset({"CT", "MR", "PT", "NM", "US"})
# Display window used when a file carries neither a VOI LUT nor a window: robust to the few extreme
# pixels (markers, collimator edges) that a min-max window would stretch to.
PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)
# Why a file is left out when the tree is listed; all but "not_frontal" also count as unreadable.
EXCLUSION_REASONS: tuple[str, ...] = (
    "not_dicom",
    "not_an_image",
    "no_pixel_data",
    "multi_frame",
    "colour",
    "cross_sectional",
    "not_frontal",
)
# Label CSV columns that name the file, in the order they are looked for.
KEY_COLUMNS: tuple[str, ...] = ("Path", "Image Index", "File")
# Header values are read, large values (the pixel data) only located: listing stays fast.
_HEADER_DEFER_SIZE = "64 KB"
UNIT_MAX = 65535  # stored display values are uint16


class DecoderMissingError(DataFormatError):
    """Files use a compressed transfer syntax that no installed pydicom plugin decodes."""


@dataclass(frozen=True)
class DicomRecord:
    """Header attributes of one listed file that the readers and ``convert`` use.

    ``age_years`` is None when ``PatientAge`` is absent or not in years; ``pixel_spacing_mm`` is
    (column, row) spacing from ``PixelSpacing`` or else ``ImagerPixelSpacing``, None when neither is given.
    """

    path: str
    patient_id: str
    view: str
    sex: str
    age_years: int | None
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float] | None


def read_header(path: str | Path) -> Dataset:
    """The file's data set with large values (pixel data) located but not read.

    Raises ``pydicom.errors.InvalidDicomError``, ``OSError``/``EOFError`` or another of pydicom's errors
    for a file that is not DICOM or is cut short or damaged inside its header.
    """
    return pydicom.dcmread(path, defer_size=_HEADER_DEFER_SIZE)


def unsupported_reason(dataset: Dataset) -> tuple[str, str] | None:
    """(reason, detail) when ``dataset`` is not one grey radiograph, else None; reason is in
    :data:`EXCLUSION_REASONS`."""
    modality = str(dataset.get("Modality", "")).upper()
    if modality in CROSS_SECTIONAL_MODALITIES:
        return "cross_sectional", f"Modality {modality} is a cross-sectional series, not a radiograph"
    if "PixelData" not in dataset:
        if "Rows" in dataset:
            return "no_pixel_data", "image attributes but no Pixel Data element"
        return "not_an_image", f"no image ({dataset.get('SOPClassUID', UID('')).name or 'no SOP class'})"
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return "multi_frame", f"{frames} frames (NumberOfFrames); one frame per radiograph is read"
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    if int(dataset.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return "colour", f"PhotometricInterpretation {photometric or 'missing'}; MONOCHROME1 or MONOCHROME2 is read"
    return None


def require_decoder(transfer_syntax: UID, files: int = 1) -> None:
    """Raise :class:`DecoderMissingError` when pydicom cannot decode ``transfer_syntax`` here, naming
    the packages that would (from pydicom's own list of the decoder's missing dependencies)."""
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise DecoderMissingError(
            f"{files} file(s) use the transfer syntax {transfer_syntax.name} ({transfer_syntax}), which pydicom "
            "cannot decode with any plugin; convert them to an uncompressed or JPEG 2000 syntax first"
        ) from None
    if not decoder.is_available:
        # pydicom's own record of what its pylibjpeg plugin needs for this syntax, e.g.
        # ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0") for JPEG 2000; other plugins (gdcm) after it.
        needed = PYLIBJPEG_DEPENDENCIES.get(transfer_syntax)
        install = "pip install " + " ".join(f'"{package}"' for package in needed) if needed else "install a pydicom pixel-data plugin for it"
        others = "; ".join(decoder.missing_dependencies)
        raise DecoderMissingError(
            f"{files} file(s) use the compressed transfer syntax {transfer_syntax.name}, and no pydicom plugin "
            f"that decodes it is installed: {install}" + (f" (other options: {others})" if others else "")
        )


def _padding_mask(dataset: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """True where ``stored`` holds PixelPaddingValue (to PixelPaddingRangeLimit inclusive), PS3.3 C.7.5.1.1.2."""
    if "PixelPaddingValue" not in dataset:
        return None
    value = int(dataset.PixelPaddingValue)
    limit = int(dataset.get("PixelPaddingRangeLimit", value))
    low, high = min(value, limit), max(value, limit)
    mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def _voi_output_range(dataset: Dataset) -> tuple[float, float] | None:
    """The output range of the VOI transform ``apply_voi_lut`` applies to ``dataset``, None without one.

    A VOI LUT's range is 0 … 2^n − 1 for its n bits per entry (PS3.3 C.11.2.1.1); a window's is found by
    passing values beyond both ends of the window through pydicom's own windowing, which clips to it.
    """
    if dataset.get("VOILUTSequence"):
        return 0.0, float(2 ** int(dataset.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        ends = apply_voi_lut(np.array([-1e30, 1e30]), dataset, prefer_lut=False)
        return float(ends.min()), float(ends.max())
    return None


def display_pixels(dataset: Dataset) -> np.ndarray:
    """Display values of a grey radiograph: float64 H×W in [0, 1], 0 black (air), 1 white (bone).

    The pipeline of the module docstring. Raises ``ValueError`` for data sets that are not one grey
    frame (see :func:`unsupported_reason`) and whatever pydicom raises for undecodable pixel data.
    """
    problem = unsupported_reason(dataset)
    if problem is not None:
        raise ValueError(problem[1])
    stored = dataset.pixel_array
    if stored.ndim != 2:
        raise ValueError(f"pixel data has shape {stored.shape}; one grey frame is read")
    padding = _padding_mask(dataset, stored)
    values = apply_modality_lut(stored, dataset)
    output_range = _voi_output_range(dataset)
    if output_range is not None:
        low, high = output_range
        if dataset.get("VOILUTSequence") and np.array_equal(values, np.rint(values)):
            values = values.astype(np.int64)  # a LUT is indexed by integers; rescaling gave whole floats
        values = apply_voi_lut(values, dataset).astype(np.float64)
    else:
        inside = values if padding is None else values[~padding]
        low, high = (float(v) for v in np.percentile(inside, PERCENTILE_WINDOW))
        values = values.astype(np.float64)
    unit = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros(values.shape)
    if str(dataset.PhotometricInterpretation).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    if padding is not None:
        unit[padding] = 0.0
    return unit


def to_uint16(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint16, 65535 = 1 (rounded to nearest)."""
    return np.rint(np.clip(unit, 0.0, 1.0) * UNIT_MAX).astype(np.uint16)


def read_display(path: str | Path, min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """:func:`display_pixels` of the file at ``path``, at its own size.

    Raises :class:`ImageSkipped` (missing, unreadable: truncated, not DICOM, not a grey radiograph,
    undecodable; too_small) and nothing else for bad data.
    """
    try:
        dataset = pydicom.dcmread(path)
        if "PixelData" in dataset and min(int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))) < min_size:
            raise ImageSkipped(path, "too_small", f"{dataset.Columns}×{dataset.Rows} is below {min_size} px")
        return display_pixels(dataset)
    except FileNotFoundError as error:
        raise ImageSkipped(path, "missing", "file not found") from error
    except ImageSkipped:
        raise
    except Exception as error:  # pydicom and its plugins raise many types on damaged files
        raise ImageSkipped(path, "unreadable", f"{type(error).__name__}: {error}") from error


def decode_dicom(path: str | Path, size: int, min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """Read ``path`` and return its display image as a ``size``×``size`` ``uint16`` array (65535 white),
    centre-cropped and resized as :func:`training.data.images.decode_image` does for PNGs.

    Raises :class:`ImageSkipped` as :func:`read_display` does.
    """
    return resize_square(to_uint16(read_display(path, min_size)), size, UNIT_MAX)


def _age_years(value: object) -> int | None:
    """DICOM Age String ("081Y") in years, bare digits taken as years; None for other units or none
    (PS3.5 6.2, VR AS)."""
    text = str(value or "").strip().upper().removesuffix("Y")
    return int(text) if text.isdigit() else None


def _pixel_spacing(dataset: Dataset) -> tuple[float, float] | None:
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    if not spacing or len(spacing) != 2:
        return None
    row_spacing, column_spacing = (float(v) for v in spacing)
    if row_spacing <= 0 or column_spacing <= 0:  # some writers fill the attribute with zeros
        return None
    return column_spacing, row_spacing


def _record(path: str, dataset: Dataset) -> DicomRecord:
    return DicomRecord(
        path=path,
        patient_id=str(dataset.get("PatientID", "") or "").strip(),
        view=str(dataset.get("ViewPosition", "") or "").strip().upper(),
        sex=str(dataset.get("PatientSex", "") or "").strip().upper(),
        age_years=_age_years(dataset.get("PatientAge")),
        rows=int(dataset.get("Rows", 0)),
        columns=int(dataset.get("Columns", 0)),
        pixel_spacing_mm=_pixel_spacing(dataset),
    )


def inspect_file(
    root: Path, name: str, views: set[str] | None
) -> tuple[DicomRecord | None, UID | None, tuple[str, str] | None]:
    """Header of ``root/name``: its record and transfer syntax, or the (reason, detail) it is left out for
    (:func:`unsupported_reason`, or "not_frontal" when ``views`` is given and its ViewPosition is another).
    Raises whatever pydicom raises for a file that is not DICOM or whose header is damaged."""
    dataset = read_header(root / name)
    problem = unsupported_reason(dataset)
    if problem is not None:
        return None, None, problem
    record = _record(name, dataset)  # converts every value used, so a damaged one raises here
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    if not syntax.is_transfer_syntax:  # a damaged header, not a missing plugin
        return None, None, ("not_dicom", f"TransferSyntaxUID {syntax!r} is no transfer syntax")
    if views is not None and record.view and record.view not in views:
        return None, None, ("not_frontal", f"ViewPosition {record.view}")
    return record, syntax, None


def _label_value(text: str, where: str) -> float | None:
    """One-column-per-finding cell: 1 positive, 0 negative, blank unknown."""
    text = text.strip().lower()
    if text in ("", "nan"):
        return None
    if text in ("1", "1.0", "true", "yes"):
        return 1.0
    if text in ("0", "0.0", "false", "no"):
        return 0.0
    raise DataFormatError(f"{where}: label value {text!r}; write 1, 0 or leave it blank (unknown)")


def read_label_csv(csv_path: str | Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels and mask (float32 [len(files), 14]) for ``files`` (paths relative to the root) from a CSV,
    and the CSV's keys that name no file.

    The file column is the first of :data:`KEY_COLUMNS`; a key with a folder (``a/b/x.dcm``) names that
    path, a bare name (``x.dcm`` or NIH's ``x.png``) the file with that stem, the suffix ignored either
    way. Labels come from an NIH "Finding Labels" column ("Effusion|Mass", "No Finding"; all 14 known), or
    else from one column per finding named as in :data:`service.labels.LABELS` or an alias (1, 0, blank
    = unknown; a "No Finding" column of 1 makes every blank finding a known negative). Files without a
    row are unlabelled (mask 0). Raises :class:`DataFormatError` for a missing file column, unknown
    label names or values, a bare name shared by two files, or a CSV of which no row names a file.
    """
    csv_path = Path(csv_path)
    by_path = {str(Path(name).with_suffix("")).replace("\\", "/"): i for i, name in enumerate(files)}
    by_stem: dict[str, list[int]] = {}
    for i, name in enumerate(files):
        by_stem.setdefault(Path(name).stem, []).append(i)
    if not csv_path.is_file():
        raise DataFormatError(f"label CSV {csv_path} does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = [name.strip() for name in next(reader, [])]
        key_column = next((name for name in KEY_COLUMNS if name in header), None)
        if key_column is None:
            raise DataFormatError(
                f"{csv_path} has no file column; name one of {', '.join(KEY_COLUMNS)} (found {header})"
            )
        key_at = header.index(key_column)
        finding_at = header.index("Finding Labels") if "Finding Labels" in header else None
        per_finding: dict[int, int] = {}  # column -> label index
        no_finding_at = None
        if finding_at is None:
            for at, name in enumerate(header):
                if at == key_at:
                    continue
                try:
                    label = parse_label(name)
                except UnknownLabelError:
                    continue  # other columns (Sex, Age, …) are not labels
                if label == NO_FINDING:
                    no_finding_at = at
                else:
                    per_finding[at] = LABEL_INDEX[label]
            if not per_finding:
                raise DataFormatError(
                    f"{csv_path} has neither a 'Finding Labels' column nor a column named after a finding "
                    f"(found {header})"
                )
        labels, mask = empty_targets(len(files))
        unmatched: list[str] = []
        matched = 0
        for line_number, row in enumerate(reader, start=2):
            if not row or not any(field.strip() for field in row):
                continue
            where = f"{csv_path}:{line_number}"
            if len(row) < len(header):
                raise DataFormatError(f"{where}: row has {len(row)} fields, fewer than the header's {len(header)}")
            key = row[key_at].strip().replace("\\", "/")
            if "/" in key:
                index = by_path.get(str(Path(key).with_suffix("")))
            else:
                candidates = by_stem.get(Path(key).stem, [])
                if len(candidates) > 1:
                    shared = ", ".join(files[i] for i in candidates[:3])
                    raise DataFormatError(f"{where}: {key!r} names {len(candidates)} files ({shared}); give the path")
                index = candidates[0] if candidates else None
            if index is None:
                unmatched.append(key)
                continue
            matched += 1
            if finding_at is not None:
                try:
                    labels[index] = parse_finding_labels(row[finding_at])
                except UnknownLabelError as error:
                    raise DataFormatError(f"{where}: {error}") from None
                mask[index] = 1.0
                continue
            none_found = no_finding_at is not None and _label_value(row[no_finding_at], where) == 1.0
            for at, label in per_finding.items():
                value = _label_value(row[at], where)
                if value is None and none_found:
                    value = 0.0
                if value is not None:
                    labels[index, label], mask[index, label] = value, 1.0
    if unmatched and not matched:
        raise DataFormatError(
            f"none of the {len(unmatched)} rows of {csv_path} names a file under the DICOM root "
            f"(first: {', '.join(unmatched[:3])}; files look like: {', '.join(files[:3])})"
        )
    return labels, mask, unmatched


class DicomDataset(ImageDataset):
    """A tree of DICOM radiographs (``*.dcm``, ``*.dicom``) under ``root``, in sorted path order.

    Args:
        root: folder walked by :func:`training.data.walk.walk_files` (links followed, each file once).
        labels_csv: label CSV (see :func:`read_label_csv`); unlabelled (mask 0) when None.
        split: "train", "val", "test" or "all"; patients are assigned by a hash of ``split_seed`` and
            ``PatientID`` as for NIH (:func:`training.data.nih.assign_splits`), so no patient is in two
            splits. A file without ``PatientID`` is a patient of its own.
        size: side of the square images returned.
        views: ``ViewPosition`` values kept (default PA and AP); None keeps every view.
        val_fraction, test_fraction, split_seed: as for :class:`training.data.NIHChestXray14`.
        cache_dir, min_size: the resize cache directory and the smallest accepted side.
        progress: show a progress bar while the headers are read.

    Raises :class:`DataFormatError` when ``root`` is not a folder, holds no usable file, or the label
    CSV is unusable; :class:`DecoderMissingError` when a file's transfer syntax has no decoder here.
    After construction ``excluded`` counts the files left out by reason (:data:`EXCLUSION_REASONS`),
    ``unmatched_label_rows`` the CSV keys that name no file, and ``records`` holds each item's header.
    """

    def __init__(
        self,
        root: str | Path,
        labels_csv: str | Path | None = None,
        split: str = "train",
        size: int = 256,
        *,
        views: Sequence[str] | None = FRONTAL_VIEWS,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        cache_dir: str | Path | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
        progress: bool = False,
    ):
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"split must be one of train, val, test, all; got {split!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataFormatError(f"DICOM folder {self.root} does not exist or is not a folder")
        self.split = split
        listing = walk_files(self.root, DICOM_EXTENSIONS, what="DICOM folder")
        if not listing.files:
            raise DataFormatError(f"no DICOM files ({', '.join(DICOM_EXTENSIONS)}) under {self.root}")
        wanted_views = None if views is None else {view.strip().upper() for view in views}
        excluded: Counter[str] = Counter()
        examples: dict[str, str] = {}
        syntaxes: Counter[UID] = Counter()
        records: list[DicomRecord] = []
        for name in tqdm(listing.files, desc="DICOM headers", unit="file", disable=not progress, leave=False):
            try:
                record, syntax, problem = inspect_file(self.root, name, wanted_views)
            except Exception as error:  # noqa: BLE001 - pydicom raises many types on a damaged header
                record, syntax, problem = None, None, ("not_dicom", f"{type(error).__name__}: {error}")
            if problem is not None:
                excluded[problem[0]] += 1
                examples.setdefault(problem[0], f"{name}: {problem[1]}")
                continue
            syntaxes[syntax] += 1
            records.append(record)
        self.excluded = {reason: excluded[reason] for reason in EXCLUSION_REASONS}
        if excluded:
            log.warning(
                "DICOM folder %s: read %d file(s), left out %s",
                self.root,
                len(records),
                "; ".join(f"{count} {reason} (e.g. {examples[reason]})" for reason, count in excluded.items()),
            )
        if not records:
            raise DataFormatError(f"none of the {len(listing.files)} DICOM files under {self.root} is a usable radiograph")
        for syntax, count in syntaxes.items():
            require_decoder(syntax, count)

        names = [record.path for record in records]
        if labels_csv is None:
            labels, mask = empty_targets(len(records))
            self.unmatched_label_rows = 0
        else:
            labels, mask, unmatched = read_label_csv(labels_csv, names)
            self.unmatched_label_rows = len(unmatched)
            if unmatched:
                log.warning(
                    "%d row(s) of %s name no file under %s (first: %s); %d file(s) have no row and are unlabelled",
                    len(unmatched), labels_csv, self.root, ", ".join(unmatched[:3]), int((mask.sum(axis=1) == 0).sum()),
                )
        patients = np.array([record.patient_id or f"file:{record.path}" for record in records])
        table = DataEntryTable(np.array(names), patients, np.array([r.view for r in records]), labels)
        keep = np.ones(len(records), dtype=bool)
        if split != "all":
            keep = assign_splits(table, (), val_fraction, test_fraction, split_seed) == split
        self.records = [record for record, kept in zip(records, keep) if kept]
        self.paths = np.array(names)[keep]
        self.labels, self.label_mask = labels[keep], mask[keep]
        bad = sum(count for reason, count in excluded.items() if reason != "not_frontal")
        self._init_images(size, cache_dir, min_size, {"unreadable": bad})

    def image_path(self, index: int) -> Path:
        return self.root / str(self.paths[index])

    def decode(self, path: Path) -> np.ndarray:
        return decode_dicom(path, self.size, self.min_size)

    def __repr__(self) -> str:
        return f"DicomDataset(root={str(self.root)!r}, split={self.split!r}, size={self.size}, items={len(self)})"

