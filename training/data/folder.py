"""A plain folder of images (searched recursively), unlabelled: for GAN training on any collection."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.base import DataFormatError, ImageDataset, empty_targets
from training.data.images import DEFAULT_MIN_SIZE, IMAGE_EXTENSIONS
from training.data.walk import walk_files


class ImageFolder(ImageDataset):
    """Every PNG/JPEG/TIFF/BMP file under ``root``, in sorted path order; labels unknown (mask all 0).

    Links are followed and each real file is listed once (:func:`training.data.walk.walk_files`);
    ``links_skipped`` counts the repeats passed over, and links to nothing count in ``skipped["missing"]``.
    """

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
        # Each real file once: link loops and second links to a folder or file are skipped, counted and
        # warned about; links to nothing count as missing images.
        listing = walk_files(self.root, IMAGE_EXTENSIONS, what="image folder")
        if not listing.files:
            raise DataFormatError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.paths = np.array(listing.files)
        self.links_skipped = listing.counts()
        self.labels, self.label_mask = empty_targets(len(self.paths))
        self._init_images(size, cache_dir, min_size, {"missing": listing.broken_links})

    def image_path(self, index: int) -> Path:
        return self.root / str(self.paths[index])

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, size={self.size}, items={len(self)})"
