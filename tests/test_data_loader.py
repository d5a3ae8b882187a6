"""Phantoms on the fly, the training loader, deterministic shuffles and the endless batch stream."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from training.data import EpochSampler, ImageFolder, PhantomDataset, infinite_batches, make_loader
from training.runtime.sampler import ResumableBatchSampler


def test_phantom_items_follow_the_contract() -> None:
    dataset = PhantomDataset(count=6, size=32, seed=5)
    assert len(dataset) == 6
    for i in range(6):
        image, labels, mask = dataset[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert -1.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        assert labels.shape == mask.shape == (14,) and labels.dtype == mask.dtype == torch.float32
        assert set(labels.unique().tolist()) <= {0.0, 1.0} and (mask == 1).all()
    again = PhantomDataset(count=6, size=32, seed=5)
    assert all(torch.equal(dataset[i][0], again[i][0]) for i in (0, 3))
    assert not torch.equal(PhantomDataset(count=6, size=32, seed=6)[0][0], dataset[0][0])
    with pytest.raises(IndexError):
        dataset[6]


def test_balanced_prior_draws_findings() -> None:
    dataset = PhantomDataset(count=24, size=32, seed=0, prior="balanced")
    labels = torch.stack([dataset[i][1] for i in range(24)])
    assert labels.sum() > 0


def test_loader_with_workers_yields_batches_in_a_seeded_order() -> None:
    dataset = PhantomDataset(count=12, size=32, seed=1)
    loader = make_loader(dataset, batch_size=4, workers=2, shuffle=True, seed=7)
    batches = list(loader)
    assert len(batches) == 3
    for images, labels, mask in batches:
        assert images.shape == (4, 1, 32, 32) and labels.shape == mask.shape == (4, 14)
        assert images.dtype == torch.float32 and -1 <= images.min() and images.max() <= 1
    seen = torch.cat([images for images, _, _ in batches])
    expected = torch.stack([dataset[i][0] for i in EpochSampler(dataset, shuffle=True, seed=7)])
    assert torch.equal(seen, expected)
    in_order = torch.cat([b[0] for b in make_loader(dataset, 4, workers=0, shuffle=False)])
    assert not torch.equal(seen, in_order)


def test_epoch_sampler_permutations() -> None:
    sampler = EpochSampler(range(50), shuffle=True, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(50)) and second != first
    assert list(EpochSampler(range(50), shuffle=False)) == list(range(50))


def test_infinite_batches_cross_epochs_and_reshuffle(tmp_path: Path) -> None:
    dataset = PhantomDataset(count=8, size=32, seed=2)
    loader = make_loader(dataset, batch_size=4, workers=0, seed=0)
    stream = infinite_batches(loader)
    batches = list(itertools.islice(stream, 5))
    assert loader.sampler.epoch == 2 and len(batches) == 5
    epoch0 = torch.cat([b[0] for b in batches[:2]])
    epoch1 = torch.cat([b[0] for b in batches[2:4]])

    def contents(images: torch.Tensor) -> list[float]:
        return sorted(images.flatten(1).sum(1).tolist())

    assert contents(epoch0) == pytest.approx(contents(epoch1))  # the same items...
    assert not torch.equal(epoch0, epoch1)  # ...in another order


def test_loader_accepts_a_resumable_batch_sampler() -> None:
    dataset = PhantomDataset(count=10, size=32, seed=4)
    sampler = ResumableBatchSampler(len(dataset), 4, seed=9, start_position=8)
    loader = make_loader(dataset, batch_size=4, workers=0, batch_sampler=sampler)
    batches = list(itertools.islice(infinite_batches(loader), 3))  # the sampler never ends an epoch
    indices = ResumableBatchSampler(len(dataset), 4, seed=9).global_indices(8, 12)
    expected = torch.stack([dataset[i][0] for i in indices])
    assert torch.equal(torch.cat([b[0] for b in batches]), expected)


def test_distributed_sampler_under_a_process_group(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        dataset = PhantomDataset(count=9, size=32, seed=0)
        loader = make_loader(dataset, batch_size=3, workers=0, distributed=True, seed=5)
        assert isinstance(loader.sampler, DistributedSampler)
        assert sorted(loader.sampler) == list(range(9)) and len(list(loader)) == 3
    finally:
        dist.destroy_process_group()


def test_loader_rejects_impossible_settings(tmp_path: Path) -> None:
    dataset = PhantomDataset(count=3, size=32)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        make_loader(dataset, batch_size=4, workers=0)
    with pytest.raises(ValueError, match="workers"):
        make_loader(dataset, batch_size=1, workers=-1)


def test_image_folder_through_worker_loader(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / f"d{i % 2}").mkdir(exist_ok=True)
        Image.fromarray((rng.random((50, 70)) * 255).astype(np.uint8)).save(
            tmp_path / f"d{i % 2}" / f"{i}.png"
        )
    dataset = ImageFolder(tmp_path, size=40, cache_dir=tmp_path / ".cache")
    loader = make_loader(dataset, batch_size=3, workers=2, seed=0)
    for _ in range(2):  # the second epoch reads the cache the workers wrote
        shapes = [tuple(images.shape) for images, labels, mask in loader]
        assert shapes == [(3, 1, 40, 40)] * 2
    assert len(list((tmp_path / ".cache").rglob("*.npy"))) == 6
    assert len(dataset) == 6  # the hidden cache folder is not scanned as images


def test_open_dataset_by_spec(tmp_path: Path, nih_csv: Path) -> None:
    from PIL import Image

    from training.data import NIHChestXray14, open_dataset

    train = open_dataset("phantoms:20", 32, seed=1)
    val = open_dataset("phantoms:20", 32, split="val", seed=1)
    assert isinstance(train, PhantomDataset) and len(train) == 20
    assert not torch.equal(train[0][0], val[0][0])  # disjoint phantom streams per split

    nih = open_dataset(f"nih:{nih_csv.parent}", 64, split="test", index_images=False)
    assert isinstance(nih, NIHChestXray14)
    direct = NIHChestXray14(nih_csv.parent, split="test", size=64, index_images=False)
    assert np.array_equal(nih.image_names, direct.image_names)

    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(tmp_path / "x.png")
    folder = open_dataset(f"folder:{tmp_path}", 32)
    assert isinstance(folder, ImageFolder) and folder[0][0].shape == (1, 32, 32)

    with pytest.raises(ValueError, match="nih:…, chexpert:…, folder:…, phantoms:…"):
        open_dataset("imagenet:/data", 32)
    with pytest.raises(ValueError, match="needs a location"):
        open_dataset("chexpert", 32)
