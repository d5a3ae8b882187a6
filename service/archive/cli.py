"""Command line for archive jobs.

    python -m service.archive run --bundle BUNDLE --count 100000 --distribution nih --seed 0 \\
        --dest s3://bucket/prefix [--shard-index I --shard-count N] [--format png8|png16|dicom]
        [--pairs Effusion,Nodule [--pairs-proximity 0] [--pairs-image-proximity 10] [--no-difference-maps]]
    python -m service.archive merge --dest s3://bucket/prefix [--wait 3600]
    python -m service.archive status --dest s3://bucket/prefix
    python -m service.archive contact --dest s3://bucket/prefix --out sheet.png

``--shard-index`` defaults to ``$JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job pod's index). A
single-shard run merges at the end unless ``--no-merge``. SIGTERM and Ctrl-C stop at the next batch,
commit what is whole and exit 130; rerunning the same command resumes. Exit 1 on an error, with a
message saying what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.image_formats import IMAGE_FORMATS

EXIT_ERROR = 1
EXIT_CANCELLED = 130


def _distribution(text: str) -> Any:
    """'nih', 'balanced', inline JSON groups, or @file.json holding them."""
    if text in ("nih", "balanced"):
        return text
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as error:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {error.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"--distribution must be nih, balanced, a JSON list of {{labels, count}} groups or @file.json ({error})"
        ) from None


def _lco_option(text: str) -> tuple[str, float | int | None]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--lco takes NAME=VALUE (e.g. steps=50), got {text!r}")
    if value.lower() in ("none", "null", ""):
        return name, None
    try:
        return name, int(value)
    except ValueError:
        try:
            return name, float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lco {name}: {value!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise SystemExit(f"error: ${name}={raw!r} is not a non-negative integer")
    return int(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.archive", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="make (or resume) one shard of an archive")
    run.add_argument("--bundle", default=os.environ.get("CXRSYNTH_BUNDLE"),
                     help="bundle directory or BentoML model tag (default: $CXRSYNTH_BUNDLE)")
    run.add_argument("--count", type=int, help="images in the whole archive (optional with label groups)")
    run.add_argument("--distribution", type=_distribution, default="nih",
                     help="nih | balanced | JSON list of {labels, count, exclusive} | @groups.json")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--dest", required=True, help="s3://bucket/prefix or a local directory")
    run.add_argument("--shard-index", type=int, default=_env_int("JOB_COMPLETION_INDEX", 0),
                     help="this shard (default: $JOB_COMPLETION_INDEX, else 0)")
    run.add_argument("--shard-count", type=int, default=_env_int("CXRSYNTH_SHARD_COUNT", 1),
                     help="shards in the job (default: $CXRSYNTH_SHARD_COUNT, else 1)")
    run.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="png8",
                     help="png8 | png16 | dicom (Secondary Capture, .dcm files; service/dicom.py)")
    run.add_argument("--chunk-size", type=int, default=64, help="images per manifest object")
    run.add_argument("--lco", type=_lco_option, action="append", default=[], metavar="NAME=VALUE",
                     help="LCO option (steps, lr, candidates, truncation, margin, fallback_margin); repeatable")
    run.add_argument("--batch-size", type=int, default=None,
                     help="images handed to the LCO engine at once, a divisor of --chunk-size (default: the largest "
                     "up to 16); the same on every shard, and it does not change the images")
    run.add_argument("--drop-near-copies", type=Path, metavar="INDEX", default=None,
                     help="replace near-copies of the training set, as the near-copy index file INDEX judges "
                          "(python -m training.evaluate.memorisation index)")
    run.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                     help="keep only images the bundle's auditor verifies, dropping those it rejects through every "
                     "retry (default: on when the bundle has an auditor)")
    run.add_argument("--verify-retries", type=int, default=3, help="retries per image the auditor rejects")
    run.add_argument("--pairs", type=lambda text: [name for name in text.split(",") if name.strip()], default=None,
                     metavar="FINDING,...", help="counterfactual pairs: each image is a reference without these findings, "
                     "and one edit per finding adds it (Pairs.csv; service/archive/pairs.py)")
    run.add_argument("--pairs-proximity", type=float, default=None,
                     help="with --pairs: the edits' pull towards the reference's latent (as POST /edit's proximity)")
    run.add_argument("--pairs-image-proximity", type=float, default=None,
                     help="with --pairs: the edits' pull towards the reference's pixels (as POST /edit's "
                     "image_proximity)")
    run.add_argument("--no-difference-maps", action="store_true", help="with --pairs: write no difference maps")
    run.add_argument("--upload-workers", type=int, default=4, help="0 uploads inline (no overlap)")
    run.add_argument("--max-pending", type=int, default=64, help="generated images waiting for upload, at most")
    run.add_argument("--verify-existing", action="store_true", help="re-hash committed images before skipping")
    run.add_argument("--no-merge", action="store_true", help="do not merge after a single-shard run")
    run.add_argument("--no-progress", action="store_true")

    merge = commands.add_parser("merge", help="check all shards, write Data_Entry.csv and the commit marker")
    merge.add_argument("--dest", required=True)
    merge.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait up to this long for unfinished shards")
    merge.add_argument("--poll", type=float, default=30.0, metavar="SECONDS")
    merge.add_argument("--verify-images", action="store_true", help="download and re-hash every image")
    merge.add_argument("--no-progress", action="store_true")

    status = commands.add_parser("status", help="chunks done per shard, and whether the archive is committed")
    status.add_argument("--dest", required=True)

    contact = commands.add_parser("contact", help="a captioned contact sheet: the first images of each label set")
    contact.add_argument("--dest", required=True)
    contact.add_argument("--out", type=Path, required=True, help="PNG file to write")
    contact.add_argument("--per-row", type=int, default=8)
    contact.add_argument("--rows", type=int, default=16)
    return parser


def _cancel_on_signals(cancel: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).warning("%s: stopping after the current batch", signal.Signals(signum).name)
        cancel.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _run(args: argparse.Namespace) -> int:
    from service.archive.merge import merge_archive
    from service.archive.runner import RunOptions, run_shard
    from service.archive.spec import ArchiveSpec
    from service.sinks import sink_from_uri

    if not args.bundle:
        raise ValueError("no bundle: pass --bundle DIR_OR_TAG or set CXRSYNTH_BUNDLE")
    weights = {name: value for name, value in (("proximity", args.pairs_proximity),
                                               ("image_proximity", args.pairs_image_proximity)) if value is not None}
    if args.pairs is None and (weights or args.no_difference_maps):
        raise ValueError("--pairs-proximity, --pairs-image-proximity and --no-difference-maps go with --pairs FINDING,...")
    pairs = None if args.pairs is None else {
        "findings": args.pairs, "difference_maps": not args.no_difference_maps, **weights}
    spec = ArchiveSpec(
        count=args.count,
        distribution=args.distribution,
        seed=args.seed,
        destination=args.dest,
        shard_index=args.shard_index,
        shard_count=args.shard_count,
        image_format=args.image_format,
        lco=dict(args.lco),
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        drop_near_copies=args.drop_near_copies is not None,
        verify=args.verify,
        verify_retries=args.verify_retries,
        pairs=pairs,
    )
    options = RunOptions(
        upload_workers=args.upload_workers,
        max_pending_images=args.max_pending,
        verify_existing=args.verify_existing,
        progress=not args.no_progress,
    )
    engine, model = load_engine(args.bundle, max_batch=spec.batch_size)
    sink = sink_from_uri(spec.destination)
    cancel = threading.Event()
    _cancel_on_signals(cancel)
    near_copies = None
    if args.drop_near_copies is not None:
        from service.nearcopy import NearCopyFilter

        near_copies = NearCopyFilter.open(engine.bundle, args.drop_near_copies)
    report = run_shard(spec, engine, model, sink=sink, options=options, cancel=cancel, near_copies=near_copies)
    result: dict[str, Any] = {"shard": report.as_dict()}
    if spec.shard_count == 1 and not args.no_merge:
        marker = merge_archive(sink, progress=options.progress)
        result["archive"] = {k: marker[k] for k in ("images", "satisfied", "near_copies_dropped", "verification",
                                                    "pairs", "label_counts") if k in marker}
    print(json.dumps(result, indent=2))
    return 0


def load_engine(bundle_source: str, max_batch: int = 16):
    """(LCOEngine, ModelInfo) for a bundle directory or BentoML model tag."""
    from service.archive.runner import ModelInfo
    from service.bundle import load_bundle
    from service.lco import LCOEngine

    bundle = load_bundle(bundle_source)
    engine = LCOEngine(bundle, max_batch=max_batch)
    return engine, ModelInfo.from_engine(engine)


def main(argv: list[str] | None = None) -> int:
    from service.archive.manifest import ArchiveError
    from service.archive.runner import ArchiveCancelled
    from service.sinks import SinkError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        from service.archive.merge import archive_status, merge_archive
        from service.sinks import sink_from_uri

        sink = sink_from_uri(args.dest)
        if args.command == "contact":
            from service.archive.contact import write_contact_sheet

            print(write_contact_sheet(sink, args.out, per_row=args.per_row, rows=args.rows))
        elif args.command == "merge":
            marker = merge_archive(sink, verify_images=args.verify_images, wait_seconds=args.wait,
                                   poll_seconds=args.poll, progress=not args.no_progress)
            print(json.dumps({k: marker[k] for k in ("images", "satisfied", "image_bytes", "label_counts")}, indent=2))
        else:
            print(json.dumps(asdict(archive_status(sink)), indent=2))
        return 0
    except ArchiveCancelled as error:
        print(f"cancelled: {error}", file=sys.stderr)
        return EXIT_CANCELLED
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors())
        print(f"error: invalid archive spec: {problems}", file=sys.stderr)
        return EXIT_ERROR
    except (ArchiveError, SinkError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as error:  # BundleError and ONNX Runtime failures
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
