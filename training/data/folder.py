"""A plain folder of images (searched recursively), unlabelled: for GAN training on any collection."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from training.data.base import DataFormatError, ImageDataset, empty_targets
from training.data.images import DEFAULT_MIN_SIZE, IMAGE_EXTENSIONS


class ImageFolder(ImageDataset):
    """Every PNG/JPEG/TIFF/BMP file under ``root``, in sorted path order; labels unknown (mask all 0)."""

    def __init__(
        self,
        root: str | Path,
        size: int = 256,
        *,
        cache_dir: str | Path | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataFormatError(f"image folder {self.root} does not exist or is not a folder")
        found = []
        for directory, subdirectories, files in os.walk(self.root, followlinks=True):
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
            found.extend(
                os.path.relpath(os.path.join(directory, name), self.root)
                for name in files
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            )
        if not found:
            raise DataFormatError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.paths = np.array(sorted(found))
        self.labels, self.label_mask = empty_targets(len(found))
        self._init_images(size, cache_dir, min_size)

    def image_path(self, index: int) -> Path:
        return self.root / str(self.paths[index])

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, size={self.size}, items={len(self)})"
