"""CLI commands for the PGGAN: train, resume, sample (registered by training.cli).

python -m training.cli train --config demo --data phantoms [--run-dir DIR] [--set key=value ...]
python -m training.cli resume RUN_DIR_OR_CHECKPOINT [--set train.tick_images=5000]
python -m training.cli sample CHECKPOINT --grid out.png [--count N --out DIR] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.gan.config import ConfigError, GanConfig, apply_overrides, load_config
from training.gan.data import build_dataset
from training.gan.training_loop import PGGANTrainer, load_generator
from training.runtime import (
    NonFiniteError,
    create_run_dir,
    init_distributed,
    latest_checkpoint,
    read_checkpoint,
    save_image_grid,
    shutdown_distributed,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a PGGAN from a preset")
    train.add_argument(
        "--config", default="demo", help="preset (ci, demo, nih-256, paper-1024) or a TOML file"
    )
    train.add_argument("--data", default="phantoms", help="phantoms | nih:PATH | folder:PATH")
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
        if run_dir is None:
            created = (
                [str(create_run_dir(runs_root, f"{config.name}-{data_spec.split(':')[0]}"))]
                if context.is_main
                else [""]
            )
            if context.is_distributed:
                torch.distributed.broadcast_object_list(created, src=0)
            run_dir = Path(created[0])
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


def run_train(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        return _fail(str(error))
    if args.run_dir is not None and args.run_dir.exists() and any(args.run_dir.glob("checkpoints/*.pt")):
        return _fail(f"{args.run_dir} already holds checkpoints; continue it with `resume {args.run_dir}`")
    return _train(config, args.data, args.run_dir, args.runs, None, args)


def run_resume(args: argparse.Namespace) -> int:
    target: Path = args.target
    checkpoint = target if target.is_file() else latest_checkpoint(target)
    if checkpoint is None:
        return _fail(f"no checkpoint in {target}/checkpoints; start the run with `train`")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else target
    state = read_checkpoint(checkpoint).state
    if state.get("kind") != "pggan":
        return _fail(f"{checkpoint} is not a PGGAN checkpoint")
    try:
        config = GanConfig.from_dict(apply_overrides(state["config"], args.overrides))
    except ConfigError as error:
        return _fail(str(error))
    return _train(config, args.data or state["data"], run_dir, None, checkpoint, args)


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
