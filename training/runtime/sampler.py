"""A seeded, rank-sharded, resumable batch sampler whose whole state is one integer.

The data stream is the concatenation of per-epoch permutations of the data set, epoch e drawn from
`torch.Generator().manual_seed(seed + e)`. A global batch of B items takes the next B positions of
that stream; rank r of W gets the r-th of W equal slices. The position (items consumed by all ranks
together) is all a checkpoint needs to continue the identical stream, including mid-epoch, and it
works with `DataLoader(batch_sampler=..., num_workers=N)` prefetching because the position is
counted by the training loop, not by the sampler.

The global batch size may change along the stream (progressive growing uses a batch size per
resolution): pass `batch_size` as a function of the position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite batch sampler; yields this rank's slice of each global batch."""

    def __init__(
        self,
        num_items: int,
        batch_size: int | Callable[[int], int],
        *,
        seed: int = 0,
        start_position: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if num_items < 1:
            raise ValueError("the data set is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.num_items = num_items
        self.batch_size_at = batch_size if callable(batch_size) else (lambda _position: batch_size)
        self.seed = seed
        self.start_position = start_position
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self._cached_epoch = -1
        self._cached_order = torch.arange(num_items)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._cached_order = torch.randperm(self.num_items, generator=generator)
            self._cached_epoch = epoch
        return self._cached_order

    def global_indices(self, position: int, count: int) -> list[int]:
        """Items at stream positions [position, position + count)."""
        indices: list[int] = []
        while count > 0:
            epoch, offset = divmod(position, self.num_items)
            take = min(count, self.num_items - offset)
            indices.extend(self._order(epoch)[offset : offset + take].tolist())
            position += take
            count -= take
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_position
        while True:
            global_batch = self.batch_size_at(position)
            if global_batch % self.world_size:
                raise ValueError(
                    f"global batch size {global_batch} is not divisible by the world size {self.world_size}"
                )
            per_rank = global_batch // self.world_size
            indices = self.global_indices(position, global_batch)
            yield indices[self.rank * per_rank : (self.rank + 1) * per_rank]
            position += global_batch
