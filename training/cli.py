"""`python -m training.cli <command>`: one entry point, commands contributed by modules.

Each module listed in COMMAND_MODULES defines

    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("name", help="...")
        parser.add_argument(...)
        parser.set_defaults(handler=function_taking_the_parsed_namespace_and_returning_an_exit_code)

To add a command, write such a module and append its dotted name below. Commands run under torchrun
unchanged: `torchrun --nproc_per_node=2 -m training.cli train ...`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: list[str] = [
    "training.gan.commands",  # train, resume, sample
    "training.classifier.commands",  # classifier train / evaluate
    "training.export.commands",  # export a model bundle
    "training.data.commands",  # convert a DICOM tree into the NIH layout
    "training.evaluate.commands",  # evaluate report / stats / compare / real-vs-real
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
