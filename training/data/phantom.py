"""Procedural chest x-ray phantoms generated on the fly (no disk, no patient data).

Item ``i`` is ``training.phantoms.sample_phantom(i, size, seed, prior)``: the same index, seed and prior
always give the same image and labels, in any worker and any epoch. Phantom data sets written to disk
by ``python -m training.phantoms write`` are NIH-layout folders: read them with
:class:`training.data.NIHChestXray14`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from service.labels import NUM_LABELS
from training.data.base import Item
from training.data.images import unit_to_tensor


class PhantomDataset(Dataset):
    """``count`` phantoms of ``size``² drawn from ``prior`` ("nih" co-occurrence or "balanced")."""

    def __init__(self, count: int, size: int, seed: int = 0, prior: str = "nih"):
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        from training.phantoms import sample_phantom  # imported here so the readers work without it

        self._sample = sample_phantom
        self.count, self.size, self.seed, self.prior = int(count), int(size), int(seed), prior
        self.skipped = {}  # phantoms never fail; same attribute as the file readers for uniform logging
        self.skipped_total = 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Item:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} items")
        image, labels = self._sample(int(index) % self.count, self.size, self.seed, self.prior)
        image = np.asarray(image, dtype=np.float32)
        if image.shape != (self.size, self.size):
            raise ValueError(
                f"sample_phantom returned shape {image.shape}, expected {(self.size, self.size)}"
            )
        labels = torch.as_tensor(np.asarray(labels, dtype=np.float32).reshape(NUM_LABELS))
        return unit_to_tensor(image), labels, torch.ones(NUM_LABELS, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"PhantomDataset(count={self.count}, size={self.size}, seed={self.seed}, prior={self.prior!r})"
