"""One string names a data set, so configs and command lines can choose any reader.

nih:/data/chestxray14          NIHChestXray14 (also phantom sets written to disk and archives)
chexpert:/data/CheXpert-v1.0-small
folder:/data/any-images        ImageFolder (unlabelled)
dicom:/data/dicom-tree         DicomDataset (unlabelled, or labels_csv= as an option)
phantoms:50000                 PhantomDataset of 50,000 on-the-fly phantoms ("phantoms" alone: 10,000)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from training.data.chexpert import CheXpert
from training.data.dicom import DicomDataset
from training.data.folder import ImageFolder
from training.data.nih import NIHChestXray14
from training.data.phantom import PhantomDataset

KINDS: tuple[str, ...] = ("nih", "chexpert", "folder", "phantoms", "dicom")
DEFAULT_PHANTOM_COUNT = 10_000
# Phantom splits are disjoint seed streams: seed * 3 + offset.
_PHANTOM_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


def open_dataset(
    spec: str,
    size: int,
    *,
    split: str = "train",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    **options: Any,
) -> Dataset:
    """The reader ``spec`` names (``kind:location``), at ``size``², for ``split``.

    ``split`` is "train", "val" or "test" ("all" for NIH and DICOM as well); CheXpert's validation set serves
    both "val" and "test", and a folder has no splits. ``options`` go to the reader's constructor
    (for example ``uncertain="ones"`` for CheXpert, ``views=("PA",)`` for NIH or ``labels_csv=`` for DICOM).
    """
    kind, _, location = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown data set {spec!r}; write one of {', '.join(k + ':…' for k in KINDS)}")
    if kind == "phantoms":
        if split not in _PHANTOM_SPLIT_OFFSET:
            raise ValueError(f"phantom splits are {', '.join(_PHANTOM_SPLIT_OFFSET)}; got {split!r}")
        try:
            count = int(location) if location else DEFAULT_PHANTOM_COUNT
        except ValueError:
            raise ValueError(f"phantoms:COUNT needs a whole number, got {location!r}") from None
        return PhantomDataset(count, size, seed=seed * 3 + _PHANTOM_SPLIT_OFFSET[split], **options)
    if not location:
        raise ValueError(f"{kind}: needs a location, as in {kind}:/path/to/data")
    if kind == "nih":
        return NIHChestXray14(
            location, split=split, size=size, split_seed=seed, cache_dir=cache_dir, **options
        )
    if kind == "chexpert":
        chexpert_split = "train" if split == "train" else "valid"
        return CheXpert(location, split=chexpert_split, size=size, cache_dir=cache_dir, **options)
    if kind == "dicom":
        return DicomDataset(location, split=split, size=size, split_seed=seed, cache_dir=cache_dir, **options)
    return ImageFolder(location, size=size, cache_dir=cache_dir, **options)
