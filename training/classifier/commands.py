"""CLI command ``classifier`` (registered by training.cli):

    python -m training.cli classifier train --preset demo [--run-dir DIR] [--set lr=1e-3 ...]
    python -m training.cli classifier train --preset chexnet --set data.root=/data/nih
    python -m training.cli classifier resume RUN_DIR
    python -m training.cli classifier evaluate CLASSIFIER_DIR [--preset auditor] [--bootstrap 1000]

Under torchrun the same commands train data-parallel: ``torchrun --nproc_per_node=2 -m training.cli
classifier train --preset demo``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.classifier.config import PRESETS, get_preset
from training.runtime import NonFiniteError, shutdown_distributed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("classifier", help="train or evaluate a pathology classifier (or the auditor)")
    commands = parser.add_subparsers(dest="classifier_command", metavar="ACTION", required=True)

    train = commands.add_parser("train", help="train a classifier from a preset")
    train.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    train.add_argument("--run-dir", type=Path, help="directory for this run (default: a new one under --runs)")
    train.add_argument("--runs", type=Path, default=Path("runs"), help="parent of numbered run directories")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. total_images=20000 or data.root=/data/nih (repeatable)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=run_train)

    resume = commands.add_parser("resume", help="continue a classifier run from its latest checkpoint")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument("--no-progress", action="store_true")
    resume.set_defaults(handler=run_resume)

    evaluate = commands.add_parser("evaluate", help="per-label AUROC (bootstrap CIs) of a trained classifier")
    evaluate.add_argument("classifier", type=Path, help="trained classifier directory")
    evaluate.add_argument("--preset", default=None, help="data of this preset's held-out split (default: its own)")
    evaluate.add_argument("--bootstrap", type=int, default=1000)
    evaluate.set_defaults(handler=run_evaluate)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train(config, run_dir: Path | None, runs: Path, resume: bool, progress: bool) -> int:
    from training.classifier.trainer import train_classifier

    try:
        result = train_classifier(config, run_dir, runs_root=runs, resume=resume, progress=progress)
    except NonFiniteError as error:
        return _fail(str(error))
    finally:
        shutdown_distributed()
    if result is not None:
        print(f"mean AUROC {result.mean_auroc:.4f} on the held-out split")
    return 0


def run_train(args: argparse.Namespace) -> int:
    try:
        config = get_preset(args.preset).override(args.overrides)
    except ValueError as error:
        return _fail(str(error))
    return _train(config, args.run_dir, args.runs, False, not args.no_progress)


def run_resume(args: argparse.Namespace) -> int:
    return _train(None, args.run_dir, Path("runs"), True, not args.no_progress)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from training.classifier.artifact import TrainedClassifier
    from training.classifier.metrics import mean_auroc, per_label_auroc
    from training.classifier.trainer import build_splits, predict

    classifier = TrainedClassifier.load(args.classifier)
    config = get_preset(args.preset or classifier.preset or "demo")
    splits = build_splits(config)
    probs, labels, mask = predict(classifier.network, splits.test, torch.device("cpu"))
    metrics = per_label_auroc(probs, labels, mask, bootstrap=args.bootstrap)
    for label, metric in metrics.items():
        if metric.auroc is None:
            print(f"{label:20s}  n/a ({metric.positives} positives)")
        else:
            print(f"{label:20s}  {metric.auroc:.4f}  [{metric.ci_low:.4f}, {metric.ci_high:.4f}]  "
                  f"({metric.positives} positives)")
    print(f"{'mean':20s}  {mean_auroc(metrics):.4f}  on {splits.description}")
    return 0
