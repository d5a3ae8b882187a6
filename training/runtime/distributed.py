"""Process-group setup from the torchrun environment and the few collectives trainers need.

Launch with `torchrun --nproc_per_node=N -m training.cli ...`: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python -m ...` run is a world of one and needs no
process group at all. CUDA runs use NCCL with one GPU per process (cuda:LOCAL_RANK); CPU runs use gloo.

Gradients are averaged with one all-reduce over a flat buffer (`average_gradients_`), the scheme of
NVlabs stylegan2-ada-pytorch, rather than through the `DistributedDataParallel` wrapper: a gradient
penalty needs `torch.autograd.grad(..., create_graph=True)`, which DDP's reducer does not support,
and a progressively grown network leaves different parameters unused in every phase.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.runtime.validation import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is in the job and which device it drives."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def world_size_from_env() -> int:
    """The number of processes in this job: torchrun's WORLD_SIZE, 1 when it is unset.

    Known before any process group exists, so configurations can be checked against it first.
    Raises ConfigError (a ValueError) when WORLD_SIZE is not a positive integer.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(text)
    except ValueError:
        world_size = 0
    if world_size < 1:
        raise ConfigError(
            f"WORLD_SIZE={text!r} must be a positive integer (torchrun sets it; unset it to run alone)"
        )
    return world_size


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistributedContext:
    """Join the torchrun job described by the environment (or run alone if there is none)."""
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistributedContext(0, 0, 1, resolved, None)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistributedContext(rank, local_rank, world_size, resolved, backend)


def shutdown_distributed() -> None:
    """Leave the process group together: every rank waits for the others before tearing it down.

    Without the barrier a fast rank closes its gloo connections while a peer is still finishing its
    last collective, and the peer's transport thread aborts the process (SIGABRT, "terminate called
    without an active exception") after the work itself has succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_flat_(tensors: Sequence[torch.Tensor], average: bool = True) -> None:
    """Sum (or average) a list of tensors across ranks in place with a single all-reduce."""
    world = _world_size()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if average:
        flat /= world
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view_as(tensor))
        offset += count


def average_gradients_(
    parameters: Iterable[torch.nn.Parameter], extra: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Average `.grad` of every parameter that has one across ranks, in one collective.

    Parameters whose `.grad` is None (layers unused in this phase) are skipped; every rank runs the
    same phase, so every rank skips the same ones. `extra` (e.g. the step's losses and a stop flag)
    rides along in the same buffer and is returned averaged, so every rank sees the same values.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    payload = grads + ([extra] if extra is not None else [])
    all_reduce_flat_(payload, average=True)
    return extra


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank."""
    if _world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)
