"""On-disk cache of resized images, so epochs after the first skip PNG decoding and resizing.

One ``.npy`` file per (source file, size): the stored integer array (``uint8`` or ``uint16``) exactly
as :func:`training.data.images.decode_image` returns it. The key hashes the source's absolute path,
byte size and modification time together with the target size, the decoding rule's version
(:data:`training.data.images.DECODE_VERSION`) and Pillow's version (its decoders and filters change
between releases), so an edited or replaced source file, or a change in how files become pixels, is
decoded afresh instead of served from an older entry. Files are written under a temporary name and
renamed, so concurrent workers and ranks sharing a cache directory never read half a file. The cache is
shared across data sets and splits; deleting the directory is always safe.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import PIL

from training.data.images import DECODE_VERSION


class ResizeCache:
    """Resized images on disk under ``root/<size>/<2 hex>/<hash>.npy``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, source: str | Path, size: int) -> Path:
        """Cache path for ``source`` at ``size``; stats the source (raises FileNotFoundError if absent)."""
        absolute = os.path.abspath(source)
        stat = os.stat(absolute)
        key = f"{absolute}\0{stat.st_size}\0{stat.st_mtime_ns}\0{size}\0{DECODE_VERSION}\0{PIL.__version__}"
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return self.root / str(size) / digest[:2] / f"{digest}.npy"

    def load(self, entry: Path) -> np.ndarray | None:
        """The cached array, or None when absent or damaged (it is then rebuilt)."""
        try:
            array = np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            return None
        if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
            return None
        return array

    def store(self, entry: Path, array: np.ndarray) -> None:
        """Write ``array`` atomically (temporary file in the same directory, then rename)."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=entry.parent, prefix=".", suffix=".npy.tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.save(file, array, allow_pickle=False)
            os.replace(temporary, entry)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
