"""Atomic, exactly-resumable checkpoints that load without unpickling arbitrary objects.

A checkpoint is one `torch.save` file holding only tensors, numbers, strings, lists and dicts, so
`torch.load(weights_only=True)` reads it:

    {
      "format": "cxrsynth-checkpoint/1",
      "objects": {name: obj.state_dict()},     # modules, optimisers, grad scalers, ...
      "state_json": "<JSON text>",             # config, counters: anything JSON-able
      "rng": [per-rank RNG state, ...],        # python, numpy, torch CPU, every CUDA device
    }

Files are written to a temporary name in the same directory, flushed to disk and renamed, so a
reader (or a restart after a crash mid-write) only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

FORMAT = "cxrsynth-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
_NAME_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class Checkpoint:
    """What `load_checkpoint`/`read_checkpoint` return besides restoring objects in place."""

    path: Path
    state: dict[str, Any]
    rng: list[dict[str, Any]] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG this process uses, as weights_only-loadable values."""
    version, mt_state, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].cpu().numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())  # a map_location may have moved it
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise RuntimeError(
                f"checkpoint holds RNG states for {len(cuda_states)} CUDA devices but this process sees "
                f"{torch.cuda.device_count()}; resume with the same CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in cuda_states])


def gather_rng_states() -> list[dict[str, Any]]:
    """RNG state of every rank (index = rank); collective when a process group is initialised."""
    local = capture_rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


# ---------------------------------------------------------------------------------- save / load


def checkpoint_path(run_dir: str | os.PathLike[str], counter: int) -> Path:
    """Canonical file name for a checkpoint taken at `counter` (images shown, steps, ...)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"checkpoint-{counter:012d}.pt"


def run_dir_of(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The run directory a checkpoint file sits in (the parent of its checkpoints/), or None."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else None


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first (temporary files are never listed)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the largest counter in `run_dir`, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    objects: Mapping[str, Stateful],
    state: Mapping[str, Any],
    rng: list[dict[str, Any]] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path.

    objects: anything with `state_dict()`: modules, optimisers, `torch.amp.GradScaler`.
    state:   JSON-able values (config, counters); a non-JSON-able value raises TypeError before
             anything is written.
    rng:     per-rank RNG states (`gather_rng_states()`); captured from this process if None.
    keep_last: if set, delete older `checkpoint-*.pt` files in the same directory beyond this many.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "objects": {name: obj.state_dict() for name, obj in objects.items()},
        "state_json": json.dumps(state, sort_keys=True),
        "rng": rng if rng is not None else [capture_rng_state()],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if keep_last is not None and _NAME_PATTERN.match(path.name):
        siblings = list_checkpoints(path.parent.parent)
        for old in siblings[: max(0, len(siblings) - keep_last)]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint without restoring anything (e.g. to export or sample from it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupted file or foreign pickle with arbitrary objects
        raise ValueError(f"{path} is not a readable checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    return Checkpoint(
        path=path,
        state=json.loads(payload["state_json"]),
        rng=list(payload["rng"]),
        objects=dict(payload["objects"]),
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    objects: Mapping[str, Stateful],
    map_location: str | torch.device = "cpu",
    rank: int | None = 0,
) -> Checkpoint:
    """Restore `objects` in place from `path` and return the checkpoint's JSON state.

    rank: whose RNG state to restore into this process (None: leave RNGs alone). Restoring another
    world size's checkpoint raises, since the data shards and random streams would differ.
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    missing = sorted(set(objects) - set(checkpoint.objects))
    if missing:
        raise KeyError(f"{path} holds no state for {missing}; it holds {sorted(checkpoint.objects)}")
    for name, obj in objects.items():
        obj.load_state_dict(checkpoint.objects[name])
    if rank is not None:
        if rank >= len(checkpoint.rng):
            raise RuntimeError(
                f"{path} was written by {len(checkpoint.rng)} process(es); rank {rank} has no RNG state "
                "to resume from. Resume with the same number of processes."
            )
        restore_rng_state(checkpoint.rng[rank])
    return checkpoint
