"""PGGAN training throughput on CPU for the `demo` preset: eager vs channels_last (vs torch.compile).

    python -m benchmarks.bench_gan_cpu [--seconds 3] [--rounds 3] [--threads 1] [--compile] [--resolutions 32 64]

For every resolution of the preset, one full training iteration (critic step with gradient penalty,
generator step, EMA update) is timed in the stabilising phase. The variants run interleaved, round
after round, on the same machine in the same process, and the median img/s per variant is reported
with its ratio to eager: the ratio is what to compare across machines, the absolute numbers depend
on the CPU and on whatever else shares it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from training.gan.config import load_config
from training.gan.training_loop import PGGANTrainer
from training.runtime import init_distributed

VARIANTS = {
    "eager": [],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
}


def measure(trainer: PGGANTrainer, phase_start: int, phase_index: int, batch: int, seconds: float) -> float:
    trainer.images_shown, trainer.phase_index = phase_start, phase_index
    trainer._batches = None  # restart the data stream at this phase
    trainer.step()  # warm-up (and compilation)
    trainer.step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.step()
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the generator")
    parser.add_argument("--resolutions", type=int, nargs="*", help="only these resolutions (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = ["eager", "channels_last"] + (["compile"] if args.compile else [])
    context = init_distributed("cpu")
    base = load_config(args.config)
    resolution = base.network.resolution
    images = torch.rand(256, 1, resolution, resolution) * 2 - 1
    data = TensorDataset(images, torch.zeros(256, 14), torch.zeros(256, 14))
    trainers = {
        name: PGGANTrainer(
            load_config(args.config, VARIANTS[name] + ["train.amp=off"]),
            data,
            "/tmp/bench-gan-cpu",
            context,
            progress=False,
            tensorboard=False,
        )
        for name in names
    }
    stable = [
        p
        for p in trainers["eager"].schedule.phases
        if p.kind == "stable" and (not args.resolutions or p.resolution in args.resolutions)
    ]
    print(
        f"PGGAN {args.config} preset, CPU, {args.threads} thread(s), torch {torch.__version__}; "
        f"median of {args.rounds} rounds × {args.seconds:.0f} s, img/s (one critic + one generator step per image)"
    )
    header = f"{'resolution':>10s}  {'batch':>5s}  " + "  ".join(f"{n:>14s}" for n in names)
    print(header + "  " + "  ".join(f"{n + '/eager':>20s}" for n in names[1:]))
    for phase in stable:
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                samples[name].append(
                    measure(trainers[name], phase.start, phase.index, phase.batch_size, args.seconds)
                )
        medians = {n: statistics.median(v) for n, v in samples.items()}
        row = f"{phase.resolution:>9d}²  {phase.batch_size:>5d}  " + "  ".join(
            f"{medians[n]:>14.1f}" for n in names
        )
        ratios = "  ".join(f"{medians[n] / medians['eager']:>19.2f}×" for n in names[1:])
        print(row + "  " + ratios, flush=True)


if __name__ == "__main__":
    main()
