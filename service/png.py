"""Generator output ([-1, 1] float) to single-channel PNG bytes, 8- or 16-bit, and back: the one
encoder behind /generate and archive jobs."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = ("png8", "png16")


def to_pixels(image: np.ndarray, image_format: str = "png8") -> np.ndarray:
    """[-1, 1] floats -> uint8 or uint16 grey levels (-1 black, +1 white), rounded to nearest."""
    if image.ndim != 2:
        raise ValueError(f"expected a [H, W] image, got shape {image.shape}")
    unit = (np.clip(image.astype(np.float32), -1.0, 1.0) + 1.0) * 0.5
    if image_format == "png8":
        return np.rint(unit * 255.0).astype(np.uint8)
    if image_format == "png16":
        return np.rint(unit * 65535.0).astype(np.uint16)
    raise ValueError(f"unknown image format {image_format!r}; choose one of {', '.join(FORMATS)}")


def encode_png(image: np.ndarray, image_format: str = "png8", compress_level: int = 6) -> bytes:
    """PNG bytes of a [H, W] image in [-1, 1]. Deterministic: same pixels, same bytes.

    ``compress_level`` is zlib's 0-9; at 0 (stored blocks) the byte length depends on H, W and the bit
    depth alone, which the reader study needs so that a file's size says nothing about its pixels."""
    pixels = to_pixels(image, image_format)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> [H, W] float32 in [-1, 1] (8- or 16-bit)."""
    with Image.open(io.BytesIO(data)) as image:
        scale = 255.0 if image.mode == "L" else 65535.0  # 16-bit grey opens as "I;16" or "I"
        pixels = np.asarray(image)
    return (pixels.astype(np.float32) / scale) * 2.0 - 1.0
