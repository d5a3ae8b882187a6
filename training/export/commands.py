"""CLI command ``export`` (registered by training.cli):

    python -m training.cli export --generator RUN_DIR_OR_CHECKPOINT --classifier CLASSIFIER_DIR \
        --out bundles/demo [--name cxrsynth-demo] [--version V] [--model-store] [--frechet-distance F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.bundle import BundleError
from training.classifier.artifact import TrainedClassifier
from training.export.bundle import ExportCheckError, GeneratorInfo, export_bundle
from training.export.model_store import save_to_model_store


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write the model bundle (ONNX graphs + manifest) from trained networks")
    parser.add_argument("--generator", type=Path, required=True,
                        help="PGGAN run directory (its latest checkpoint) or checkpoint file; the EMA weights are used")
    parser.add_argument("--classifier", type=Path, required=True,
                        help="trained classifier directory (<run>/classifier) or its run directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--name", default="cxrsynth", help="bundle name in the manifest and the model store")
    parser.add_argument("--version", help="bundle version (default: UTC time and commit)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    parser.add_argument("--model-store", action="store_true",
                        help="also save the bundle into the local BentoML model store ($BENTOML_HOME)")
    parser.add_argument("--frechet-distance", type=float, help="the generator's Fréchet distance, for provenance")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from training.gan.training_loop import load_generator
    from training.runtime import latest_checkpoint, read_checkpoint

    checkpoint = args.generator
    if checkpoint.is_dir():
        checkpoint = latest_checkpoint(checkpoint)
        if checkpoint is None:
            return _fail(f"{args.generator} holds no checkpoints")
    try:
        generator = load_generator(checkpoint)
        state = read_checkpoint(checkpoint).state
        classifier = TrainedClassifier.load(args.classifier)
    except (FileNotFoundError, ValueError, KeyError) as error:
        return _fail(str(error))
    classifier.extra.setdefault("source", str(args.classifier))
    info = GeneratorInfo(dataset=_describe_data(state), images_shown=int(state.get("images_shown", 0)),
                         source=str(checkpoint), frechet_distance=args.frechet_distance)
    try:
        bundle = export_bundle(generator, classifier, args.out, generator_info=info, name=args.name,
                               version=args.version, overwrite=args.overwrite)
    except (FileExistsError, ExportCheckError, BundleError, TypeError) as error:
        return _fail(str(error))
    print(f"bundle written to {bundle}")
    if args.model_store:
        print(f"saved in the BentoML model store as {save_to_model_store(bundle)}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _describe_data(state: dict) -> str:
    """The generator's training data as the manifest names it: phantoms with their prior, count and seed."""
    data = str(state.get("data", "unknown"))
    phantoms = state.get("config", {}).get("data", {})
    if data == "phantoms" and phantoms:
        return f"phantoms-{phantoms['phantom_prior']}-{phantoms['phantom_count']}-seed{phantoms['phantom_seed']}"
    return data
