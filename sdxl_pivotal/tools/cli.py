"""The command line: one subparser per subcommand module; bad input is reported in one line, without a traceback."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from . import convert, extract, extract_dylora, inspect, merge, resize, svd_merge

SUBCOMMANDS = {
    "convert": convert,
    "merge": merge,
    "resize": resize,
    "svd-merge": svd_merge,
    "extract": extract,
    "extract-dylora": extract_dylora,
    "inspect": inspect,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_pivotal.tools",
        description="Convert, merge, resize, SVD-merge, extract, cut DyLoRAs and inspect SDXL LoRA files.",
    )
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, module in SUBCOMMANDS.items():
        description = module.__doc__.strip()
        subparser = subparsers.add_parser(
            name,
            help=description.splitlines()[0],
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 2 (with one line on stderr) on bad input."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0
