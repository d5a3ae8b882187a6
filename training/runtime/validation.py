"""Start-up checks of a training configuration: every value that cannot run, reported at once.

Trainers check their configuration before they read data or join a process group, so a value that
would only fail hours in (a batch the minibatch-stddev layer cannot group, a learning rate of zero)
fails in a second instead. Each problem is one line that starts with the dotted key to change:

    schedule.batch_size.8=6 ...; use a multiple of 4
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch


class ConfigError(ValueError):
    """A configuration that cannot be used; `problems` holds one message per bad value, each naming
    its key, and the message is all of them (`format_problems`)."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: Sequence[str]) -> str:
    """One problem as is; several as a count and one indented line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the configuration:\n" + "\n".join(f"  - {p}" for p in problems)


def show(value: Any) -> str:
    """A value as it would be written after `key=` on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def is_int(value: Any) -> bool:
    """An int that is not a bool (TOML and JSON keep them apart; Python does not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checks:
    """Collects problems; each check adds `key=value` and what the value must be when it fails."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def integer(self, key: str, value: Any, minimum: int, maximum: int | None = None) -> bool:
        """An integer in [minimum, maximum]; returns whether it is one."""
        if is_int(value) and value >= minimum and (maximum is None or value <= maximum):
            return True
        span = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        self.add(f"{key}={show(value)} must be an integer {span}")
        return False

    def number(
        self, key: str, value: Any, minimum: float, *, above: bool = False, below: float | None = None
    ) -> bool:
        """A finite number ≥ minimum (> minimum with `above`) and < `below` if given."""
        ok = (
            _is_number(value)
            and math.isfinite(value)
            and (value > minimum if above else value >= minimum)
            and (below is None or value < below)
        )
        if not ok:
            low = f"> {minimum:g}" if above else f"≥ {minimum:g}"
            high = f" and < {below:g}" if below is not None else ""
            self.add(f"{key}={show(value)} must be a finite number {low}{high}")
        return ok

    def choice(self, key: str, value: Any, choices: Iterable[str]) -> bool:
        choices = tuple(choices)
        if value in choices:
            return True
        self.add(f"{key}={show(value)} must be one of {', '.join(choices)}")
        return False

    def device(self, key: str, value: Any, on_this_machine: bool) -> None:
        """'auto' or a torch device string; with `on_this_machine`, a CUDA device must also be present."""
        if value == "auto":
            return
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            self.add(f"{key}={show(value)} is not a device; use auto, cpu, cuda or cuda:N")
            return
        if on_this_machine and device.type == "cuda" and not torch.cuda.is_available():
            self.add(f"{key}={show(value)} but torch sees no CUDA device here; use auto or cpu")

    def world_batch(self, key: str, batch: int, world_size: int) -> int | None:
        """The per-rank share of a global batch, or None (with a problem) when the world cannot split it."""
        if batch % world_size:
            self.add(
                f"{key}={batch} is not divisible by world size {world_size} (WORLD_SIZE, one process per "
                f"rank); use a multiple of {world_size}"
            )
            return None
        return batch // world_size

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)
