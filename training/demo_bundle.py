"""Train the demo bundle from nothing on procedural phantoms: ``python -m training.demo_bundle``.

The steps are the training CLI's own commands, each a ``python -m training.cli`` subprocess with its
own progress bar: the `demo` PGGAN (data-parallel over two processes), the LCO classifier ensemble's
members (``DEMO_MEMBERS``), their ensemble, and the export. ``python -m service.demo`` runs this when
``models/demo`` holds no valid bundle; the service package itself never imports the trainer.

Exit status: 0 with a valid bundle at ``--bundle``; 1 naming the step that failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.processes import Stopped, exit_on_signals, run_step
from training.classifier.config import DEMO_MEMBERS

ROOT = Path(__file__).resolve().parents[1]


def training_steps(bundle: Path, runs: Path) -> list[tuple[str, bool, list[str]]]:
    """(title, data-parallel, training.cli arguments) of each step."""
    members = list(DEMO_MEMBERS)
    member_runs = [str(runs / f"classifier-{number}") for number in range(1, len(members) + 1)]
    return [
        ("PGGAN generator", True, ["train", "--config", "demo", "--data", "phantoms", "--run-dir", str(runs / "gan")]),
        *((f"LCO classifier {number}/{len(members)}", False, ["classifier", "train", "--preset", preset, "--run-dir", run])
          for number, (preset, run) in enumerate(zip(members, member_runs), start=1)),
        ("LCO classifier ensemble", False, ["classifier", "ensemble", *member_runs, "--preset", "demo",
                                            "--run-dir", str(runs / "classifier")]),
        ("bundle export", False, ["export", "--generator", str(runs / "gan"), "--classifier", str(runs / "classifier"),
                                  "--out", str(bundle), "--name", "cxrsynth-demo", "--overwrite"]),
    ]


def launcher(data_parallel: bool) -> list[str]:
    """torchrun with one process per core (gloo): on the CPU one thread per process runs fastest
    (BENCHMARKS.md)."""
    processes = min(2, os.cpu_count() or 1)
    if not data_parallel or processes < 2:
        return []
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def train_bundle(bundle: Path, runs: Path) -> int:
    steps = training_steps(bundle, runs)
    for number, (title, data_parallel, arguments) in enumerate(steps, start=1):
        command = [sys.executable, *launcher(data_parallel), "-m", "training.cli", *arguments]
        print(f"[{number}/{len(steps)}] {title}: {' '.join(command[1:])}", flush=True)
        returncode = run_step(command, cwd=ROOT)
        if returncode != 0:
            print(f"error: training step '{title}' failed with exit code {returncode}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_bundle", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo", help="where to write the bundle")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo", help="training run directories")
    args = parser.parse_args(argv)
    with exit_on_signals():
        try:
            return train_bundle(args.bundle.resolve(), args.runs.resolve())
        except Stopped as stop:
            return stop.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
