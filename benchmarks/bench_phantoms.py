"""Phantom generation throughput: rendering in one process, and the parallel NIH-layout writer.

    python -m benchmarks.bench_phantoms [--sizes 64 256 1024] [--seconds 3] [--workers N]

For each size, in one run side by side:
- ``render``: ``sample_phantom`` (labels from the NIH prior, then the image) in this process;
- ``write 1 proc``: ``write_dataset`` with one process (render + 8-bit PNG + atomic file write);
- ``write N procs``: the same with N worker processes (default: every core), and its speed-up.

Absolute images/s depend on the CPU and on whatever else shares it (the load average is printed);
the ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from training.phantoms import sample_phantom, write_dataset


def render_rate(size: int, seconds: float) -> float:
    """Images/s of ``sample_phantom`` in this process, over at least ``seconds``."""
    sample_phantom(0, size)  # warm caches (interpolation matrices, the NIH tables)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        sample_phantom(count, size)
        count += 1
    return count / (time.perf_counter() - start)


def write_rate(size: int, count: int, workers: int) -> float:
    """Images/s of ``write_dataset`` end to end (process start-up included)."""
    directory = tempfile.mkdtemp(prefix="bench-phantoms-")
    try:
        start = time.perf_counter()
        write_dataset(directory, count, size, seed=1, workers=workers, progress=False)
        return count / (time.perf_counter() - start)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per single-process measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, writer workers: {args.workers}")
    header = f"{'size':>6} {'render img/s':>13} {'write 1 proc':>13} {f'write {args.workers} procs':>15} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        rendered = render_rate(size, args.seconds)
        # About the same wall time per writer run as the single-process measurement.
        count = max(8, int(rendered * args.seconds))
        single = write_rate(size, count, workers=1)
        parallel = write_rate(size, max(count, 2 * args.workers), workers=args.workers)
        print(f"{size:>5}² {rendered:>13.1f} {single:>13.1f} {parallel:>15.1f} {parallel / single:>8.2f}x")


if __name__ == "__main__":
    main()
