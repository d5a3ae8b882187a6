"""CLI command ``convert`` (registered by training.cli): a DICOM tree written once into the NIH layout.

    python -m training.cli convert DICOM_ROOT OUT [--labels CSV] [--bit-depth 8|16] [--size N] [--all-views]

OUT receives ``images/<relative path with "_" for "/">.png`` (each file's display image, see
:mod:`training.data.dicom`; full size unless ``--size``, 16-bit with ``--bit-depth 16``) and
``Data_Entry_2017_v2020.csv`` with the exact NIH columns, so ``nih:OUT`` reads it with the patient-level
splits and decoding no longer costs a DICOM parse per epoch. Finding Labels come from ``--labels``;
files without a label row get an empty field (read by the NIH reader as no finding), so for an
unlabelled tree train the GAN on ``folder:OUT/images``. Everything is written into a temporary folder
beside OUT and renamed into place at the end: OUT is complete or absent.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from service.labels import format_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS
from service.png import encode_png
from training.data.base import DataFormatError
from training.data.dicom import FRONTAL_VIEWS, DicomDataset, DicomRecord, read_display
from training.data.images import ImageSkipped, to_unit

log = logging.getLogger("training.data")
DATA_ENTRY_NAME = "Data_Entry_2017_v2020.csv"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="write a DICOM tree into the NIH ChestX-ray14 layout (PNG + Data_Entry CSV)")
    parser.add_argument("root", type=Path, help="folder of DICOM files (*.dcm, *.dicom), walked recursively")
    parser.add_argument("out", type=Path, help="new folder to write (must not exist or be empty)")
    parser.add_argument("--labels", type=Path,
                        help="label CSV: a Path/Image Index/File column and 'Finding Labels' or one column per finding")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth (default 8)")
    parser.add_argument("--size", type=int, help="centre-crop and resize to SIZE² (default: keep each file's size)")
    parser.add_argument("--all-views", action="store_true", help="keep lateral and other views too (default PA/AP)")
    parser.set_defaults(handler=run_convert)


def png_name(relative_path: str) -> str:
    """NIH image name for a DICOM file: its path under the root, "/" as "_", suffix ".png"."""
    return str(Path(relative_path).with_suffix(".png")).replace(os.sep, "_").replace("/", "_")


def _row(name: str, record: DicomRecord, follow_up: int, labels_known: bool, vector) -> list[object]:
    spacing = record.pixel_spacing_mm or ("", "")
    values = {
        "Image Index": name,
        "Finding Labels": format_finding_labels(vector) if labels_known else "",
        "Follow-up #": follow_up,
        "Patient ID": record.patient_id or name,
        "Patient Age": "" if record.age_years is None else record.age_years,
        "Patient Gender": record.sex,
        "View Position": record.view,
        "OriginalImage[Width": record.columns,
        "Height]": record.rows,
        "OriginalImagePixelSpacing[x": spacing[0],
        "y]": spacing[1],
    }
    return [values[column] for column in DATA_ENTRY_COLUMNS]


def convert_to_nih(
    dataset: DicomDataset, out: Path, *, bit_depth: int = 8, size: int | None = None, progress: bool = True
) -> dict[str, int]:
    """Write ``dataset``'s files (read with ``split="all"``) into ``out`` in the NIH layout; with
    ``size``, ``dataset`` must have been opened at that size.

    Returns counts: ``written`` and ``skipped`` (files that failed to decode, warned about each).
    Raises ``FileExistsError`` when ``out`` holds anything, :class:`DataFormatError` when two files map to
    one image name or no file could be converted.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new folder")
    names = [png_name(record.path) for record in dataset.records]
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataFormatError(f"{len(repeated)} image name(s) would be written twice (e.g. {repeated[0]}); rename the files")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    image_format = "png16" if bit_depth == 16 else "png8"
    try:
        (staging / "images").mkdir()
        rows, follow_ups = [], Counter()
        bar = tqdm(range(len(dataset)), desc="convert", unit="img", disable=not progress)
        for index in bar:
            record, path = dataset.records[index], dataset.image_path(index)
            try:
                # The reader's size is --size; without it each file keeps its own size and aspect.
                unit = to_unit(dataset.decode(path)) if size is not None else read_display(path, dataset.min_size)
            except ImageSkipped as skip:  # damaged pixel data is found only when decoded
                log.warning("skipping image (%s): %s", skip.reason, skip)
                continue
            (staging / "images" / names[index]).write_bytes(encode_png(unit * 2.0 - 1.0, image_format))
            patient = record.patient_id or names[index]
            rows.append(_row(names[index], record, follow_ups[patient], bool(dataset.label_mask[index].any()),
                             dataset.labels[index]))
            follow_ups[patient] += 1
        if not rows:
            raise DataFormatError(f"none of the {len(dataset)} files under {dataset.root} could be decoded")
        with open(staging / DATA_ENTRY_NAME, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(DATA_ENTRY_COLUMNS)
            writer.writerows(rows)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the result is an ordinary folder
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"written": len(rows), "skipped": len(dataset) - len(rows)}


def run_convert(args: argparse.Namespace) -> int:
    if args.size is not None and args.size < 32:
        return _fail(f"--size must be at least 32, got {args.size}")
    try:
        size = args.size or 256  # the reader's size; used for pixels only with --size
        dataset = DicomDataset(args.root, args.labels, split="all", size=size,
                               views=None if args.all_views else FRONTAL_VIEWS, progress=True)
        counts = convert_to_nih(dataset, args.out, bit_depth=args.bit_depth, size=args.size)
    except (DataFormatError, FileExistsError, OSError) as error:
        return _fail(str(error))
    left_out = ", ".join(f"{count} {reason}" for reason, count in dataset.excluded.items() if count) or "none"
    print(f"wrote {counts['written']} image(s) and {DATA_ENTRY_NAME} to {args.out}; "
          f"{counts['skipped']} failed to decode; left out when listing: {left_out}")
    return 0


def _fail(message: str) -> int:
    print(f"convert: error: {message}", file=sys.stderr)
    return 2
