"""The skeleton every training loop shares: run directory, optimiser step, ticks, checkpoints, stop.

A trainer counts images shown and hands its step to `run_steps`, which runs it until the end or a stop
request (SIGINT/SIGTERM). Ticks (progress, stats, grids) and checkpoints fall at the first step that
reaches each multiple of their interval, and at the end or a stop, so a resumed run logs and saves at
the same counts as an unbroken one. An optimiser step averages the gradients over ranks in one
collective and is skipped, not taken, when a gradient or a checked value is non-finite
(`NonFiniteGuard` counts the skips and stops the run after too many in a row).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.runtime.checkpoint import Stateful, checkpoint_path, gather_rng_states, save_checkpoint
from training.runtime.distributed import DistributedContext, average_gradients_
from training.runtime.faults import NonFiniteGuard, StopRequest, all_finite
from training.runtime.monitor import TrainingMonitor, create_run_dir


class Interval:
    """When something done every `every` images is next due: the next multiple of `every`."""

    def __init__(self, every: int, position: int) -> None:
        self.every = every
        self.restart(position)

    def restart(self, position: int) -> None:
        """Due again at the first multiple of `every` after `position` (images shown)."""
        self.next = (position // self.every + 1) * self.every

    def due(self, position: int) -> bool:
        return position >= self.next


def shared_run_dir(
    run_dir: str | os.PathLike[str] | None,
    runs_root: str | os.PathLike[str],
    description: str,
    context: DistributedContext,
) -> Path:
    """`run_dir`, or a new numbered directory under `runs_root` that rank 0 creates and every rank gets.

    Collective under torchrun when `run_dir` is None.
    """
    if run_dir is not None:
        return Path(run_dir)
    created = [str(create_run_dir(runs_root, description)) if context.is_main else ""]
    if context.is_distributed:
        torch.distributed.broadcast_object_list(created, src=0)
    return Path(created[0])


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parameters: Iterable[torch.nn.Parameter],
    guard: NonFiniteGuard,
    *,
    extra: torch.Tensor | None = None,
    checked: Iterable[torch.Tensor] = (),
    where: str = "",
) -> tuple[bool, torch.Tensor | None]:
    """Average the gradients over ranks, unscale them, step when they are finite, update the loss scale.

    extra: values (a step's losses, a stop flag) averaged in the gradients' collective, so every rank
      sees the same; they must be finite too. checked: this rank's values that must also be finite.
    Returns (whether the step was taken, `extra` averaged); raises NonFiniteError (from `guard`) after
    too many skipped steps in a row.
    """
    parameters = list(parameters)
    extra = average_gradients_(parameters, extra=extra)
    scaler.unscale_(optimizer)
    grads = [p.grad for p in parameters if p.grad is not None]
    finite = [*checked, *grads] if extra is None else [*checked, *grads, extra]
    stepped = guard.check(all_finite(finite), where=where)
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    return stepped, extra


def save_run_checkpoint(
    context: DistributedContext,
    run_dir: Path,
    images_shown: int,
    objects: Mapping[str, Stateful],
    state: Mapping[str, Any],
    keep_last: int,
) -> Path | None:
    """Checkpoint `run_dir` at `images_shown` (collective: every rank gives its RNG state, rank 0
    writes, every rank waits for it). Returns the file on rank 0, None elsewhere."""
    rng = gather_rng_states()
    path = None
    if context.is_main:
        path = save_checkpoint(
            checkpoint_path(run_dir, images_shown), objects=objects, state=state, rng=rng, keep_last=keep_last
        )
    context.barrier()
    return path


@dataclass(frozen=True)
class LoopEnd:
    stopped: bool  # a stop was requested; a checkpoint was written first
    checkpoint: Path | None  # the last checkpoint written (on rank 0)


def run_steps(
    step: Callable[[StopRequest], bool],
    position: Callable[[], int],
    end: int,
    *,
    tick_every: int,
    checkpoint_every: int,
    tick: Callable[[], None],
    checkpoint: Callable[[], Path | None],
    monitor: TrainingMonitor,
) -> LoopEnd:
    """Call `step` until `position()` (images shown) reaches `end` or `step` returns True (stop).

    step: one optimiser step; it decides from the StopRequest whether to stop (every rank must
      decide alike). After each step `tick` runs when a tick is due, and `checkpoint` when one is due;
      both also run after the last step and before stopping.
    """
    ticks, checkpoints = Interval(tick_every, position()), Interval(checkpoint_every, position())
    last: Path | None = None
    with StopRequest() as stop:
        while position() < end:
            stopped = step(stop)
            now = position()
            final = stopped or now >= end
            if ticks.due(now) or final:
                tick()
                ticks.restart(now)
            if checkpoints.due(now) or final:
                last = checkpoint()
                checkpoints.restart(now)
            if stopped:
                monitor.message(
                    f"stopped by {stop.signal_name or 'a signal on another rank'} at {now:,} images; "
                    f"checkpoint {last}"
                )
                return LoopEnd(True, last)
    return LoopEnd(False, last)
