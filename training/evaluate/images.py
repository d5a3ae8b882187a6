"""Image sets for evaluation: real images from any reader, generated ones from a bundle, patient splits.

Every set is `ImageSet`: images [N, 1, S, S] float32 in [-1, 1], labels [N, 14] multi-hot in
`service.labels.LABELS` order (zeros for generated images, whose labels are judged, not known), patient
ids (real sets) and a `source` string for the protocol.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from service.labels import NUM_LABELS


class ImageFormatError(ValueError):
    """Images that cannot form one batch; the message gives the counts and what to fix."""


@dataclass
class ImageSet:
    images: np.ndarray  # [N, 1, S, S] float32 in [-1, 1]
    labels: np.ndarray  # [N, 14] float32
    source: str
    patient_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, rows: np.ndarray, source: str) -> ImageSet:
        ids = self.patient_ids[rows] if len(self.patient_ids) else self.patient_ids
        return ImageSet(self.images[rows], self.labels[rows], source, ids)


def as_image_batch(images: list[np.ndarray] | np.ndarray, what: str = "images") -> np.ndarray:
    """Stack images into [N, 1, S, S] float32.

    Accepts [N, 1, S, S], [N, S, S] or a list of [S, S] / [1, S, S] arrays in [-1, 1]. Refuses
    (ImageFormatError) images of mixed sizes or with more than one channel, with the count of each
    shape, since resizing or greying them silently would change what is measured.
    """
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    if not arrays:
        raise ImageFormatError(f"{what}: no images")
    shapes = Counter(a.shape if a.ndim == 2 else a.shape[-3:] for a in arrays)
    if len(shapes) > 1:
        listed = ", ".join(f"{count} of shape {list(shape)}" for shape, count in shapes.most_common())
        raise ImageFormatError(f"{what}: mixed sizes or channels ({listed}); give images of one size, one channel")
    (shape,) = shapes
    if len(shape) == 3 and shape[0] != 1:
        raise ImageFormatError(f"{what}: {len(arrays)} images have {shape[0]} channels; give grey [1, H, W] images")
    if shape[-1] != shape[-2]:
        raise ImageFormatError(f"{what}: images are {shape[-2]}×{shape[-1]}; give square images")
    return np.stack([a.reshape(1, shape[-2], shape[-1]) for a in arrays])


def read_dataset(dataset: Dataset, source: str, *, limit: int | None = None, progress: bool = True) -> ImageSet:
    """Every item of a project reader (`training.data`), up to `limit`, as an ImageSet."""
    count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=64, shuffle=False)
    images, labels = [], []
    for image, label, _mask in tqdm(loader, desc=f"reading {source}", unit="batch", disable=not progress, leave=False):
        images.append(image.numpy().astype(np.float32))
        labels.append(label.numpy())
    ids = np.asarray(getattr(dataset, "patient_ids", np.zeros(0, dtype=str)))[:count]
    return ImageSet(np.concatenate(images), np.concatenate(labels).astype(np.float32), source, ids)


def read_images(spec: str, size: int, *, split: str = "all", limit: int | None = None, seed: int = 0,
                progress: bool = True, **options: Any) -> ImageSet:
    """Real images from a data set spec (`training.data.open_dataset`: ``nih:PATH``, ``phantoms:N``, …)
    at size², for `split` (`options` go to the reader, e.g. ``prior`` for phantoms). An NIH-layout folder (an archive included) with listed images missing is
    refused (ValueError with the count): a metric must not quietly run on fewer images."""
    from training.data import open_dataset

    dataset = open_dataset(spec, size, split=split, seed=seed, **options)
    images = read_dataset(dataset, f"{spec} split={split} size={size}", limit=limit, progress=progress)
    skipped = {reason: count for reason, count in getattr(dataset, "skipped", {}).items() if count}
    if skipped:
        listed = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
        raise ValueError(f"{spec}: images listed in its CSV could not be read ({listed}); restore them or "
                         "remove their rows")
    return images


def patient_halves(images: ImageSet, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Two patient-disjoint halves (every image of a patient in one half), by the NIH reader's patient
    hash (`training.data.nih.patient_fraction`). A set without patients (phantoms: every image its own
    draw) is cut into its first and second half."""
    from training.data.nih import patient_fraction

    if len(images.patient_ids):
        first = patient_fraction(images.patient_ids, seed) < 0.5
    else:
        first = np.arange(len(images)) < len(images) // 2
    return (images.subset(np.flatnonzero(first), f"{images.source} patients half A (seed {seed})"),
            images.subset(np.flatnonzero(~first), f"{images.source} patients half B (seed {seed})"))


def generate_images(bundle, count: int, *, seed: int = 0, batch_size: int = 32, progress: bool = True) -> ImageSet:
    """`count` unconditional samples [count, 1, R, R] of a bundle's generator, latent i drawn from seed
    `seed + i` exactly as the service draws them (`service.lco.draw_latents`)."""
    from service.lco import draw_latents

    latent_dim = bundle.manifest.latent_dim
    latents = np.concatenate([draw_latents(seed + i, 1, latent_dim, None) for i in range(count)])
    batches = [bundle.generate(latents[start:start + batch_size])
               for start in tqdm(range(0, count, batch_size), desc="generating", unit="batch", disable=not progress,
                                 leave=False)]
    source = f"bundle {bundle.manifest.name}:{bundle.manifest.version} unconditional seeds {seed}..{seed + count - 1}"
    return ImageSet(np.concatenate(batches).astype(np.float32), np.zeros((count, NUM_LABELS), np.float32), source)
