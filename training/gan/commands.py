"""CLI commands for the PGGAN: train, resume, sample (registered by training.cli).

python -m training.cli train --config demo --data phantoms [--run-dir DIR] [--set key=value ...]
python -m training.cli resume RUN_DIR_OR_CHECKPOINT [--set train.tick_images=5000]
python -m training.cli sample CHECKPOINT --grid out.png [--count N --out DIR] [--seed S]

`train` and `resume` check the configuration, --data and WORLD_SIZE before reading data or joining a
process group: every problem is reported by its key, and the command exits with status 2. With
`--dry-run` they print the resolved configuration as JSON (what the run directory's config.json will
hold) and exit 0 without creating anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from training.gan.config import ConfigError, GanConfig, build_config, read_preset
from training.gan.data import build_dataset, data_problems
from training.gan.training_loop import PGGANTrainer, load_generator, run_config
from training.runtime import (
    NonFiniteError,
    init_distributed,
    latest_checkpoint,
    read_checkpoint,
    run_dir_of,
    save_image_grid,
    shutdown_distributed,
    world_size_from_env,
)
from training.runtime.loop import shared_run_dir
from training.runtime.validation import format_problems


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a PGGAN from a preset")
    train.add_argument(
        "--config", default="demo", help="preset (ci, demo, nih-256, paper-1024) or a TOML file"
    )
    train.add_argument("--data", default="phantoms", help="phantoms | nih:PATH | folder:PATH | dicom:PATH")
    train.add_argument(
        "--run-dir", type=Path, help="directory for this run (default: a new numbered one under --runs)"
    )
    train.add_argument("--runs", type=Path, default=Path("runs"), help="parent of numbered run directories")
    _add_common(train)
    train.set_defaults(handler=run_train)

    resume = subparsers.add_parser("resume", help="continue a run from its latest (or a given) checkpoint")
    resume.add_argument("target", type=Path, help="run directory or checkpoint file")
    resume.add_argument("--data", help="override the data the run was started with (e.g. a moved folder)")
    _add_common(resume)
    resume.set_defaults(handler=run_resume)

    sample = subparsers.add_parser("sample", help="images from a checkpoint's EMA generator")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("--grid", type=Path, help="write a PNG grid here")
    sample.add_argument("--count", type=int, default=16, help="number of images")
    sample.add_argument("--out", type=Path, help="write COUNT single PNGs into this directory")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth for --out")
    sample.add_argument("--raw", action="store_true", help="use the raw generator instead of the EMA one")
    sample.set_defaults(handler=run_sample)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. schedule.batch_size.64=32 (repeatable)",
    )
    parser.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this many images in all")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    parser.add_argument(
        "--dry-run", action="store_true", help="check and print the resolved configuration as JSON, then exit"
    )


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train(
    config: GanConfig,
    data_spec: str,
    run_dir: Path | None,
    runs_root: Path | None,
    resume_from: Path | None,
    args: argparse.Namespace,
) -> int:
    context = init_distributed(config.train.device)
    if context.device.type == "cpu" and config.train.cpu_threads > 0:
        torch.set_num_threads(config.train.cpu_threads)
    try:
        torch.backends.cudnn.benchmark = True
        run_dir = shared_run_dir(run_dir, runs_root, f"{config.name}-{data_spec.split(':')[0]}", context)
        dataset = build_dataset(data_spec, config, progress=context.is_main and not args.no_progress)
        trainer = PGGANTrainer(
            config, dataset, run_dir, context, data_spec=data_spec, progress=not args.no_progress
        )
        if resume_from is not None:
            trainer.resume(resume_from)
        try:
            result = trainer.train(stop_at_images=args.stop_at)
        except NonFiniteError as error:
            return _fail(str(error))
        if context.is_main:
            state = (
                "finished" if result.finished else ("interrupted" if result.stopped_by_signal else "paused")
            )
            print(
                f"{state} at {result.images_shown:,} images; run directory {run_dir}; "
                f"checkpoint {result.checkpoint}"
            )
        return 130 if result.stopped_by_signal else 0
    finally:
        shutdown_distributed()


def _checked(
    base: Mapping[str, Any], args: argparse.Namespace, data_spec: str, resume: bool
) -> tuple[GanConfig | None, list[str]]:
    """The run's configuration and every problem that would stop it, found before any work is done.

    The world size comes from torchrun's WORLD_SIZE, so a batch the ranks cannot share or the
    minibatch-stddev layer cannot group is refused here, not at the first step that uses it.
    """
    found: list[str] = []
    try:
        world_size: int | None = world_size_from_env()
    except ConfigError as error:
        world_size, found = None, error.problems
    config = None
    try:
        config = build_config(base, args.overrides, world_size, resume=resume)
    except ConfigError as error:
        found += error.problems
    found += data_problems(data_spec, config)
    if args.stop_at is not None and args.stop_at < 1:
        found.append(f"--stop-at={args.stop_at} must be at least 1 (images shown in all)")
    return config, found


def run_train(args: argparse.Namespace) -> int:
    try:
        base = read_preset(args.config)
    except ConfigError as error:
        return _fail(str(error))
    config, found = _checked(base, args, args.data, resume=False)
    if found:
        return _fail(format_problems(found))
    if args.run_dir is not None and args.run_dir.exists() and any(args.run_dir.glob("checkpoints/*.pt")):
        return _fail(f"{args.run_dir} already holds checkpoints; continue it with `resume {args.run_dir}`")
    if args.dry_run:
        return _print_config(config, args.data)
    return _train(config, args.data, args.run_dir, args.runs, None, args)


def run_resume(args: argparse.Namespace) -> int:
    target: Path = args.target
    checkpoint = target if target.is_file() else latest_checkpoint(target)
    if checkpoint is None:
        return _fail(f"no checkpoint in {target}/checkpoints; start the run with `train`")
    run_dir = run_dir_of(checkpoint) or target
    state = read_checkpoint(checkpoint).state
    if state.get("kind") != "pggan":
        return _fail(f"{checkpoint} is not a PGGAN checkpoint")
    data_spec = args.data or state["data"]
    config, found = _checked(state["config"], args, data_spec, resume=True)
    if found:
        return _fail(format_problems(found))
    if args.dry_run:
        return _print_config(config, data_spec)
    return _train(config, data_spec, run_dir, None, checkpoint, args)


def _print_config(config: GanConfig, data_spec: str) -> int:
    """--dry-run: the document `PGGANTrainer.train` writes to config.json, on stdout."""
    print(json.dumps(run_config(config, data_spec), indent=2, sort_keys=True))
    return 0


@torch.no_grad()
def run_sample(args: argparse.Namespace) -> int:
    if args.grid is None and args.out is None:
        return _fail("give --grid FILE.png, --out DIR, or both")
    if args.count < 1:
        return _fail("--count must be positive")
    try:
        generator = load_generator(args.checkpoint, ema=not args.raw)
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    z = torch.randn(args.count, generator.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    images = torch.cat([generator(chunk).clamp(-1, 1) for chunk in z.split(64)])
    if args.grid is not None:
        save_image_grid(images, args.grid)
        print(f"wrote {args.grid}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        scale = 255 if args.bits == 8 else 65535
        dtype = np.uint8 if args.bits == 8 else np.uint16
        for index, image in enumerate(images):
            pixels = ((image[0].numpy() + 1) / 2 * scale + 0.5).astype(dtype)
            path = args.out / f"sample-{args.seed:06d}-{index:06d}.png"
            tmp = path.with_name(f".{path.name}.tmp.png")
            Image.fromarray(pixels).save(tmp)
            tmp.replace(path)
        print(f"wrote {args.count} images to {args.out}")
    return 0
