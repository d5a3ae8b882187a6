"""Training images for the GAN from a `--data` specification.

    phantoms        procedural chest phantoms (training.data.PhantomDataset), `data.phantom_count` of them
    nih:PATH        NIH ChestX-ray14 in its published layout (training split)
    folder:PATH     every image under a folder, unlabelled
    dicom:PATH      every frontal DICOM radiograph under a folder, unlabelled (training.data.dicom)

The GAN only uses the images; readers return (image 1×H×W in [-1, 1], labels, mask) and the loader
keeps that shape so the same data sets serve the classifier trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from training.gan.config import ConfigError, GanConfig


class InMemoryImages(Dataset):
    """A data set materialised once as 8-bit pixels (what a PNG would hold) with its labels and masks."""

    def __init__(self, source: Dataset, description: str = "caching images", progress: bool = True) -> None:
        count = len(source)  # type: ignore[arg-type]
        first_image, first_labels, first_mask = source[0]
        self.pixels = torch.empty((count, *first_image.shape), dtype=torch.uint8)
        self.labels = torch.empty((count, *first_labels.shape), dtype=torch.float32)
        self.masks = torch.empty((count, *first_mask.shape), dtype=torch.float32)
        for index in tqdm(range(count), desc=description, unit="img", disable=not progress, leave=False):
            image, labels, mask = source[index] if index else (first_image, first_labels, first_mask)
            self.pixels[index] = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            self.labels[index] = labels
            self.masks[index] = mask
        self.source_repr = repr(source)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.pixels[index].float() / 127.5 - 1.0
        return image, self.labels[index], self.masks[index]

    def __repr__(self) -> str:
        return f"InMemoryImages({self.source_repr})"


def data_problems(spec: str, config: GanConfig | None) -> list[str]:
    """Why `--data spec` cannot feed a run of `config` ([] when it can), found before any image is read.

    Refused: a spec that is none of the kinds above, a path that is not a directory, and phantoms at
    a resolution they are not drawn at. `config` None (it did not load) checks the spec alone.
    """
    from training.phantoms.render import MAX_SIZE, MIN_SIZE

    kind, _, path = spec.partition(":")
    if kind == "phantoms" and not path:
        resolution = None if config is None else config.network.resolution
        if resolution is not None and not MIN_SIZE <= resolution <= MAX_SIZE:
            return [
                (
                    f"network.resolution={resolution} with --data phantoms: phantoms are drawn at "
                    f"{MIN_SIZE}² to {MAX_SIZE}²; choose a resolution in that range or other --data"
                )
            ]
        return []
    if kind in ("nih", "folder", "dicom") and path:
        return [] if Path(path).is_dir() else [f"--data {spec}: {path} is not a directory"]
    return [f"--data {spec!r}: expected 'phantoms', 'nih:PATH', 'folder:PATH' or 'dicom:PATH'"]


def build_dataset(spec: str, config: GanConfig, progress: bool = True) -> Dataset:
    """The data set named by `spec` at the network's final resolution; ConfigError if `data_problems`."""
    from training.data import DicomDataset, ImageFolder, NIHChestXray14, PhantomDataset

    found = data_problems(spec, config)
    if found:
        raise ConfigError(found)
    size = config.network.resolution
    cache_dir = config.data.cache_dir or None
    kind, _, path = spec.partition(":")
    if kind == "phantoms" and not path:
        dataset: Dataset = PhantomDataset(
            config.data.phantom_count, size, seed=config.data.phantom_seed, prior=config.data.phantom_prior
        )
        if config.data.cache_in_memory:
            dataset = InMemoryImages(
                dataset, description=f"rendering {len(dataset)} phantoms", progress=progress
            )
        return dataset
    if kind == "nih":
        return NIHChestXray14(path, split="train", size=size, cache_dir=cache_dir)
    if kind == "dicom":
        return DicomDataset(path, split="train", size=size, cache_dir=cache_dir, progress=progress)
    return ImageFolder(path, size=size, cache_dir=cache_dir)
