"""Data loader throughput: images/s delivered to the training loop.

Two workloads, each measured side by side in one run:

* phantoms generated on the fly at 64² with 0, 1 and 2 worker processes;
* an NIH-layout folder of full-size 1024² 8-bit PNGs read at 256², decoding and resizing every epoch
  versus the resize cache (first epoch fills it, later epochs read 256² arrays).

The source PNGs are phantoms rendered at 256², upsampled to 1024² and given film-grain noise, so
they decode and compress like real radiographs (about 0.5 MB each, as NIH's are), not like flat
test patterns. Rates are steady state (second pass, workers already running) except the cache's
first epoch, which is timed as a cold start.

    python -m benchmarks.bench_loader [--images 256] [--disk-images 192] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from service.labels import format_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS
from training.data import NIHChestXray14, PhantomDataset, make_loader


def images_per_second(loader: torch.utils.data.DataLoader, epochs: int = 1) -> list[float]:
    """Images/s of each of ``epochs`` passes over ``loader`` (persistent workers carry over)."""
    rates = []
    for _ in range(epochs):
        count, start = 0, time.perf_counter()
        for images, _, _ in loader:
            count += images.shape[0]
        rates.append(count / (time.perf_counter() - start))
    return rates


def write_nih_folder(root: Path, count: int, source_size: int) -> None:
    """``count`` NIH-layout PNGs of ``source_size``² with a Data_Entry CSV."""
    from training.phantoms import sample_phantom

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in tqdm(range(count), desc=f"writing {source_size}² PNGs", unit="img"):
        image, labels = sample_phantom(index, 256, seed=0)
        upsampled = Image.fromarray(image * 255.0).resize(
            (source_size, source_size), Image.Resampling.BICUBIC
        )
        pixels = np.asarray(upsampled) + rng.normal(0.0, 2.0, (source_size, source_size))
        name = f"{index + 1:08d}_000.png"
        Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(root / "images" / name)
        rows.append(
            [
                name,
                format_finding_labels(labels),
                0,
                index + 1,
                50,
                "F",
                "PA",
                source_size,
                source_size,
                0.143,
                0.143,
            ]
        )
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(DATA_ENTRY_COLUMNS)
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256, help="phantoms per measurement")
    parser.add_argument("--disk-images", type=int, default=192, help="PNGs in the NIH-layout folder")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the PNGs on disk")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="workers for the on-disk measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[tuple[str, int, float, str]] = []

    phantoms = PhantomDataset(count=args.images, size=64, seed=0)
    baseline = None
    for workers in (0, 1, 2):
        loader = make_loader(phantoms, args.batch, workers=workers, shuffle=True, seed=0, pin_memory=False)
        rate = images_per_second(loader, epochs=2)[1]
        baseline = baseline or rate
        rows.append(("phantoms 64² on the fly", workers, rate, f"{rate / baseline:.2f}× vs 0 workers"))
        del loader

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as scratch:
        root = Path(scratch) / "nih"
        write_nih_folder(root, args.disk_images, args.source_size)
        megabytes = sum(p.stat().st_size for p in (root / "images").iterdir()) / args.disk_images / 2**20
        label = f"NIH PNG {args.source_size}² ({megabytes:.1f} MB) -> 256²"

        plain = NIHChestXray14(root, split="all", size=256)
        loader = make_loader(plain, args.batch, workers=args.workers, seed=0, pin_memory=False)
        decode_rate = images_per_second(loader, epochs=2)[1]
        rows.append((f"{label}, decode every epoch", args.workers, decode_rate, "1.00×"))
        del loader

        cached = NIHChestXray14(root, split="all", size=256, cache_dir=Path(scratch) / "cache")
        loader = make_loader(cached, args.batch, workers=args.workers, seed=0, pin_memory=False)
        cold, warm = images_per_second(loader, epochs=2)
        rows.append(
            (f"{label}, cache: first epoch (fills)", args.workers, cold, f"{cold / decode_rate:.2f}×")
        )
        rows.append((f"{label}, cache: later epochs", args.workers, warm, f"{warm / decode_rate:.2f}×"))
        del loader

    width = max(len(row[0]) for row in rows)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"\nloader throughput on {os.cpu_count()} CPU cores (load average {load}), batch {args.batch}, "
        f"torch {torch.__version__}"
    )
    print(f"{'workload':<{width}}  workers  images/s  ratio")
    for name, workers, rate, ratio in rows:
        print(f"{name:<{width}}  {workers:>7}  {rate:>8.0f}  {ratio}")


if __name__ == "__main__":
    main()
