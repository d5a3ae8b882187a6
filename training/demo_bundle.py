"""Train the demo bundle from nothing: ``python -m training.demo_bundle [--data nih:PATH]``.

The steps are the training CLI's own commands, each a ``python -m training.cli`` subprocess with its
own progress bar: the PGGAN (data-parallel over two processes), the LCO steering classifier, and the
export. On procedural phantoms (the default) these are the `demo` GAN preset and ``--classifier
ensemble`` (the default): the nine members of ``DEMO_MEMBERS`` and their ensemble, 27 classifier passes
per LCO step. ``--classifier distilled`` adds one CNN distilled from that ensemble on the generator's
images and LCO's hard negatives (``DEMO_DISTILLED``) and steers by it, one pass per step, while the
ensemble still decides when an image meets its request (``export --steering``, service/lco.py);
``--classifier robust`` steers by one adversarially trained CNN (``DEMO_STEERING``) alone, below the
ensemble's label fidelity (docs/lco-quality.md). On real
radiographs in the NIH layout (``--data nih:PATH``, made for the 705-image
NIH sample) they are `nih-sample-64` and the ensemble of ``NIH_SAMPLE_MEMBERS``, and two steps follow: the independent
auditor (`auditor-nih-sample`) and its export for ONNX Runtime to ``--auditor``. ``python -m
service.demo`` runs this when its bundle directory holds no valid bundle; the service package itself
never imports the trainer.

``--pin FILE`` then writes the sha256 of the new bundle's manifest (which seals every graph's sha256)
to FILE: `make demo-bundle` pins the demo bundle the repository ships (``models/demo.sha256``), and
``python -m service.demo`` refuses a ``models/demo`` that does not match its pin.

Exit status: 0 with a valid bundle at ``--bundle``; 1 naming the step that failed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.demo import manifest_sha256
from service.processes import Stopped, exit_on_signals, run_step
from training.classifier.config import (
    DEMO_DISTILLED,
    DEMO_DISTILLED_INIT,
    DEMO_MEMBERS,
    DEMO_STEERING,
    NIH_SAMPLE_MEMBERS,
)

ROOT = Path(__file__).resolve().parents[1]


STEERING_CLASSIFIERS = ("distilled", "ensemble", "robust")


def training_steps(bundle: Path, runs: Path, data: str = "phantoms", auditor: Path | None = None,
                   classifier: str | None = None) -> list[tuple[str, bool, list[str]]]:
    """(title, data-parallel, training.cli arguments) of each step; ``data`` is "phantoms" or "nih:PATH"
    (then ``auditor`` is where the auditor is exported); ``classifier`` is "ensemble" (the default)
    or "robust" (phantoms only: nih:PATH has no robust preset). Raises ValueError for another
    combination."""
    real = data != "phantoms"
    if real and auditor is None:
        raise ValueError(f"--data {data} trains an auditor too: say where to export it (auditor=...)")
    classifier = classifier or "ensemble"
    if classifier not in STEERING_CLASSIFIERS or (real and classifier != "ensemble"):
        raise ValueError(f"--classifier {classifier}: use distilled, ensemble or robust on phantoms, ensemble on "
                         "nih:PATH")
    gan_preset, members, name = ("nih-sample-64", NIH_SAMPLE_MEMBERS, "cxrsynth-nih-sample") if real else (
        "demo", DEMO_MEMBERS, "cxrsynth-demo")
    data_root = ["--set", f"data.root={data.partition(':')[2]}"] if real else []
    member_runs = [str(runs / f"classifier-{number}") for number in range(1, len(members) + 1)]
    steps = [("PGGAN generator", True, ["train", "--config", gan_preset, "--data", data, "--run-dir", str(runs / "gan")])]
    if classifier == "robust":
        steps.append(("LCO classifier (robust)", False,
                      ["classifier", "train", "--preset", DEMO_STEERING, "--run-dir", str(runs / "classifier")]))
    else:
        steps += [
            *((f"LCO classifier {number}/{len(members)}", False,
               ["classifier", "train", "--preset", preset, *data_root, "--run-dir", run])
              for number, (preset, run) in enumerate(zip(members, member_runs), start=1)),
            ("LCO classifier ensemble", False, ["classifier", "ensemble", *member_runs, "--preset", members[0],
                                                *data_root, "--run-dir", str(runs / "classifier")]),
        ]
    steered_by: list[str] = []
    if classifier == "distilled":
        steered_by = ["--steering", str(runs / "classifier-distilled")]
        steps.append(("LCO classifier (distilled from the ensemble)", False, [
            "classifier", "distill", str(runs / "classifier"), "--generator", str(runs / "gan"),
            "--init", member_runs[DEMO_MEMBERS.index(DEMO_DISTILLED_INIT)], "--preset", DEMO_DISTILLED,
            "--run-dir", steered_by[1]]))
    # On phantoms the bundle carries its auditor (verify on by default); on nih:PATH it is exported beside it.
    bundled_auditor = [] if real else ["--auditor", str(runs / "auditor")]
    if not real:
        steps.append(("auditor", False, ["classifier", "train", "--preset", "auditor", "--run-dir", str(runs / "auditor")]))
    steps += [
        ("bundle export", False, ["export", "--generator", str(runs / "gan"), "--classifier", str(runs / "classifier"),
                                  *steered_by, *bundled_auditor, "--out", str(bundle), "--name", name, "--overwrite"]),
    ]
    if real:
        steps += [
            ("auditor", False, ["classifier", "train", "--preset", "auditor-nih-sample", *data_root,
                                "--run-dir", str(runs / "auditor")]),
            ("auditor export", False, ["export-auditor", "--classifier", str(runs / "auditor"), "--out", str(auditor),
                                       "--overwrite"]),
        ]
    return steps


def launcher(data_parallel: bool) -> list[str]:
    """torchrun with one process per core (gloo): on the CPU one thread per process runs fastest
    (BENCHMARKS.md)."""
    processes = min(2, os.cpu_count() or 1)
    if not data_parallel or processes < 2:
        return []
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def train_bundle(bundle: Path, runs: Path, data: str = "phantoms", auditor: Path | None = None,
                 classifier: str | None = None) -> int:
    steps = training_steps(bundle, runs, data, auditor, classifier)
    # one thread per process, as torchrun sets for the GAN's: two on two shared cores ran up to 20×
    # slower (BENCHMARKS.md)
    single_threaded = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for number, (title, data_parallel, arguments) in enumerate(steps, start=1):
        command = [sys.executable, *launcher(data_parallel), "-m", "training.cli", *arguments]
        print(f"[{number}/{len(steps)}] {title}: {' '.join(command[1:])}", flush=True)
        returncode = run_step(command, cwd=ROOT, env=single_threaded)
        if returncode != 0:
            print(f"error: training step '{title}' failed with exit code {returncode}", file=sys.stderr)
            return 1
    return 0


def write_pin(bundle: Path, pin: Path) -> str:
    """Write the sha256 of ``bundle``'s manifest.json to ``pin`` (one hex line); returns it."""
    digest = manifest_sha256(bundle)
    pin.write_text(digest + "\n")
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_bundle", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo", help="where to write the bundle")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo", help="training run directories")
    parser.add_argument("--data", default="phantoms", help="phantoms, or real radiographs in the NIH layout: nih:PATH")
    parser.add_argument("--auditor", type=Path, help="with --data nih:PATH: where to export the auditor")
    parser.add_argument("--pin", type=Path, help="write the sha256 of the new bundle's manifest here")
    parser.add_argument("--classifier", choices=STEERING_CLASSIFIERS, default=None,
                        help="LCO's steering classifier: ensemble (the default: nine CNNs on phantoms, 27 "
                             "passes per LCO step; three on nih:PATH, the only choice there), distilled (one CNN "
                             "distilled from the ensemble, one pass per step, the ensemble accepting) or robust "
                             "(one adversarially trained CNN alone): docs/lco-quality.md")
    args = parser.parse_args(argv)
    kind, _, path = args.data.partition(":")
    if args.data != "phantoms" and not (kind == "nih" and Path(path).is_dir()):
        parser.error(f"--data {args.data}: expected 'phantoms' or 'nih:PATH' with PATH a directory")
    if kind == "nih" and args.auditor is None:
        parser.error("--data nih:PATH trains an auditor too: say where to export it with --auditor DIR")
    if kind == "nih" and args.classifier not in (None, "ensemble"):
        parser.error(f"--classifier {args.classifier} has no preset for nih:PATH yet; use --classifier ensemble")
    with exit_on_signals():
        try:
            data = f"nih:{Path(path).resolve()}" if kind == "nih" else "phantoms"
            status = train_bundle(args.bundle.resolve(), args.runs.resolve(), data,
                                  args.auditor.resolve() if args.auditor else None, args.classifier)
            if status == 0 and args.pin:
                print(f"pinned {args.bundle}: manifest sha256 {write_pin(args.bundle, args.pin)} in {args.pin}")
            return status
        except Stopped as stop:
            return stop.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
