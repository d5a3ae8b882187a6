"""`python -m training.cli <command>`: one entry point, commands contributed by modules.

Each module listed in COMMAND_MODULES, with the top-level commands it adds, defines

    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("name", help="...")
        parser.add_argument(...)
        parser.set_defaults(handler=function_taking_the_parsed_namespace_and_returning_an_exit_code)

To add a command, write such a module and list it below with its commands. Commands run under torchrun
unchanged: `torchrun --nproc_per_node=2 -m training.cli train ...`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: dict[str, tuple[str, ...]] = {  # module -> the top-level commands it registers
    "training.gan.commands": ("train", "resume", "sample"),
    "training.classifier.commands": ("classifier",),  # classifier train / resume / ensemble / distill / evaluate
    "training.export.commands": ("export", "export-auditor", "export-step"),  # a model bundle, an auditor, a step
    "training.data.commands": ("convert",),  # convert a DICOM tree into the NIH layout
    "training.evaluate.commands": ("evaluate",),  # evaluate report / stats / compare / real-vs-real
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; given the ``command`` about to run, only its module is imported (each pulls in
    torch, ONNX or SciPy, seconds apiece), else every module (help, an unknown command)."""
    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    owners = [name for name, commands in COMMAND_MODULES.items() if command in commands] or list(COMMAND_MODULES)
    for name in owners:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
