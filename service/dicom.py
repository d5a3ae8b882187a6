"""Generator output as DICOM Secondary Capture: one synthetic chest x-ray per file, marked as synthetic
everywhere a person or a program looks.

The object is a Secondary Capture Image (SOP Class 1.2.840.10008.5.1.4.1.1.7; DICOM PS3.3 A.8.1),
16-bit MONOCHROME2, uncompressed (Explicit VR Little Endian). Secondary Capture rather than DX "for
presentation": the DX IOD requires acquisition attributes (KVP, exposure, detector) that a generated
image does not have, and SC is what DICOM defines for images made by a program; its Conversion Type
"SYN" (Synthetic Image, PS3.3 C.8.6.1) says what the image is. The synthetic markers:

- ImageType ``DERIVED\\SECONDARY``, ConversionType ``SYN``, BurnedInAnnotation ``NO``;
- "SYNTHETIC" in SeriesDescription and ImageComments;
- PatientName and PatientID made from the synthetic patient id (no real patient attribute is written);
- a private block (group 0x0071, creator ``cxrsynth``) with the model name and version, the seed, the
  requested labels and the LCO options (JSON), so the image can be made again.

UIDs live under the root ``2.25`` (ITU-T X.667 / DICOM PS3.5 B.2: a UUID written as one integer,
needing no registered root). Archives derive them from the job's identity with name-based UUIDs, so a
rerun writes the same bytes; requests get random ones.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from service.png import to_pixels

UID_ROOT = "2.25"
PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "cxrsynth"
# Element offsets inside the private block (0071,10xx once the creator holds slot 0x10).
PRIVATE_MODEL_NAME = 0x01
PRIVATE_MODEL_VERSION = 0x02
PRIVATE_SEED = 0x03
PRIVATE_REQUESTED_LABELS = 0x04
PRIVATE_LCO_OPTIONS = 0x05
SERIES_DESCRIPTION = "SYNTHETIC chest x-ray (cxrsynth)"
# Name-based UIDs: every cxrsynth UID is uuid5(this namespace, a name saying what it identifies).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxrsynth:dicom")


def uid_for(name: str) -> str:
    """A DICOM UID under 2.25 that depends on ``name`` alone (name-based UUID, RFC 4122 version 5)."""
    return f"{UID_ROOT}.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def random_uid() -> str:
    """A fresh DICOM UID under 2.25 (random UUID, RFC 4122 version 4)."""
    return f"{UID_ROOT}.{uuid.uuid4().int}"


@dataclass(frozen=True)
class DicomPlacement:
    """Where an image sits in the DICOM hierarchy: its study, series and instance."""

    study_uid: str
    series_uid: str
    instance_uid: str
    instance_number: int
    series_number: int = 1

    @classmethod
    def fresh(cls, instance_number: int = 1) -> DicomPlacement:
        return cls(random_uid(), random_uid(), random_uid(), instance_number)


@dataclass(frozen=True)
class SyntheticOrigin:
    """What made an image: enough to make it again, written into the private block."""

    model_name: str
    model_version: str
    seed: int
    requested: dict[str, bool]  # label -> True (present) / False (absent), as requested
    lco_options: dict[str, Any]
    synthetic_patient_id: str


def encode_dicom(image: np.ndarray, origin: SyntheticOrigin, placement: DicomPlacement,
                 pixel_spacing_mm: float) -> bytes:
    """DICOM Part 10 bytes of a [H, W] image in [-1, 1] (-1 black), stored as 16-bit MONOCHROME2.

    Deterministic: the same image, origin and placement give the same bytes. ``pixel_spacing_mm`` is
    the spacing the archive's NIH CSV states (row and column alike). Raises ValueError for an image
    that is not [H, W].
    """
    pixels = to_pixels(image, "png16")
    rows, columns = pixels.shape

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = placement.instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = placement.instance_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]
    # Patient: synthetic identity only. Type 2 attributes are present and empty.
    ds.PatientName = f"SYNTHETIC^{origin.synthetic_patient_id}"
    ds.PatientID = f"SYNTHETIC-{origin.synthetic_patient_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # Study and series; dates are left empty so that reruns write the same bytes.
    ds.StudyInstanceUID = placement.study_uid
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTHETIC"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SYNTHETIC chest x-rays"
    ds.SeriesInstanceUID = placement.series_uid
    ds.SeriesNumber = placement.series_number
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.Modality = "OT"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "cxrsynth"
    ds.ManufacturerModelName = origin.model_name
    ds.SoftwareVersions = origin.model_version
    ds.ConversionType = "SYN"
    ds.InstanceNumber = placement.instance_number
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = (
        f"SYNTHETIC image, not of a patient: made by {origin.model_name} {origin.model_version}, "
        f"seed {origin.seed}, findings requested {_requested_text(origin.requested)}"
    )
    ds.PixelSpacing = [f"{pixel_spacing_mm:.6f}", f"{pixel_spacing_mm:.6f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "32768"
    ds.WindowWidth = "65536"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.astype("<u2").tobytes()

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_MODEL_NAME, "LO", origin.model_name)
    block.add_new(PRIVATE_MODEL_VERSION, "LO", origin.model_version)
    block.add_new(PRIVATE_SEED, "LO", str(int(origin.seed)))
    block.add_new(PRIVATE_REQUESTED_LABELS, "UT", json.dumps(origin.requested, sort_keys=True))
    block.add_new(PRIVATE_LCO_OPTIONS, "UT", json.dumps(origin.lco_options, sort_keys=True))

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def decode_dicom(data: bytes) -> np.ndarray:
    """The image of DICOM bytes :func:`encode_dicom` wrote: [H, W] float32 in [-1, 1] (-1 black), the
    16-bit grey levels scaled as ``service.png.decode_png`` scales a 16-bit PNG.

    Raises ``pydicom.errors.InvalidDicomError`` for bytes that are not DICOM and ValueError for an image
    that is not one 16-bit MONOCHROME2 frame (another writer's file: read those with
    ``training.data.dicom``, which applies the full grayscale pipeline).
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.get("PhotometricInterpretation") != "MONOCHROME2" or ds.get("BitsStored") != 16:
        raise ValueError(f"expected the 16-bit MONOCHROME2 frame cxrsynth writes, got {ds.get('BitsStored')}-bit "
                         f"{ds.get('PhotometricInterpretation')}")
    return ds.pixel_array.astype(np.float32) / 65535.0 * 2.0 - 1.0


def read_origin(ds: Dataset) -> SyntheticOrigin | None:
    """The private block of a dataset this module wrote, or None when it has none."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None
    return SyntheticOrigin(
        model_name=str(block[PRIVATE_MODEL_NAME].value),
        model_version=str(block[PRIVATE_MODEL_VERSION].value),
        seed=int(block[PRIVATE_SEED].value),
        requested=json.loads(block[PRIVATE_REQUESTED_LABELS].value),
        lco_options=json.loads(block[PRIVATE_LCO_OPTIONS].value),
        synthetic_patient_id=str(ds.PatientID).removeprefix("SYNTHETIC-"),
    )


def _requested_text(requested: dict[str, bool]) -> str:
    present = [label for label, wanted in requested.items() if wanted]
    absent = [label for label, wanted in requested.items() if not wanted]
    parts = [", ".join(present) if present else "none"]
    if absent:
        parts.append("absent: " + ", ".join(absent))
    return "; ".join(parts)
