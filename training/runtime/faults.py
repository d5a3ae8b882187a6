"""Interruption and numerical-fault handling for long training runs.

`StopRequest` turns SIGINT (Ctrl-C) and SIGTERM (a Kubernetes eviction, `kill`) into a flag the
training loop polls between steps, so it can write a checkpoint and exit cleanly; a second Ctrl-C
interrupts at once.

`NonFiniteGuard` is told whether each optimiser step's loss and gradients were finite. A non-finite
step is skipped (the caller does not apply it) and counted; after `max_consecutive` in a row the
guard raises `NonFiniteError` so the run stops before anything is written, leaving the last good
checkpoint untouched.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch
from typing_extensions import Self


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set `requested` instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user really wants out now
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps produced NaN/Inf losses or gradients."""


class NonFiniteGuard:
    """Counts skipped non-finite steps and stops the run after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int = 20, name: str = "training") -> None:
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be at least 1")
        self.max_consecutive = max_consecutive
        self.name = name
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, finite: bool, where: str = "") -> bool:
        """Record one step; True if it may be applied. Raises after too many failures in a row."""
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.name}: {self.consecutive} consecutive steps had non-finite losses or gradients"
                f"{' (' + where + ')' if where else ''}; stopping without writing a checkpoint so the "
                "last good one is untouched. Lower the learning rate, disable AMP, or resume from an "
                "earlier checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device sync)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
