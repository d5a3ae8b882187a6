"""CLI commands ``export`` and ``export-auditor`` (registered by training.cli):

    python -m training.cli export --generator RUN_DIR_OR_CHECKPOINT --classifier CLASSIFIER_DIR \
        --out bundles/demo [--auditor AUDITOR_DIR] [--steering STUDENT_DIR] [--name cxrsynth-demo] [--version V] [--acceptance-samples N] [--model-store]
    python -m training.cli export-auditor --classifier AUDITOR_DIR --out models/demo-real-auditor
    python -m training.cli export-step --bundle models/demo --generator RUN_DIR_OR_CHECKPOINT --classifier CLASSIFIER_DIR

``export --auditor`` adds the independent auditor to the bundle as ``auditor.onnx`` with its own
thresholds, so the service can verify LCO's images (service/verify.py); LCO never steers by it.
There is no command that adds an auditor to an existing bundle: a bundle's version names what it
returns, and an auditor turns ``verify`` on by default, so a bundle with one is a new export (new
version) from the same runs. ``export --steering`` makes LCO steer by a cheaper network (a student
of the ``--classifier`` ensemble) and accept only what ``--classifier`` agrees with (service/lco.py).
``export-auditor`` writes the auditor alone for ONNX Runtime
(training/export/auditor.py), with held-out real images, for ``make demo-real``. ``export-step`` gives
an existing bundle this revision's ``lco_step.onnx`` for the networks it came from, only when the new
graph returns exactly what the old one did (``export_step_again``): a faster export, the same version.

Provenance comes from the runs, not the command line: the classifier's held-out AUROC from the trained
classifier, the generator's Fréchet distance from the GAN run's metric record
(`<run>/metric-frechet_distance.jsonl`, the latest evaluation of the exported checkpoint; none when
that checkpoint was never measured), with the protocol it was measured under.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.acceptance import DEFAULT_ACCEPTANCE_SAMPLES
from service.bundle import BundleError
from training.classifier.artifact import TrainedClassifier
from training.export.bundle import ExportCheckError, GeneratorInfo, export_bundle, export_step_again
from training.export.model_store import save_to_model_store
from training.metrics import latest_result
from training.metrics.builtin import FRECHET_DISTANCE
from training.runtime import run_dir_of


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write the model bundle (ONNX graphs + manifest) from trained networks")
    parser.add_argument("--generator", type=Path, required=True,
                        help="PGGAN run directory (its latest checkpoint) or checkpoint file; the EMA weights are used")
    parser.add_argument("--classifier", type=Path, required=True,
                        help="trained classifier directory (<run>/classifier) or its run directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--auditor", type=Path,
                        help="trained auditor directory or run directory (another network and seed than --classifier): "
                        "added as auditor.onnx, checking images when a request verifies")
    parser.add_argument("--steering", type=Path,
                        help="trained classifier directory or run directory LCO steers by instead of --classifier "
                        "(a cheaper student of it); --classifier still decides when an image meets its request")
    parser.add_argument("--name", default="cxrsynth", help="bundle name in the manifest and the model store")
    parser.add_argument("--version", help="bundle version (default: UTC time and commit)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    parser.add_argument("--acceptance-samples", type=int, default=DEFAULT_ACCEPTANCE_SAMPLES,
                        help="unconditional samples scored into acceptance.npz, which sets LCO's rejection "
                        "budget per request (0: none; the engine then uses the NIH prior)")
    parser.add_argument("--model-store", action="store_true",
                        help="also save the bundle into the local BentoML model store ($BENTOML_HOME)")
    parser.set_defaults(handler=run_export)

    auditor = subparsers.add_parser("export-auditor", help="write a trained auditor as ONNX + thresholds (no bundle)")
    auditor.add_argument("--classifier", type=Path, required=True,
                         help="trained auditor directory (<run>/classifier) or its run directory")
    auditor.add_argument("--out", type=Path, required=True, help="directory to write")
    auditor.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    auditor.set_defaults(handler=run_export_auditor)

    step = subparsers.add_parser("export-step", help="give a bundle this revision's lco_step.onnx when it returns "
                                 "exactly what the old one did (same networks, same version)")
    step.add_argument("--bundle", type=Path, required=True, help="the bundle directory to update in place")
    step.add_argument("--generator", type=Path, required=True,
                      help="the PGGAN run directory (its latest checkpoint) or checkpoint the bundle came from")
    step.add_argument("--classifier", type=Path, required=True, help="the classifier directory the bundle came from")
    step.set_defaults(handler=run_export_step)


def _checkpoint(generator: Path) -> Path:
    """The checkpoint a --generator argument names (a run directory's latest); ValueError if none."""
    from training.runtime import latest_checkpoint

    if not generator.is_dir():
        return generator
    checkpoint = latest_checkpoint(generator)
    if checkpoint is None:
        raise ValueError(f"{generator} holds no checkpoints")
    return checkpoint


def run_export(args: argparse.Namespace) -> int:
    from training.gan.training_loop import load_generator
    from training.runtime import read_checkpoint

    if args.acceptance_samples < 0:
        return _fail(f"--acceptance-samples must be 0 (no table) or more, got {args.acceptance_samples}")
    try:
        checkpoint = _checkpoint(args.generator)
        generator = load_generator(checkpoint)
        info = generator_info(checkpoint, read_checkpoint(checkpoint).state)
        classifier = TrainedClassifier.load(args.classifier)
        auditor = TrainedClassifier.load(args.auditor) if args.auditor is not None else None
        steering = TrainedClassifier.load(args.steering) if args.steering is not None else None
    except (FileNotFoundError, ValueError, KeyError) as error:
        return _fail(str(error))
    classifier.extra.setdefault("source", str(args.classifier))
    for network, source in ((auditor, args.auditor), (steering, args.steering)):
        if network is not None:
            network.extra.setdefault("source", str(source))
    try:
        bundle = export_bundle(generator, classifier, args.out, generator_info=info, name=args.name,
                               version=args.version, overwrite=args.overwrite, auditor=auditor,
                               steering=steering, acceptance_samples=args.acceptance_samples)
    except (FileExistsError, ExportCheckError, BundleError, TypeError) as error:
        return _fail(str(error))
    print(f"bundle written to {bundle}")
    if args.model_store:
        print(f"saved in the BentoML model store as {save_to_model_store(bundle)}")
    return 0


def run_export_step(args: argparse.Namespace) -> int:
    from training.gan.training_loop import load_generator

    try:
        generator = load_generator(_checkpoint(args.generator))
        classifier = TrainedClassifier.load(args.classifier).network
        export_step_again(args.bundle, generator, classifier)
    except (FileNotFoundError, ValueError, KeyError, ExportCheckError, BundleError) as error:
        return _fail(str(error))
    print(f"{args.bundle}: lco_step.onnx exported again, every output as before; version unchanged")
    return 0


def run_export_auditor(args: argparse.Namespace) -> int:
    from training.export.auditor import export_auditor

    try:
        written = export_auditor(TrainedClassifier.load(args.classifier), args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as error:
        return _fail(str(error))
    print(f"auditor written to {written}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def generator_info(checkpoint: Path, state: dict) -> GeneratorInfo:
    """The manifest's record of the generator in `checkpoint` (whose JSON state is `state`).

    The Fréchet distance is the latest `frechet_distance` result for this checkpoint's images shown in
    its run directory, with its protocol in `extra`; None when there is none. Raises ValueError for a
    metric record that cannot be read.
    """
    images_shown = int(state.get("images_shown", 0))
    run_dir = run_dir_of(checkpoint)
    measured = latest_result(run_dir, FRECHET_DISTANCE, images_shown=images_shown) if run_dir else None
    return GeneratorInfo(
        dataset=_describe_data(state), images_shown=images_shown, source=str(checkpoint),
        frechet_distance=measured["value"] if measured else None,
        extra={"frechet_distance_protocol": measured["protocol"]} if measured else {},
    )


def _describe_data(state: dict) -> str:
    """The generator's training data as the manifest names it: phantoms with their prior, count and seed."""
    data = str(state.get("data", "unknown"))
    phantoms = state.get("config", {}).get("data", {})
    if data == "phantoms" and phantoms:
        return f"phantoms-{phantoms['phantom_prior']}-{phantoms['phantom_count']}-seed{phantoms['phantom_seed']}"
    return data
