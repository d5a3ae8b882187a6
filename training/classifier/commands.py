"""CLI command ``classifier`` (registered by training.cli):

    python -m training.cli classifier train --preset demo [--run-dir DIR] [--set lr=1e-3 ...]
    python -m training.cli classifier train --preset chexnet --set data.root=/data/nih
    python -m training.cli classifier train --preset my-preset.toml --dry-run
    python -m training.cli classifier resume RUN_DIR
    python -m training.cli classifier ensemble RUN_A RUN_B RUN_C --run-dir DIR [--preset demo]
    python -m training.cli classifier distill TEACHER --generator GAN_RUN --preset demo-distilled --run-dir DIR
    python -m training.cli classifier evaluate CLASSIFIER_DIR [--preset auditor] [--bootstrap 1000]

``--preset`` takes a preset of training/configs/classifier/ or a TOML file (training/runtime/presets.py
has the grammar of both and of ``--set``). ``train`` and ``resume`` check the configuration against
WORLD_SIZE before reading data: every value that cannot train is reported by its key, and the command
exits with status 2. With ``--dry-run`` they print the resolved configuration as JSON (what the run
directory's config.json will hold) and exit 0 without creating anything.

Under torchrun the same commands train data-parallel: ``torchrun --nproc_per_node=2 -m training.cli
classifier train --preset demo``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.classifier.config import ClassifierTrainConfig, get_preset, preset_names, validate
from training.runtime import ConfigError, NonFiniteError, shutdown_distributed, world_size_from_env

_PRESET_HELP = f"a preset ({', '.join(preset_names())}) or a TOML file"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("classifier", help="train or evaluate a pathology classifier (or the auditor)")
    commands = parser.add_subparsers(dest="classifier_command", metavar="ACTION", required=True)

    train = commands.add_parser("train", help="train a classifier from a preset")
    train.add_argument("--preset", default="demo", help=_PRESET_HELP)
    train.add_argument("--run-dir", type=Path, help="directory for this run (default: a new one under --runs)")
    train.add_argument("--runs", type=Path, default=Path("runs"), help="parent of numbered run directories")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. total_images=20000 or data.root=/data/nih (repeatable)")
    train.add_argument("--no-progress", action="store_true")
    _add_dry_run(train)
    train.set_defaults(handler=run_train)

    resume = commands.add_parser("resume", help="continue a classifier run from its latest checkpoint")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument("--no-progress", action="store_true")
    _add_dry_run(resume)
    resume.set_defaults(handler=run_resume)

    ensemble = commands.add_parser("ensemble", help="combine trained classifiers into one (LCO steers by all of them)")
    ensemble.add_argument("members", type=Path, nargs="+", help="trained classifier directories (or their runs)")
    ensemble.add_argument("--run-dir", type=Path, required=True, help="directory to write <run>/classifier to")
    ensemble.add_argument("--preset", default="demo",
                          help=f"{_PRESET_HELP}, whose test split measures the ensemble's AUROC")
    ensemble.add_argument("--shift", dest="shifts", type=_shift, action="append", default=None, metavar="ROWS,COLS",
                          help="an extra view of each image, circularly shifted (repeatable; default 2,1 and -1,-2)")
    ensemble.add_argument("--vote-clip", type=float, default=None, metavar="LOGITS",
                          help="soft-clip each member's vote to ±LOGITS (default 2; 0 averages unclipped votes)")
    ensemble.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a value of the evaluation preset, e.g. bootstrap=200")
    ensemble.set_defaults(handler=run_ensemble)

    distill = commands.add_parser(
        "distill", help="distil a teacher (the LCO ensemble) into one CNN on the generator's images, hardened by "
        "LCO's own hard negatives (training/classifier/distill.py)")
    distill.add_argument("teacher", type=Path, help="trained classifier directory (or its run) to imitate")
    distill.add_argument("--generator", type=Path, required=True, help="PGGAN run directory or checkpoint")
    distill.add_argument("--preset", default="demo-distilled", help=f"{_PRESET_HELP} with a [distill] section")
    distill.add_argument("--init", type=Path, default=None,
                         help="trained classifier (same [model]) to start from, e.g. one of the teacher's members")
    distill.add_argument("--run-dir", type=Path, required=True, help="directory to write <run>/classifier to")
    distill.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a value of the preset, e.g. distill.rounds=2")
    distill.add_argument("--no-progress", action="store_true")
    distill.set_defaults(handler=run_distill)

    evaluate = commands.add_parser("evaluate", help="per-label AUROC (bootstrap CIs) of a trained classifier")
    evaluate.add_argument("classifier", type=Path, help="trained classifier directory")
    evaluate.add_argument("--preset", default=None, help="data of this preset's held-out split (default: its own)")
    evaluate.add_argument("--bootstrap", type=int, default=1000)
    evaluate.set_defaults(handler=run_evaluate)


def _add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="check and print the resolved configuration as JSON, then exit without training")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train(config: ClassifierTrainConfig | None, args: argparse.Namespace, runs: Path, resume: bool) -> int:
    from training.classifier.trainer import train_classifier

    try:
        result = train_classifier(config, args.run_dir, runs_root=runs, resume=resume,
                                  progress=not args.no_progress)
    except (ConfigError, NonFiniteError, FileNotFoundError) as error:
        return _fail(str(error))
    finally:
        shutdown_distributed()
    if result is not None:
        print(f"mean AUROC {result.mean_auroc:.4f} on the held-out split")
    return 0


def _dry_run(config: ClassifierTrainConfig) -> int:
    """Check `config` as a run would, print it, create nothing."""
    try:
        validate(config, world_size_from_env())
    except ConfigError as error:
        return _fail(str(error))
    print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    return 0


def run_train(args: argparse.Namespace) -> int:
    try:
        config = get_preset(args.preset).override(args.overrides)
    except ConfigError as error:
        return _fail(str(error))
    if args.dry_run:
        return _dry_run(config)
    return _train(config, args, args.runs, resume=False)


def run_resume(args: argparse.Namespace) -> int:
    if args.dry_run:
        from training.classifier.trainer import resumed_config

        try:
            return _dry_run(resumed_config(args.run_dir))
        except (ConfigError, FileNotFoundError) as error:
            return _fail(str(error))
    return _train(None, args, Path("runs"), resume=True)


def _shift(text: str) -> tuple[int, int]:
    try:
        rows, columns = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shift takes ROWS,COLS (e.g. 2,-1), got {text!r}") from None
    return rows, columns


def run_ensemble(args: argparse.Namespace) -> int:
    from training.classifier.artifact import TrainedClassifier
    from training.classifier.ensemble import DEFAULT_SHIFTS, DEFAULT_VOTE_CLIP, build_ensemble

    try:
        config = get_preset(args.preset).override(args.overrides)
        members = [TrainedClassifier.load(path) for path in args.members]
        for member, path in zip(members, args.members):
            member.extra.setdefault("source", str(path))
        result = build_ensemble(members, config, args.run_dir,
                                shifts=DEFAULT_SHIFTS if args.shifts is None else tuple(args.shifts),
                                vote_clip=DEFAULT_VOTE_CLIP if args.vote_clip is None else args.vote_clip)
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    member_aurocs = ", ".join(f"{m.mean_auroc:.4f}" for m in members if m.mean_auroc is not None)
    print(f"mean AUROC {result.mean_auroc:.4f} on the held-out split (members: {member_aurocs}); "
          f"saved {args.run_dir / 'classifier'}")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from training.classifier.artifact import TrainedClassifier
    from training.classifier.distill import distill
    from training.gan.training_loop import load_generator
    from training.runtime import latest_checkpoint

    try:
        config = get_preset(args.preset).override(args.overrides)
        teacher = TrainedClassifier.load(args.teacher)
        teacher.extra.setdefault("source", str(args.teacher))
        checkpoint = latest_checkpoint(args.generator) if args.generator.is_dir() else args.generator
        if checkpoint is None:
            return _fail(f"{args.generator} holds no checkpoints")
        generator = load_generator(checkpoint)
        init = TrainedClassifier.load(args.init) if args.init else None
        result = distill(config, teacher, generator, args.run_dir, init=init, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    print(f"mean AUROC {result.mean_auroc:.4f} on the held-out split (teacher: {teacher.mean_auroc:.4f}); "
          f"saved {args.run_dir / 'classifier'}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from training.classifier.artifact import TrainedClassifier
    from training.classifier.trainer import build_splits, predict
    from training.metrics import compute_metric
    from training.metrics.builtin import CLASSIFIER_AUROC, label_aurocs

    classifier = TrainedClassifier.load(args.classifier)
    config = get_preset(args.preset or classifier.preset or "demo")
    splits = build_splits(config)
    probs, labels, mask = predict(classifier.network, splits.test, torch.device("cpu"))
    result = compute_metric(CLASSIFIER_AUROC, probabilities=probs, labels=labels, mask=mask,
                            bootstrap=args.bootstrap, dataset=splits.description)
    for label, metric in label_aurocs(result).items():
        if metric.auroc is None:
            print(f"{label:20s}  n/a ({metric.positives} positives)")
        else:
            print(f"{label:20s}  {metric.auroc:.4f}  [{metric.ci_low:.4f}, {metric.ci_high:.4f}]  "
                  f"({metric.positives} positives)")
    print(f"{'mean':20s}  {result.value:.4f}  on {splits.description}")
    return 0
