"""DataLoader construction for training: worker processes, deterministic epoch shuffles, DDP sharding.

Shuffling is a pure function of (seed, epoch), by :class:`EpochSampler` on one process and
``DistributedSampler`` under DDP, so a run resumed at epoch ``k`` sees the same order it would have
seen. :func:`infinite_batches` is the stream a GAN loop consumes (it counts images, not epochs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class EpochSampler(Sampler[int]):
    """Indices in order, or in a permutation fixed by ``(seed, epoch)``; ``set_epoch`` as DistributedSampler."""

    def __init__(self, data: Sized, shuffle: bool = True, seed: int = 0):
        self.count = len(data)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.count))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.count, generator=generator).tolist())

    def __len__(self) -> int:
        return self.count


def _limit_worker_threads(worker_id: int) -> None:
    """Workers decode with PIL; one intra-op thread each keeps them from oversubscribing the CPUs."""
    del worker_id
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    workers: int = 4,
    shuffle: bool = True,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = True,
    prefetch_factor: int = 4,
    pin_memory: bool | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` yielding ``(images [B,1,H,W], labels [B,14], mask [B,14])``.

    Args:
        workers: worker processes (0 loads in the calling process); kept alive across epochs.
        shuffle: a fresh permutation each epoch, fixed by ``seed`` and the epoch (call
            ``loader.sampler.set_epoch``, or use :func:`infinite_batches` which does).
        distributed: shard with ``DistributedSampler`` over the initialised process group (each rank
            sees ``1/world_size`` of every epoch).
        drop_last: drop the last incomplete batch (fixed shapes for the GAN; DDP ranks stay in step).
        pin_memory: page-locked batches for asynchronous host-to-GPU copies; defaults to CUDA available.
        batch_sampler: a sampler of whole batches that replaces the one built here (for instance
            ``training.runtime.sampler.ResumableBatchSampler`` for mid-epoch resumption); ``batch_size``,
            ``shuffle``, ``distributed`` and ``drop_last`` are then the batch sampler's business.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    worker_options = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "prefetch_factor": prefetch_factor if workers > 0 else None,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
        "worker_init_fn": _limit_worker_threads if workers > 0 else None,
        # Seeds the workers' torch/numpy/random state reproducibly (base seed drawn from this generator).
        "generator": torch.Generator().manual_seed(seed),
    }
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **worker_options)
    sampler: Sampler[int]
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(
            f"{len(sampler)} items per epoch is fewer than batch_size {batch_size} with drop_last; "
            "lower the batch size or add data"
        )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **worker_options)


def infinite_batches(loader: DataLoader, start_epoch: int = 0) -> Iterator:
    """Batches from ``loader`` forever, epoch after epoch, telling the sampler each new epoch."""
    if isinstance(loader.batch_sampler, Sized) and len(loader) == 0:
        raise ValueError("the loader yields no batches; an endless stream of nothing would hang training")
    epoch = start_epoch
    while True:
        set_epoch = getattr(loader.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        yield from loader
        epoch += 1
