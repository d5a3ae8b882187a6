"""Image decoding shared by every reader: any common PNG/JPEG/TIFF flavour -> one resized grey channel.

A radiograph arrives as 8-bit or 16-bit greyscale, RGB(A), palette or JPEG. Each is turned upright as
its orientation tag says (as a viewer shows it), reduced to one channel with its own bit depth kept
(8-bit sources stay ``uint8``, 16-bit sources stay ``uint16``), centre-cropped to a square and resized
once to the training resolution. This is the one place files become pixels. The stored form (integer
array) is what the resize cache holds; :func:`to_tensor` turns it into the project's float [-1, 1]
convention.

Aspect policy: centre crop, not padding. Padding would put black bars into the training distribution
that a GAN learns to draw; a centre crop of a portrait chest film loses neck and upper abdomen, not lung.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Version of the rule by which decode_image (and dicom.decode_dicom) turns a file into pixels; part of
# every resize-cache key.
# Bump it whenever that output changes (orientation, channel mixing, crop, filter), so pixels cached
# under an older rule are never served. 2: orientation tags applied.
DECODE_VERSION = 2
# Smallest side accepted; anything smaller is a thumbnail or a broken export, not a radiograph.
DEFAULT_MIN_SIZE = 32
# LANCZOS after PIL's integer pre-reduction (reducing_gap): area-like quality at a fraction of the cost.
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 2.0


class ImageSkipped(Exception):
    """An image that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {detail}")


SKIP_REASONS: tuple[str, ...] = ("missing", "unreadable", "too_small")


def _grey_array(image: Image.Image) -> tuple[np.ndarray, int]:
    """One-channel array of ``image`` and the maximum value of its bit depth."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image, dtype=np.uint16), 65535
    if mode == "I":
        # 32-bit integer images are how older PIL builds and some TIFF writers carry 16-bit data.
        array = np.asarray(image, dtype=np.int64)
        if array.min() >= 0 and array.max() <= 65535:
            return array.astype(np.uint16), 65535
        return _rescale_to_uint16(array.astype(np.float64)), 65535
    if mode == "F":
        return _rescale_to_uint16(np.asarray(image, dtype=np.float64)), 65535
    if mode != "L":
        # RGB, RGBA, LA, P, 1, CMYK, YCbCr: ITU-R 601 luminance; alpha carries no x-ray signal.
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8), 255


def _rescale_to_uint16(array: np.ndarray) -> np.ndarray:
    """Float or wide-integer data of unknown range: min-max to the full 16-bit range."""
    finite = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(finite.min()), float(finite.max())
    scale = 65535.0 / (high - low) if high > low else 0.0
    return np.round((finite - low) * scale).astype(np.uint16)


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square box (left, top, right, bottom)."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def decode_image(path: str | Path, size: int, min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """Read ``path`` and return a ``size``×``size`` ``uint8`` or ``uint16`` array (bit depth kept).

    Raises :class:`ImageSkipped` for a missing, unreadable (corrupt, truncated, not an image) or too
    small file; never anything else for bad data.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if min(width, height) < min_size:
                raise ImageSkipped(path, "too_small", f"{width}×{height} is below {min_size} px")
            if image.format == "JPEG":
                # Decode straight to grey at the smallest DCT scale (1/2, 1/4, 1/8) still >= size on
                # both sides: 2-3× faster on full-resolution CheXpert JPEGs, visually the same.
                image.draft("L", (size, size))
            image.load()
            # An orientation tag (EXIF in JPEG, PNG or WebP; TIFF's own) says how a viewer turns the
            # stored pixels; the networks are shown what a person is shown.
            ImageOps.exif_transpose(image, in_place=True)
            array, max_value = _grey_array(image)
    except FileNotFoundError as error:
        raise ImageSkipped(path, "missing", "file not found") from error
    except ImageSkipped:
        raise
    except Exception as error:  # PIL format plugins raise many exception types on malformed bytes
        raise ImageSkipped(path, "unreadable", f"{type(error).__name__}: {error}") from error
    return resize_square(array, size, max_value)


def resize_square(array: np.ndarray, size: int, max_value: int) -> np.ndarray:
    """Centre-crop ``array`` to a square and resize it to ``size``², keeping its integer dtype."""
    height, width = array.shape
    box = centre_square(width, height)
    if (width, height) == (size, size):
        return array
    if max_value == 255:
        image = Image.fromarray(array, mode="L")
        return np.asarray(image.resize((size, size), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP))
    # 16-bit data resizes in float mode: full precision, every filter supported.
    image = Image.fromarray(array.astype(np.float32), mode="F")
    resized = np.asarray(image.resize((size, size), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP))
    return np.clip(np.round(resized), 0, 65535).astype(np.uint16)


def to_unit(array: np.ndarray) -> np.ndarray:
    """Stored ``uint8``/``uint16`` pixels -> float32 in [0, 1] by the array's own bit depth."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) * (1.0 / 255.0)
    if array.dtype == np.uint16:
        return array.astype(np.float32) * (1.0 / 65535.0)
    raise TypeError(f"stored images are uint8 or uint16, got {array.dtype}")


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """Stored pixels -> float32 tensor 1×H×W in [-1, 1] (the project's image convention)."""
    return torch.from_numpy(to_unit(array)).mul_(2.0).sub_(1.0).unsqueeze_(0)


def unit_to_tensor(image: np.ndarray) -> torch.Tensor:
    """Float pixels in [0, 1] (H×W) -> float32 tensor 1×H×W in [-1, 1]."""
    tensor = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
    return tensor.clamp(0.0, 1.0).mul(2.0).sub_(1.0).unsqueeze_(0)
