"""DICOM output: Secondary Capture files that read back, validate against the standard (dciodvfy from
Debian's dicom3tools) and say plainly that they are synthetic."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from service.dicom import DicomPlacement, SyntheticOrigin, encode_dicom, read_origin, uid_for
from service.image_formats import encode_image
from service.nih_format import pixel_spacing_mm
from service.png import to_pixels

ORIGIN = SyntheticOrigin(
    model_name="cxrsynth-demo",
    model_version="20261130.145005",
    seed=2**63 - 1,
    requested={"Effusion": True, "Nodule": False},
    lco_options={"steps": 200, "lr": 0.05, "truncation": None},
    synthetic_patient_id="req1-0003",
)


def gradient_image(side: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(np.linspace(-1, 1, side * side).reshape(side, side) + rng.normal(0, 0.1, (side, side)), -1, 1)


def placement(name: str = "job") -> DicomPlacement:
    return DicomPlacement(uid_for(f"{name}/study"), uid_for(f"{name}/series"), uid_for(f"{name}/image/3"), 4)


def test_the_file_reads_back_with_the_same_pixels_and_every_synthetic_marker():
    image = gradient_image()
    data = encode_dicom(image, ORIGIN, placement(), pixel_spacing_mm(48))
    ds = pydicom.dcmread(io.BytesIO(data))
    assert np.array_equal(ds.pixel_array, to_pixels(image, "png16"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments
    assert "Effusion" in ds.ImageComments and str(ORIGIN.seed) in ds.ImageComments
    assert str(ds.PatientName) == "SYNTHETIC^req1-0003" and ds.PatientID == "SYNTHETIC-req1-0003"
    assert ds.PatientBirthDate == "" and ds.PatientSex == ""
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([430 / 48] * 2, abs=1e-6)
    assert read_origin(ds) == ORIGIN


def test_same_inputs_same_bytes_and_uids_are_valid_and_distinct():
    image = gradient_image()
    first = encode_dicom(image, ORIGIN, placement(), 1.0)
    assert encode_dicom(image, ORIGIN, placement(), 1.0) == first
    assert encode_dicom(image, ORIGIN, placement("other-job"), 1.0) != first
    uids = {uid_for(f"job/image/{index}") for index in range(1000)}
    assert len(uids) == 1000
    assert all(UID(uid).is_valid and uid.startswith("2.25.") for uid in uids)


def test_a_file_without_the_private_block_has_no_origin():
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(gradient_image(), ORIGIN, placement(), 1.0)))
    ds.remove_private_tags()
    assert read_origin(ds) is None


def test_dciodvfy_finds_no_error(tmp_path):
    validator = shutil.which("dciodvfy")
    if validator is None:
        pytest.fail("dciodvfy is not installed: `make system-deps` installs Debian's dicom3tools")
    path = tmp_path / "synthetic.dcm"
    path.write_bytes(encode_dicom(gradient_image(), ORIGIN, placement(), 1.0))
    result = subprocess.run([validator, str(path)], check=False, capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "Error" not in report, report
    assert "SCImage" in report, report  # it recognised the Secondary Capture IOD
    # the validator does report errors: the same file without its Type 1 ConversionType fails
    ds = pydicom.dcmread(path)
    del ds.ConversionType
    ds.save_as(tmp_path / "broken.dcm")
    broken = subprocess.run([validator, str(tmp_path / "broken.dcm")], check=False, capture_output=True,
                            text=True, timeout=60)
    assert "Error" in broken.stdout + broken.stderr


def test_png_formats_ignore_the_dicom_fields_and_unknown_formats_are_refused():
    image = gradient_image()
    assert encode_image(image, "png8", ORIGIN, placement())[:8] == b"\x89PNG\r\n\x1a\n"
    assert encode_image(image, "dicom", ORIGIN, placement())[128:132] == b"DICM"
    with pytest.raises(ValueError, match="png8, png16, dicom"):
        encode_image(image, "tiff", ORIGIN, placement())


def test_the_dicom_reader_reads_our_output_back_to_the_same_image(tmp_path):
    from training.data.dicom import DicomDataset

    side = 64
    images = [np.clip(gradient_image(side) * sign, -1, 1) for sign in (1.0, -0.5)]
    for number, image in enumerate(images):
        origin = SyntheticOrigin(**{**ORIGIN.__dict__, "synthetic_patient_id": f"p{number}"})
        where = DicomPlacement(uid_for("study"), uid_for("series"), uid_for(f"image/{number}"), number + 1)
        (tmp_path / f"{number}.dcm").write_bytes(encode_dicom(image, origin, where, pixel_spacing_mm(side)))
    data = DicomDataset(tmp_path, split="all", size=side)
    assert len(data) == 2 and not any(data.excluded.values())
    for number, image in enumerate(images):
        read, _, mask = data[number]
        assert read.shape == (1, side, side) and not mask.any()  # unlabelled
        np.testing.assert_allclose(read[0].numpy(), image, atol=4 / 65535)
