"""Write the small real-format files under tests/data/ that the reader tests read (run once, kept in git).

    python scripts/make_reader_test_data.py [--shared ../shared/data]

Each file is a faithful small copy of a real file in ``shared/data`` (tests/data/README.md says which):
the pixel data is reduced, the format (colour type, bit depth, photometric interpretation, transfer
syntax, header attributes) is kept.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from service.nih_format import DATA_ENTRY_COLUMNS

TESTS_DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
# The 256² NIH images copied beside the RGBA one (one L, one to re-save as a palette PNG).
NIH_GREY = "00000165_001.png"
NIH_RGBA = "00000773_001.png"
CR_FILM_BLOCK = 8  # 1841×1955 -> 230×244


def block_mean(pixels: np.ndarray, block: int) -> np.ndarray:
    """Mean over block×block tiles (the edge remainder dropped), rounded to the source's integers."""
    height, width = (side // block * block for side in pixels.shape)
    tiles = pixels[:height, :width].astype(np.float64).reshape(height // block, block, width // block, block)
    return np.round(tiles.mean(axis=(1, 3))).astype(pixels.dtype)


def small_cr_film(shared: Path, out: Path) -> None:
    """RG1_J2KR.dcm (CR, MONOCHROME1, 15 bits stored, JPEG 2000 lossless) at 1/8 size, twice:
    JPEG 2000 lossless and uncompressed (Explicit VR Little Endian), the same stored pixels."""
    dataset = pydicom.dcmread(shared / "dicom-samples" / "RG1_J2KR.dcm")
    pixels = block_mean(dataset.pixel_array, CR_FILM_BLOCK)
    assert pixels.max() < 2**15, "the block mean stays inside 15 bits"
    dataset.set_pixel_data(pixels, "MONOCHROME1", 15)
    dataset.save_as(out / "cr_film_uncompressed.dcm", enforce_file_format=True)
    dataset.compress(JPEG2000Lossless, pixels)
    dataset.save_as(out / "cr_film_j2k.dcm", enforce_file_format=True)
    check = pydicom.dcmread(out / "cr_film_j2k.dcm")
    assert check.file_meta.TransferSyntaxUID == JPEG2000Lossless and check.BitsStored == 15
    assert np.array_equal(check.pixel_array, pixels)
    assert pydicom.dcmread(out / "cr_film_uncompressed.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def small_nih_dicom(shared: Path, out: Path) -> None:
    """test1.dcm (NIH image as 8-bit DX MONOCHROME2, Implicit VR) at 128², header kept."""
    dataset = pydicom.dcmread(shared / "dicom-samples" / "test1.dcm")
    pixels = block_mean(dataset.pixel_array, 8)
    dataset.set_pixel_data(pixels, "MONOCHROME2", 8)
    dataset.save_as(out / "nih_dx_8bit.dcm", implicit_vr=True, little_endian=True)


def nih_pngs(shared: Path, out: Path) -> None:
    """NIH PNGs in the NIH layout: the RGBA original as a faithful 128² RGBA copy (R = G = B, alpha 255,
    as NIH ships it), a greyscale image, and that image saved as a palette PNG (grey palette)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rgba = Image.open(shared / "nih-sample" / "originals" / NIH_RGBA)
    assert rgba.mode == "RGBA"
    grey = rgba.getchannel("R").resize((128, 128), Image.Resampling.LANCZOS)
    small = Image.merge("RGBA", (grey, grey, grey, Image.new("L", grey.size, 255)))
    small.save(images / NIH_RGBA)
    grey.save(out / "rgba_reference_grey.png")  # the same pixels as one grey channel
    original = Image.open(shared / "nih-sample" / "images" / NIH_GREY).resize((128, 128), Image.Resampling.LANCZOS)
    assert original.mode == "L"
    original.save(images / NIH_GREY)
    palette = original.convert("P")  # PIL's L -> P keeps the grey levels through a grey palette
    palette.putpalette([level for value in range(256) for level in (value, value, value)])
    palette.save(images / "00000165_001_palette.png")
    with open(shared / "nih-sample" / "Data_Entry_2017_v2020.csv", newline="") as file:
        rows = {row["Image Index"]: row for row in csv.DictReader(file)}
    with open(out / "Data_Entry_2017_v2020.csv", "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(DATA_ENTRY_COLUMNS)
        for name, source in ((NIH_RGBA, NIH_RGBA), (NIH_GREY, NIH_GREY), ("00000165_001_palette.png", NIH_GREY)):
            writer.writerow([name if column == "Image Index" else rows[source][column] for column in DATA_ENTRY_COLUMNS])


def chexpert_jpeg(shared: Path, out: Path) -> None:
    """A real NIH image as CheXpert-v1.0-small ships its files: 8-bit greyscale baseline JPEG, 320 px
    wide and portrait, under ``valid/patientNNNNN/studyN/view1_frontal.jpg``, with a ``valid.csv`` row."""
    source = Image.open(shared / "nih-sample" / "images" / NIH_GREY).convert("L")
    portrait = source.crop((24, 0, 232, 256)).resize((320, 394), Image.Resampling.LANCZOS)
    folder = out / "CheXpert-v1.0-small" / "valid" / "patient64541" / "study1"
    folder.mkdir(parents=True, exist_ok=True)
    portrait.save(folder / "view1_frontal.jpg", quality=90)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
              "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
              "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    row = ["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP",
           "0.0", "1.0", "1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "1.0", "0.0", "0.0", "1.0"]
    with open(out / "CheXpert-v1.0-small" / "valid.csv", "w", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows([header, row])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    (TESTS_DATA / "dicom").mkdir(parents=True, exist_ok=True)
    small_cr_film(args.shared, TESTS_DATA / "dicom")
    small_nih_dicom(args.shared, TESTS_DATA / "dicom")
    nih_pngs(args.shared, TESTS_DATA / "real_nih")
    chexpert_jpeg(args.shared, TESTS_DATA / "real_chexpert")


if __name__ == "__main__":
    main()
