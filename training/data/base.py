"""The base of every file-backed reader: decoding, resizing, the resize cache and skipping bad images.

How a reader "skips": ``dataset[i]`` whose image is missing, unreadable or too small returns another
item instead, drawn from a fixed pseudo-random probe sequence seeded by ``i``, so batches keep their
size (DDP ranks stay in step) and the substitution is reproducible. Each bad file is warned about once
and recorded in a status byte per index held in shared memory, so the counts in ``dataset.skipped``
include what DataLoader worker processes found, and later epochs pass over known-bad files without
touching the disk. Only when nearly everything is bad (``MAX_PROBES`` draws in a row) is it an error,
because then the data root is wrong, not a few files.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from service.labels import LABELS, NUM_LABELS
from training.data.cache import ResizeCache
from training.data.images import DEFAULT_MIN_SIZE, SKIP_REASONS, ImageSkipped, decode_image, to_tensor

log = logging.getLogger("training.data")

Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Status byte per index: not yet read, read fine, or the skip reason (1 + position in SKIP_REASONS).
_UNSEEN, _OK = 0, 1
_REASON_CODE = {reason: 2 + i for i, reason in enumerate(SKIP_REASONS)}
MAX_PROBES = 200


class DataFormatError(ValueError):
    """A label table that cannot be read as the data set it claims to be (missing columns, no rows)."""


class ImageDataset(Dataset):
    """Images on disk with a label vector and a known-label mask per item.

    Subclasses set ``self.labels`` and ``self.label_mask`` (float32 [N, 14]) and implement
    :meth:`image_path`; :meth:`_init_images` must run once ``len(self)`` is known.
    """

    labels: np.ndarray
    label_mask: np.ndarray

    def _init_images(
        self,
        size: int,
        cache_dir: str | Path | None,
        min_size: int = DEFAULT_MIN_SIZE,
        skipped_before: dict[str, int] | None = None,
    ) -> None:
        self.size = int(size)
        if self.size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if len(self) == 0:
            raise DataFormatError(f"{type(self).__name__} has no items; check the root and the split")
        self.min_size = int(min_size)
        self.cache = ResizeCache(cache_dir) if cache_dir is not None else None
        self._status = torch.zeros(len(self), dtype=torch.uint8).share_memory_()
        self._skipped_before = {reason: 0 for reason in SKIP_REASONS} | dict(skipped_before or {})
        self._cache_write_failed = False

    def image_path(self, index: int) -> Path:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def targets(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.labels[index].copy()), torch.from_numpy(self.label_mask[index].copy())

    def decode(self, path: Path) -> np.ndarray:
        """One file -> stored-form pixels; raises :class:`ImageSkipped`. Readers of other formats override it."""
        return decode_image(path, self.size, self.min_size)

    def load_image(self, index: int) -> np.ndarray:
        """Stored-form pixels (uint8/uint16 size×size) of item ``index``; raises :class:`ImageSkipped`."""
        path = self.image_path(index)
        if self.cache is None:
            return self.decode(path)
        try:
            entry = self.cache.entry(path, self.size)
        except FileNotFoundError as error:
            raise ImageSkipped(path, "missing", "file not found") from error
        cached = self.cache.load(entry)
        if cached is not None and cached.shape == (self.size, self.size):
            return cached
        array = self.decode(path)
        try:
            self.cache.store(entry, array)
        except OSError as error:  # a full or read-only cache disk slows training, it must not stop it
            if not self._cache_write_failed:
                log.warning(
                    "resize cache %s not writable (%s); continuing without storing", self.cache.root, error
                )
                self._cache_write_failed = True
        return array

    def __getitem__(self, index: int) -> Item:
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} items")
        index = int(index) % count
        probe = random.Random(index)
        candidate = index
        for _ in range(MAX_PROBES):
            if int(self._status[candidate]) in (_UNSEEN, _OK):
                try:
                    pixels = self.load_image(candidate)
                except ImageSkipped as skip:
                    self._status[candidate] = _REASON_CODE[skip.reason]
                    log.warning("skipping image (%s): %s", skip.reason, skip)
                else:
                    self._status[candidate] = _OK
                    labels, mask = self.targets(candidate)
                    return to_tensor(pixels), labels, mask
            candidate = probe.randrange(count)
        raise RuntimeError(
            f"{type(self).__name__}: {MAX_PROBES} images in a row could not be used ({self.skip_summary()}); "
            "the image root or the CSV probably does not match the files on disk"
        )

    @property
    def skipped(self) -> dict[str, int]:
        """Images skipped so far, by reason (missing, unreadable, too_small), across all worker processes."""
        codes = torch.bincount(self._status.long(), minlength=2 + len(SKIP_REASONS))
        return {
            reason: self._skipped_before[reason] + int(codes[_REASON_CODE[reason]]) for reason in SKIP_REASONS
        }

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skip_summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in self.skipped.items())

    def label_counts(self) -> dict[str, int]:
        """Positive count per label among items whose label is known."""
        positives = (self.labels * self.label_mask).sum(axis=0)
        return {name: int(positives[i]) for i, name in enumerate(LABELS)}


def empty_targets(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and mask for ``count`` unlabelled items (all unknown)."""
    zeros = np.zeros((count, NUM_LABELS), dtype=np.float32)
    return zeros, zeros.copy()
