"""Command line: write a phantom data set in the NIH layout, or a contact sheet.

python -m training.phantoms write --out DIR --count N --size S --seed K [--prior nih|balanced] [--bit-depth 8|16]
python -m training.phantoms sheet --out FILE.png [--size 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

from service.prior import PRIOR_NAMES
from training.phantoms.dataset import write_dataset
from training.phantoms.render import MAX_SIZE, MIN_SIZE, check_size
from training.phantoms.sheet import write_contact_sheet


def _size(text: str) -> int:
    try:
        return check_size(int(text))
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.phantoms", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    write = commands.add_parser("write", help="write a labelled phantom data set (NIH ChestX-ray14 layout)")
    write.add_argument("--out", required=True, help="output directory (images/ and the Data_Entry CSV)")
    write.add_argument("--count", required=True, type=_positive, help="number of images")
    write.add_argument(
        "--size", required=True, type=_size, help=f"image side, a power of two {MIN_SIZE}..{MAX_SIZE}"
    )
    write.add_argument("--seed", type=_non_negative, default=0, help="data set seed (default 0)")
    write.add_argument("--prior", choices=PRIOR_NAMES, default="nih", help="label prior (default nih)")
    write.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bits per pixel")
    write.add_argument("--workers", type=_positive, default=None, help="processes (default: all cores)")

    sheet = commands.add_parser("sheet", help="write a PNG contact sheet: one phantom per finding")
    sheet.add_argument("--out", required=True, help="output PNG")
    sheet.add_argument("--size", type=_size, default=256, help="tile side (default 256)")
    sheet.add_argument("--seed", type=_non_negative, default=0, help="chest seed (default 0)")

    args = parser.parse_args(argv)
    if args.command == "write":
        csv_path = write_dataset(
            args.out, args.count, args.size, args.seed, args.prior, args.bit_depth, args.workers
        )
        print(f"wrote {args.count} phantoms and {csv_path}")
    else:
        print(f"wrote {write_contact_sheet(args.out, args.size, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
