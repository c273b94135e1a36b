"""The `rankwise` command line: one module per subcommand, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# OpenMP's wait policy is left to the user. PASSIVE (threads sleep between operations) is the
# polite choice on a machine shared with other jobs, but on a quiet one it costs every
# operation a wake-up: measured on SmolLM2-135M, healing ran ~15 % fewer steps in the same time
# and a 20 %-compressed model decoded at 1.09x dense instead of 0.92x (docs/pipeline.md).

# Exit codes (docs/reliability.md): 0 done; 1 an error in the input or the environment, printed
# as one line naming the problem and the fix; 2 a command-line usage error (argparse);
# 70 an internal error (a bug: RANKWISE_DEBUG=1 shows its traceback); 130 interrupted (Ctrl-C).
EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 70, 130
DEBUG_ENV = "RANKWISE_DEBUG"

# Subcommand modules, in the order `rankwise --help` lists them.
_SUBCOMMANDS: tuple[str, ...] = (
    "eval", "inspect", "compress", "pretrain", "finetune", "shrink", "export", "list"
)


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
    except KeyboardInterrupt:
        print(f"rankwise {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (or a traceback under DEBUG_ENV)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        code, text = describe_error(exc)
        print(f"rankwise {args.command}: error: {text}", file=sys.stderr)
        return code


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception reaching the command line.

    rankwise's own errors (ValueError, TypeError from validation, FileNotFoundError, KeyError,
    ImportError for a missing extra) already name the problem and the fix; OSError and
    MemoryError get the fix added; anything else is reported as a bug.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = " ".join(str(exc.args[0]).split()) if exc.args else text
    if isinstance(exc, FileNotFoundError | ValueError | TypeError | KeyError | ImportError | NotImplementedError):
        return EXIT_ERROR, text
    if isinstance(exc, PermissionError):
        return EXIT_ERROR, f"{text}: permission denied; choose a path you can write, or fix its permissions"
    if isinstance(exc, OSError):
        return EXIT_ERROR, f"{text} (an operating-system error: check the path, free disk space and permissions)"
    if isinstance(exc, MemoryError):
        return EXIT_ERROR, "out of memory: use a smaller model, batch size or sequence length"
    if isinstance(exc, RuntimeError):
        if "out of memory" in text.lower():
            return EXIT_ERROR, f"{text}: use a smaller batch size or sequence length"
        return EXIT_ERROR, f"{text} (rerun with {DEBUG_ENV}=1 for the traceback)"
    return EXIT_BUG, (f"internal error ({type(exc).__name__}: {text}); this is a bug in rankwise: rerun with "
                      f"{DEBUG_ENV}=1 for the traceback and report it")


def _version() -> str:
    from rankwise import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
