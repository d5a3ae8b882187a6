"""The DICOM reader on real films (small copies in tests/data/dicom, see its README), its bad input, and
``training.cli convert``."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless

from service.labels import LABEL_INDEX
from training.cli import main as cli_main
from training.data import (
    DataFormatError,
    DecoderMissingError,
    DicomDataset,
    NIHChestXray14,
    decode_dicom,
    open_dataset,
)
from training.data.dicom import display_pixels

DATA = Path(__file__).parent / "data" / "dicom"
FILM_J2K = DATA / "cr_film_j2k.dcm"
FILM_RAW = DATA / "cr_film_uncompressed.dcm"
NIH_DX = DATA / "nih_dx_8bit.dcm"
# The real data beside a checkout (../shared/data), or where CXRSYNTH_SHARED_DATA says.
SHARED_DATA = Path(os.environ.get("CXRSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHARED_FILM = SHARED_DATA / "dicom-samples" / "RG1_J2KR.dcm"
# Regions of the CR film as fractions (x0, x1, y0, y1) of its width and height, found on the film:
# the two lung fields, and the spine with the mediastinum between them.
LUNG_FIELDS = ((0.18, 0.35, 0.25, 0.45), (0.62, 0.80, 0.25, 0.45))
SPINE = (0.45, 0.53, 0.25, 0.60)


def region_mean(image: np.ndarray, box: tuple[float, float, float, float]) -> float:
    height, width = image.shape
    x0, x1, y0, y1 = box
    return float(image[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)].mean())


@pytest.mark.parametrize("film", [FILM_J2K, SHARED_FILM], ids=["small-copy", "original"])
def test_monochrome1_film_reads_with_lungs_dark_and_bone_bright(film: Path) -> None:
    if not film.exists():
        pytest.skip(f"{film} is not here (the original lies in ../shared/data beside a checkout)")
    dataset = pydicom.dcmread(film)
    assert dataset.PhotometricInterpretation == "MONOCHROME1" and dataset.BitsStored == 15
    stored = dataset.pixel_array.astype(np.float64)
    shown = display_pixels(dataset)
    lungs = [region_mean(shown, box) for box in LUNG_FIELDS]
    spine = region_mean(shown, SPINE)
    # Stored MONOCHROME1 values are high where the film is dark (air): inverted on reading.
    assert all(region_mean(stored, box) > 2 * region_mean(stored, SPINE) for box in LUNG_FIELDS)
    assert all(lung < spine - 0.25 for lung in lungs), (lungs, spine)
    assert spine > 0.8 and max(lungs) < 0.6


def test_monochrome1_without_a_window_is_inverted_after_the_percentile_window(tmp_path: Path) -> None:
    def drop_window(dataset: pydicom.Dataset) -> None:
        del dataset.WindowCenter, dataset.WindowWidth

    shown = display_pixels(pydicom.dcmread(write_variant(FILM_RAW, tmp_path / "nowindow.dcm", drop_window)))
    assert all(region_mean(shown, box) < region_mean(shown, SPINE) - 0.25 for box in LUNG_FIELDS)
    assert (shown == 0).mean() < 0.01 and (shown == 1).mean() < 0.01  # 0.5 % clipped at each end


def test_a_film_smaller_than_min_size_is_skipped_as_too_small() -> None:
    dataset = DicomDataset(DATA, split="all", size=32, min_size=200)  # the films are 230×244, NIH's 128²
    assert dataset.paths[2] == "nih_dx_8bit.dcm"
    substitute = dataset[2][0]
    assert dataset.skipped == {"missing": 0, "unreadable": 0, "too_small": 1}
    assert any(torch.equal(substitute, dataset[i][0]) for i in (0, 1))


def test_15_bit_range_is_kept_to_the_tensor() -> None:
    dataset = pydicom.dcmread(FILM_J2K)
    stored = dataset.pixel_array
    assert stored.max() >= 2**14 and stored.max() < 2**15  # really uses the 15th bit
    shown = display_pixels(dataset)
    # Every stored level stays a level of its own (the window 15000/30000 spans 0..30000), in reverse order.
    order = np.argsort(stored, axis=None, kind="stable")
    assert np.all(np.diff(shown.ravel()[order]) <= 0)
    levels = np.unique(stored).size
    assert levels > 10_000 and np.unique(np.rint(shown * 65535)).size == levels
    tensor = open_dataset(f"dicom:{DATA}", 128, split="all")[0][0]
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 128, 128)
    assert torch.unique(tensor).numel() > 4 * 256  # far more grey levels than an 8-bit path could give


def test_jpeg2000_decodes_to_the_pixels_of_the_uncompressed_copy() -> None:
    compressed, plain = pydicom.dcmread(FILM_J2K), pydicom.dcmread(FILM_RAW)
    assert compressed.file_meta.TransferSyntaxUID.name == "JPEG 2000 Image Compression (Lossless Only)"
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(compressed.pixel_array, plain.pixel_array)
    assert np.array_equal(decode_dicom(FILM_J2K, 96), decode_dicom(FILM_RAW, 96))


def test_8bit_monochrome2_without_window_gets_a_percentile_window() -> None:
    stored = pydicom.dcmread(NIH_DX).pixel_array
    shown = display_pixels(pydicom.dcmread(NIH_DX))
    assert shown.min() == 0.0 and shown.max() == 1.0
    # Monotone increasing (MONOCHROME2) and only the outer 0.5 % at each end clipped.
    order = np.argsort(stored, axis=None, kind="stable")
    assert np.all(np.diff(shown.ravel()[order]) >= 0)
    assert (shown == 0).mean() < 0.02 and (shown == 1).mean() < 0.02


def test_rescale_voi_lut_and_padding_are_honoured(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(NIH_DX)
    stored = dataset.pixel_array.astype(np.uint16) * 16  # 12-bit values
    stored[:8, :] = 4095  # a padded band
    dataset.set_pixel_data(stored, "MONOCHROME2", 12)
    dataset.RescaleSlope, dataset.RescaleIntercept = 2, -100
    dataset.PixelPaddingValue = 4095
    dataset.WindowCenter, dataset.WindowWidth = 1000, 2000  # in rescaled units: 0..2000 shown
    shown = display_pixels(dataset)
    assert np.all(shown[:8] == 0.0)  # padding is black, whatever the window says
    rescaled = stored[8:].astype(np.float64) * 2 - 100
    expected = np.clip((rescaled - 1000 + 0.5) / 1999 + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1 LINEAR
    assert np.abs(shown[8:] - expected).max() < 1e-3
    # A VOI LUT Sequence wins over the window: an 8-bit LUT that inverts the lowest 256 rescaled values.
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.LUTData = list(range(255, -1, -1))
    dataset.VOILUTSequence = [lut]
    inverted = display_pixels(dataset)[8:]
    low = (rescaled >= 0) & (rescaled < 256)
    assert np.allclose(inverted[low], (255 - rescaled[low]) / 255)


def write_variant(source: Path, target: Path, change) -> Path:
    dataset = pydicom.dcmread(source)
    change(dataset)
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(target)
    return target


def bad_tree(root: Path) -> Path:
    """One good frontal film and one file of every kind the reader must leave out."""
    shutil.copy(FILM_J2K, root / "good.dcm")
    write_variant(NIH_DX, root / "lateral" / "ll.dcm", lambda d: setattr(d, "ViewPosition", "LL"))
    write_variant(NIH_DX, root / "ct" / "slice.dcm", lambda d: setattr(d, "Modality", "CT"))
    write_variant(NIH_DX, root / "nopixels.dcm", lambda d: d.__delitem__("PixelData"))

    def make_report(dataset: pydicom.Dataset) -> None:
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                        "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
            del dataset[keyword]
        dataset.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR

    write_variant(NIH_DX, root / "report.dcm", make_report)

    def make_colour(dataset: pydicom.Dataset) -> None:
        grey = dataset.pixel_array
        dataset.set_pixel_data(np.stack([grey] * 3, axis=-1), "RGB", 8)

    write_variant(NIH_DX, root / "colour.dcm", make_colour)

    def make_cine(dataset: pydicom.Dataset) -> None:
        dataset.set_pixel_data(np.stack([dataset.pixel_array] * 2), "MONOCHROME2", 8)

    write_variant(NIH_DX, root / "cine.dcm", make_cine)
    (root / "notdicom.dcm").write_bytes(b"this is a text file with a .dcm name\n" * 10)
    whole = FILM_RAW.read_bytes()
    (root / "truncated.dcm").write_bytes(whole[: len(whole) // 2])  # pixel data cut short
    return root


def test_unusable_files_are_left_out_counted_and_warned_once(tmp_path: Path, caplog) -> None:
    root = bad_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = DicomDataset(root, split="all", size=32)
    assert dataset.excluded == {
        "not_dicom": 1, "not_an_image": 1, "no_pixel_data": 1, "multi_frame": 1,
        "colour": 1, "cross_sectional": 1, "not_frontal": 1,
    }
    listing_warnings = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(listing_warnings) == 1 and "ViewPosition LL" in listing_warnings[0].getMessage()
    assert sorted(dataset.paths) == ["good.dcm", "truncated.dcm"]
    assert dataset.skipped["unreadable"] == 6  # the laterals are left out, not bad
    # The truncated file is found when read: skipped, replaced by the good film, counted once.
    items = [dataset[i][0] for i in range(len(dataset))]
    assert all(item.shape == (1, 32, 32) for item in items) and torch.equal(items[0], items[1])
    assert dataset.skipped["unreadable"] == 7
    # Every view when asked.
    assert len(DicomDataset(root, split="all", size=32, views=None)) == 3


@pytest.fixture
def jpeg2000_plugins_absent():
    """pydicom as it is where neither pylibjpeg-openjpeg nor a Pillow built with OpenJPEG is installed:
    its JPEG 2000 decoder without those plugins (pydicom's own plugin registry), restored afterwards."""
    decoder = get_decoder(JPEG2000Lossless)
    removed = [label for label in ("pylibjpeg", "pillow") if label in decoder._available]
    for label in removed:
        decoder.remove_plugin(label)
    yield
    for label in removed:
        decoder.add_plugin(label, (f"pydicom.pixels.decoders.{label}", "_decode_frame"))
    assert decoder.is_available


def test_a_compressed_syntax_without_decoder_names_the_plugin(tmp_path: Path, capsys, jpeg2000_plugins_absent) -> None:
    assert cli_main(["convert", str(DATA), str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("convert: error: 1 file(s) use the compressed transfer syntax JPEG 2000")
    assert 'pip install "pylibjpeg>=2.0" "pylibjpeg-openjpeg>=2.0"' in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(DecoderMissingError, match="pylibjpeg-openjpeg"):
        DicomDataset(DATA, split="all", size=32)


def test_a_syntax_pydicom_cannot_decode_at_all_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "video.dcm"
    shutil.copy(FILM_J2K, target)
    dataset = pydicom.dcmread(target)
    dataset.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile
    dataset.save_as(target)
    with pytest.raises(DataFormatError, match="MPEG2.*cannot decode with any plugin"):
        DicomDataset(tmp_path, split="all", size=32)


def write_labels(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


def test_labels_from_finding_labels_or_one_column_per_finding(tmp_path: Path, caplog) -> None:
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    shutil.copy(FILM_J2K, root / "a" / "film.dcm")
    shutil.copy(NIH_DX, root / "nih.dcm")
    nih_style = write_labels(tmp_path / "nih.csv", ["Image Index", "Finding Labels"],
                             [["film.png", "Effusion|Mass"], ["nih.dcm", "No Finding"], ["gone.dcm", "Hernia"]])
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = DicomDataset(root, nih_style, split="all", size=32)
    assert dataset.unmatched_label_rows == 1 and "gone.dcm" in caplog.text
    film = list(dataset.paths).index(os.path.join("a", "film.dcm"))
    assert dataset.labels[film].nonzero()[0].tolist() == [LABEL_INDEX["Effusion"], LABEL_INDEX["Mass"]]
    assert dataset.label_mask.min() == 1.0 and dataset.labels[1 - film].sum() == 0
    columns = write_labels(tmp_path / "columns.csv", ["Path", "Pleural Effusion", "Cardiomegaly", "No Finding", "Sex"],
                           [["a/film.dcm", "1", "", "", "F"], ["nih.dcm", "", "", "1", "M"]])
    dataset = DicomDataset(root, columns, split="all", size=32)
    effusion, cardiomegaly = LABEL_INDEX["Effusion"], LABEL_INDEX["Cardiomegaly"]
    assert dataset.labels[film, effusion] == 1 and dataset.label_mask[film].sum() == 1  # blank = unknown
    assert dataset.label_mask[1 - film, [effusion, cardiomegaly]].tolist() == [1, 1]  # No Finding = known negatives
    assert dataset.labels[1 - film].sum() == 0


def test_a_label_csv_that_names_no_file_says_so_with_examples(tmp_path: Path) -> None:
    shutil.copy(NIH_DX, tmp_path / "nih.dcm")
    labels = write_labels(tmp_path / "labels.csv", ["Image Index", "Finding Labels"],
                          [[f"00000{i}_000.png", "Effusion"] for i in range(5)])
    with pytest.raises(DataFormatError, match=r"none of the 5 rows .* 000000_000.png, 000001_000.png.*nih.dcm"):
        DicomDataset(tmp_path, labels, split="all", size=32)
    wrong = write_labels(tmp_path / "wrong.csv", ["Name", "Finding Labels"], [["nih.dcm", "Effusion"]])
    with pytest.raises(DataFormatError, match="no file column"):
        DicomDataset(tmp_path, wrong, split="all", size=32)
    bad_value = write_labels(tmp_path / "value.csv", ["File", "Edema"], [["nih.dcm", "maybe"]])
    with pytest.raises(DataFormatError, match="value.csv:2: label value 'maybe'"):
        DicomDataset(tmp_path, bad_value, split="all", size=32)


def test_convert_writes_the_nih_layout_that_the_nih_reader_reads(tmp_path: Path, capsys) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(DATA, tree)
    write_variant(NIH_DX, tree / "lateral.dcm", lambda d: setattr(d, "ViewPosition", "LL"))
    labels = write_labels(tmp_path / "labels.csv", ["Image Index", "Finding Labels"],
                          [["cr_film_j2k.dcm", "Effusion"], ["cr_film_uncompressed.dcm", "Effusion"],
                           ["nih_dx_8bit.dcm", "No Finding"]])
    out = tmp_path / "nih"
    assert cli_main(["convert", str(tree), str(out), "--labels", str(labels), "--bit-depth", "16"]) == 0
    assert "wrote 3 image(s)" in capsys.readouterr().out
    with open(out / "Data_Entry_2017_v2020.csv", newline="") as file:
        rows = {row["Image Index"]: row for row in csv.DictReader(file)}
    assert sorted(rows) == ["cr_film_j2k.png", "cr_film_uncompressed.png", "nih_dx_8bit.png"]
    film = rows["cr_film_j2k.png"]
    assert (film["Finding Labels"], film["Patient ID"], film["Patient Gender"], film["View Position"]) == (
        "Effusion", "9RG1", "F", "PA")
    assert (film["OriginalImage[Width"], film["Height]"]) == ("230", "244")
    assert rows["nih_dx_8bit.png"]["Patient Age"] == "81"
    nih = NIHChestXray14(out, split="all", size=96)
    assert len(nih) == 3 and nih.labels[:, LABEL_INDEX["Effusion"]].tolist() == [1, 1, 0]
    # The 16-bit PNG holds the display image: read back, the DICOM reader's pixels to 16-bit rounding.
    index = list(nih.image_names).index("cr_film_j2k.png")
    from_png, from_dicom = nih[index][0], DicomDataset(tree, split="all", size=96)[0][0]
    assert (from_png - from_dicom).abs().max() <= 4 / 65535 and torch.unique(from_png).numel() > 1024


def test_convert_refuses_bad_input_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert cli_main(["convert", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli_main(["convert", str(DATA), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and os.listdir(tmp_path / "full") == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_the_resize_cache_serves_dicom_pixels_unchanged(tmp_path: Path) -> None:
    fresh = DicomDataset(DATA, split="all", size=64)[0][0]
    cached = DicomDataset(DATA, split="all", size=64, cache_dir=tmp_path / "cache")
    first, second = cached[0][0], cached[0][0]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert torch.equal(first, fresh) and torch.equal(second, fresh)


def test_the_gan_trains_from_a_dicom_tree(tmp_path: Path) -> None:
    from training.gan.config import load_config
    from training.gan.data import build_dataset, data_problems

    for patient in range(10):
        write_variant(NIH_DX, tmp_path / f"p{patient}" / "frontal.dcm", lambda d, p=patient: setattr(d, "PatientID", str(p)))
    config = load_config("ci", ["network.resolution=32"])
    data = build_dataset(f"dicom:{tmp_path}", config, progress=False)
    assert isinstance(data, DicomDataset) and 5 <= len(data) < 10  # the training split's patients
    assert data[0][0].shape == (1, 32, 32)
    assert data_problems(f"dicom:{tmp_path / 'absent'}", config) == [f"--data dicom:{tmp_path / 'absent'}: {tmp_path / 'absent'} is not a directory"]
