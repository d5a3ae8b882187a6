"""Every reader on the file formats real data sets ship (small real copies in tests/data, see its README):
NIH's RGBA and palette PNGs, 16-bit PNGs, CheXpert's greyscale JPEGs. DICOM: tests/test_data_dicom.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.labels import LABEL_INDEX
from training.data import CheXpert, DicomDataset, ImageFolder, NIHChestXray14, decode_image, to_tensor
from training.data.dicom import read_display, to_uint16

DATA = Path(__file__).parent / "data"
NIH = DATA / "real_nih"
SHARED_DATA = Path(os.environ.get("CXRSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def nih_item(dataset: NIHChestXray14, name: str) -> torch.Tensor:
    return dataset[list(dataset.image_names).index(name)][0]


def test_nih_rgba_original_reads_as_its_grey_channel() -> None:
    assert Image.open(NIH / "images" / "00000773_001.png").mode == "RGBA"
    dataset = NIHChestXray14(NIH, split="all", size=128)
    grey = np.asarray(Image.open(NIH / "rgba_reference_grey.png"))
    image = nih_item(dataset, "00000773_001.png")
    assert image.shape == (1, 128, 128) and torch.equal(image, to_tensor(grey))
    assert dataset.skipped_total == 0


def test_the_real_rgba_originals_read_as_greyscale() -> None:
    originals = SHARED_DATA / "nih-sample" / "originals"
    rgba = [path for path in sorted(originals.glob("*.png")) if Image.open(path).mode == "RGBA"] if originals.is_dir() else []
    if not rgba:
        pytest.skip(f"the NIH originals are not in {originals}")
    assert len(rgba) == 4
    for path in rgba:
        stored = decode_image(path, 256)
        channel = np.asarray(Image.open(path).getchannel("R").resize((256, 256), Image.Resampling.LANCZOS, reducing_gap=2.0))
        assert stored.dtype == np.uint8 and stored.shape == (256, 256)
        assert np.abs(stored.astype(int) - channel.astype(int)).max() <= 1, path.name


def test_nih_palette_png_reads_as_the_grey_image_it_encodes() -> None:
    assert Image.open(NIH / "images" / "00000165_001_palette.png").mode == "P"
    dataset = NIHChestXray14(NIH, split="all", size=64)
    palette, grey = nih_item(dataset, "00000165_001_palette.png"), nih_item(dataset, "00000165_001.png")
    assert torch.equal(palette, grey) and grey.std() > 0.1


def test_chexpert_greyscale_jpeg_reads_with_its_labels() -> None:
    root = DATA / "real_chexpert" / "CheXpert-v1.0-small"
    jpeg = root / "valid" / "patient64541" / "study1" / "view1_frontal.jpg"
    with Image.open(jpeg) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "L", (320, 394))
        full = np.asarray(image.convert("L"))
    dataset = CheXpert(root, split="valid", size=64)
    image, labels, mask = dataset[0]
    assert len(dataset) == 1 and image.shape == (1, 64, 64)
    # Decoded at a reduced DCT scale, the picture is the one a full decode, crop and resize give.
    reference = Image.fromarray(full).resize((64, 64), Image.Resampling.LANCZOS, box=(0, 37, 320, 357))
    assert (image - to_tensor(np.asarray(reference))).abs().mean() < 4 / 255
    for name in ("Cardiomegaly", "Effusion"):
        assert labels[LABEL_INDEX[name]] == 1 and mask[LABEL_INDEX[name]] == 1
    assert mask[LABEL_INDEX["Infiltration"]] == 0  # Lung Opacity positive: Infiltration unknown


def test_16bit_png_of_a_film_keeps_its_grey_levels(tmp_path: Path) -> None:
    film = DATA / "dicom" / "cr_film_uncompressed.dcm"
    Image.fromarray(to_uint16(read_display(film))).save(tmp_path / "film.png")
    assert Image.open(tmp_path / "film.png").mode.startswith("I;16")
    folder = ImageFolder(tmp_path, size=128)
    from_png = folder[0][0]
    assert torch.unique(from_png).numel() > 4 * 256
    from_dicom = DicomDataset(DATA / "dicom", split="all", size=128)[0][0]
    assert (from_png - from_dicom).abs().max() <= 2 / 65535
