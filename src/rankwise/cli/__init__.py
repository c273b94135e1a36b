"""The `rankwise` command line: one module per subcommand, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# OpenMP's wait policy is left to the user. PASSIVE (threads sleep between operations) is the
# polite choice on a machine shared with other jobs, but on a quiet one it costs every
# operation a wake-up: measured on SmolLM2-135M, healing ran ~15 % fewer steps in the same time
# and a 20 %-compressed model decoded at 1.09x dense instead of 0.92x (docs/pipeline.md).

# Subcommand modules, in the order `rankwise --help` lists them.
_SUBCOMMANDS: tuple[str, ...] = ("eval", "inspect", "compress", "pretrain", "finetune", "shrink", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankwise",
        description="Low-rank methods for neural networks: adapt, train, compress and inspect.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(f"rankwise.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as exc:
        print(f"rankwise {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _version() -> str:
    from rankwise import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
