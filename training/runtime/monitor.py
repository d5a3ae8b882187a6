"""Run directories and what a person watches while training runs.

Run directory layout (created by `create_run_dir`, numbered like NVlabs' `00003-demo-phantoms`):

    runs/00003-demo-phantoms/
        config.json          the resolved configuration
        stats.jsonl          one JSON object per tick (losses, images shown, img/s, ...)
        events.out.tfevents.* TensorBoard scalars (same values as stats.jsonl)
        grids/               PNG grids from fixed latents, one per tick
        checkpoints/         checkpoint-<counter>.pt (see training.runtime.checkpoint)
        log.txt              messages (faults, resume points)
        metric-<name>.jsonl  one JSON object per evaluation of a metric (see training.metrics)

Only rank 0 writes; other ranks get a monitor whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

_RUN_PATTERN = re.compile(r"^(\d{5})-")


def create_run_dir(root: str | os.PathLike[str], description: str) -> Path:
    """Create `root/NNNNN-description` with the next free number and return it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", description).strip("-") or "run"
    while True:
        numbers = [int(m.group(1)) for entry in root.iterdir() if (m := _RUN_PATTERN.match(entry.name))]
        run_dir = root / f"{max(numbers, default=-1) + 1:05d}-{safe}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:  # another job took the number first
            continue


def write_json_atomic(path: str | os.PathLike[str], value: Any) -> None:
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp_name, path)


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    columns: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Write a [N, 1, H, W] (or [N, 3, H, W]) batch as one 8-bit PNG grid, atomically."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected [N, 1|3, H, W] images, got shape {tuple(images.shape)}")
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    low, high = value_range
    pixels = ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    pixels = (pixels * 255 + 0.5).to(torch.uint8).numpy()
    canvas = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = pixels[
            index
        ].transpose(1, 2, 0)
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas, mode="L" if channels == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    image.save(tmp_name, format="PNG")
    os.replace(tmp_name, path)
    return path


class TrainingMonitor:
    """Progress bar + TensorBoard scalars + JSONL stats for one run (active on rank 0 only)."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        total: int,
        initial: int = 0,
        enabled: bool = True,
        unit: str = "img",
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if progress:
            self._bar = tqdm(
                total=total, initial=initial, unit=unit, unit_scale=True, dynamic_ncols=True, smoothing=0.05
            )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import

            self._writer = SummaryWriter(log_dir=str(self.run_dir))

    def advance(self, position: int, postfix: Mapping[str, Any] | None = None) -> None:
        """Move the bar to `position` (e.g. images shown) and show `postfix` (phase, losses)."""
        if self._bar is None:
            return
        self._bar.update(position - self._bar.n)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def log(self, stats: Mapping[str, Any], step: int) -> None:
        """Append `stats` to stats.jsonl and write its numeric values as TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"time": time.time(), **stats}
        with open(self.run_dir / "stats.jsonl", "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._writer is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()

    def message(self, text: str) -> None:
        """Print above the progress bar and append to log.txt."""
        if not self.enabled:
            return
        (tqdm.write if self._bar is not None else print)(text)
        with open(self.run_dir / "log.txt", "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
