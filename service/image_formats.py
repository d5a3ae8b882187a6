"""The file formats /generate and archive jobs write an image in: PNG (8- or 16-bit grey) or DICOM
Secondary Capture.

One place says, for each format name a request or an archive spec may give, how the image is encoded
and read back, its media type and its file suffix.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from service.dicom import DicomPlacement, SyntheticOrigin, decode_dicom, encode_dicom
from service.nih_format import pixel_spacing_mm
from service.png import decode_png, encode_png

ImageFormat = Literal["png8", "png16", "dicom"]
IMAGE_FORMATS: tuple[str, ...] = ("png8", "png16", "dicom")
MEDIA_TYPES = {"png8": "image/png", "png16": "image/png", "dicom": "application/dicom"}
SUFFIXES = {"png8": ".png", "png16": ".png", "dicom": ".dcm"}


def encode_image(image: np.ndarray, image_format: str, origin: SyntheticOrigin,
                 placement: DicomPlacement) -> bytes:
    """Bytes of a [H, W] image in [-1, 1] in ``image_format`` (one of IMAGE_FORMATS).

    ``origin`` and ``placement`` are written only by DICOM (private block, UIDs); PNG ignores them.
    Raises ValueError for an unknown format or an image that is not [H, W].
    """
    if image_format == "dicom":
        return encode_dicom(image, origin, placement, pixel_spacing_mm(image.shape[-1]))
    if image_format in ("png8", "png16"):
        return encode_png(image, image_format)
    raise _unknown(image_format)


def decode_image(data: bytes, image_format: str) -> np.ndarray:
    """The [H, W] float32 image in [-1, 1] of bytes :func:`encode_image` wrote in ``image_format``.

    Raises ValueError for an unknown format, and what the format's reader raises for other bytes.
    """
    if image_format == "dicom":
        return decode_dicom(data)
    if image_format in ("png8", "png16"):
        return decode_png(data)
    raise _unknown(image_format)


def _unknown(image_format: str) -> ValueError:
    return ValueError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
