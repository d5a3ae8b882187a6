"""Training images for the GAN from a `--data` specification.

    phantoms        procedural chest phantoms (training.data.PhantomDataset), `data.phantom_count` of them
    nih:PATH        NIH ChestX-ray14 in its published layout (training split)
    folder:PATH     every image under a folder, unlabelled

The GAN only uses the images; readers return (image 1×H×W in [-1, 1], labels, mask) and the loader
keeps that shape so the same data sets serve the classifier trainer.
"""

from __future__ import annotations

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


def build_dataset(spec: str, config: GanConfig, progress: bool = True) -> Dataset:
    """The data set named by `spec` at the network's final resolution."""
    from training.data import ImageFolder, NIHChestXray14, PhantomDataset

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
    if kind == "nih" and path:
        return NIHChestXray14(path, split="train", size=size, cache_dir=cache_dir)
    if kind == "folder" and path:
        return ImageFolder(path, size=size, cache_dir=cache_dir)
    raise ConfigError(f"--data {spec!r}: expected 'phantoms', 'nih:PATH' or 'folder:PATH'")
