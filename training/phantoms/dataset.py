"""Write a phantom data set to disk in the NIH ChestX-ray14 layout.

``DIR/images/<patient>_<follow-up>.png`` plus ``DIR/Data_Entry_2017_v2020.csv`` with exactly the NIH
columns, so the NIH reader here and other ChestX-ray14 loaders read it unchanged. Every image and the
CSV are written under a temporary name and renamed, so an interrupted run never leaves a half-written
file; the CSV, written last, marks the data set complete.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from service.labels import NUM_LABELS, format_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS
from service.prior import PRIOR_NAMES
from training.phantoms.render import check_size, sample_phantom

CSV_NAME = "Data_Entry_2017_v2020.csv"
IMAGES_DIR = "images"
# NIH films are about 2500 px wide at 0.143 mm per pixel; a phantom covers the same field of view.
NIH_PIXEL_SPACING_MM = 0.143
NIH_FILM_PIXELS = 2500
_PATIENT_STREAM = 7


@dataclass(frozen=True)
class Visit:
    """Who an image belongs to: synthetic patients with one to several follow-up films."""

    patient_id: int
    follow_up: int
    age: int
    gender: str

    @property
    def image_index(self) -> str:
        return f"{self.patient_id:08d}_{self.follow_up:03d}.png"


def plan_visits(count: int, seed: int) -> list[Visit]:
    """``count`` images grouped into patients (about 1.8 films each), with ages and genders."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PATIENT_STREAM]))
    visits: list[Visit] = []
    patient = 0
    while len(visits) < count:
        patient += 1
        films = int(min(rng.geometric(0.55), 6))
        age = int(rng.integers(18, 86))
        gender = "M" if rng.random() < 0.56 else "F"  # the NIH table is 56 % male
        for follow_up in range(films):
            visits.append(Visit(patient, follow_up, min(age + follow_up // 2, 95), gender))
    return visits[:count]


def encode_png(image: np.ndarray, bit_depth: int) -> bytes:
    """A single-channel PNG of a [0, 1] image, 8 or 16 bits per pixel."""
    if bit_depth == 8:
        pil = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))  # mode L
    elif bit_depth == 16:
        pil = Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16))  # mode I;16
    else:
        raise ValueError(f"bit depth must be 8 or 16, got {bit_depth}")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Job:
    images_dir: str
    size: int
    seed: int
    prior: str
    bit_depth: int


def _render_and_write(job: _Job, index: int, name: str) -> tuple[int, np.ndarray]:
    image, labels = sample_phantom(index, job.size, job.seed, job.prior)
    write_atomic(Path(job.images_dir) / name, encode_png(image, job.bit_depth))
    return index, labels


def _worker(args: tuple[_Job, list[tuple[int, str]]]) -> list[tuple[int, np.ndarray]]:
    job, chunk = args
    return [_render_and_write(job, index, name) for index, name in chunk]


def write_dataset(
    out: str | Path,
    count: int,
    size: int,
    seed: int = 0,
    prior: str = "nih",
    bit_depth: int = 8,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Render ``count`` phantoms into ``out`` and write the NIH Data_Entry CSV; returns the CSV path.

    Image ``i`` is ``sample_phantom(i, size, seed, prior)``, so a data set is reproducible from its
    arguments and any slice of it can be re-rendered on its own. ``workers`` processes render in
    parallel (default: all cores).
    """
    size = check_size(size)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if prior not in PRIOR_NAMES:
        raise ValueError(f"unknown label prior {prior!r}; choose one of {', '.join(PRIOR_NAMES)}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit depth must be 8 or 16, got {bit_depth}")
    out = Path(out)
    images_dir = out / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    visits = plan_visits(count, seed)
    job = _Job(str(images_dir), size, int(seed), prior, bit_depth)
    labels = np.zeros((count, NUM_LABELS), dtype=np.float32)
    workers = max(1, min(workers or os.cpu_count() or 1, count))
    bar = tqdm(total=count, unit="img", desc=f"phantoms {size}²", disable=not progress)
    with bar:
        for index, vector in _render_all(job, visits, workers):
            labels[index] = vector
            bar.update(1)
    return _write_csv(out, visits, labels, size)


def _render_all(job: _Job, visits: list[Visit], workers: int) -> Iterator[tuple[int, np.ndarray]]:
    named = [(i, visit.image_index) for i, visit in enumerate(visits)]
    if workers == 1:
        for index, name in named:
            yield _render_and_write(job, index, name)
        return
    # Chunks small enough to keep the progress bar moving, large enough to amortise the IPC.
    chunk = max(1, min(64, len(named) // (workers * 8)))
    chunks = [(job, named[i : i + chunk]) for i in range(0, len(named), chunk)]
    # fork starts workers in milliseconds (they inherit the loaded modules); elsewhere, spawn.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        for results in pool.imap_unordered(_worker, chunks):
            yield from results


def _write_csv(out: Path, visits: list[Visit], labels: np.ndarray, size: int) -> Path:
    spacing = round(NIH_PIXEL_SPACING_MM * NIH_FILM_PIXELS / size, 6)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DATA_ENTRY_COLUMNS)
    for visit, vector in zip(visits, labels):
        writer.writerow(
            [
                visit.image_index,
                format_finding_labels(vector),
                visit.follow_up,
                visit.patient_id,
                visit.age,
                visit.gender,
                "PA",
                size,
                size,
                spacing,
                spacing,
            ]
        )
    path = out / CSV_NAME
    write_atomic(path, buffer.getvalue().encode())
    return path
