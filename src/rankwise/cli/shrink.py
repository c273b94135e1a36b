"""`rankwise shrink MODEL --ratio 0.2 --out DIR`: compress, compensate, heal, export, report.

Runs rankwise.pipeline.shrink with one progress bar over the four stages and prints one summary
table. The result reloads with `rankwise.load_model(DIR)`; DIR/report.md has perplexity,
parameters, latency and the per-layer ranks. A killed run continues with `--resume`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

_DESCRIPTION = __doc__

# Flags whose names differ from their ShrinkConfig field: kept working as hidden aliases.
_ALIASES: dict[str, str] = {"--calib-source": "calibration", "--calib-samples": "n_samples",
                            "--calib-seq-len": "seq_len"}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `shrink` subcommand: one flag per ShrinkConfig field, plus the run's own flags."""
    from rankwise.config import add_arguments
    from rankwise.pipeline.config import ShrinkConfig

    parser = subparsers.add_parser(
        "shrink", help="compress -> compensate -> heal -> export a model in one command",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="bundled model name (smollm2-135m) or a model directory")
    parser.add_argument("--out", required=True, help="output directory (reload with rankwise.load_model(DIR))")
    add_arguments(parser, ShrinkConfig)
    _add_aliases(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished stage")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--stop-after", default=None, help=argparse.SUPPRESS)  # injected failure (tests)
    parser.add_argument("--keep-stages", action="store_true", help="keep every stage's model after export")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the stage records as JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def _add_aliases(parser: argparse.ArgumentParser) -> None:
    """Hidden flags for the fields in `_ALIASES`, parsed like the field's generated flag."""
    generated = {action.dest: action for action in parser._actions}
    for flag, dest in _ALIASES.items():
        action = generated[dest]
        parser.add_argument(flag, dest=dest, type=action.type, choices=action.choices,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print the summary; returns the exit status."""
    from rankwise.config import from_args
    from rankwise.io import check_output
    from rankwise.pipeline.config import ShrinkConfig

    config = from_args(ShrinkConfig, args)  # validates every setting before any work
    check_output(args.out, sources=(args.model,), flag="--out")  # before any work
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from rankwise.pipeline import shrink

    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("cli", True)}
    result = shrink(args.model, out=args.out, resume=args.resume, progress=not args.no_progress,
                    stop_after=args.stop_after, keep_stages=args.keep_stages, **settings)
    from rankwise.train.dist import is_main

    if not is_main():  # under torchrun rank 0 prints (every rank returns the same result)
        return 0
    if args.json:
        print(json.dumps(result.stages, indent=2, default=str))
    else:
        print(result.summary())
        if result.reused:
            print(f"\nresumed: reused finished stages {', '.join(result.reused)}")
        print(f"\nsaved to {args.out} (report: {args.out}/report.md); reload with rankwise.load_model({args.out!r})")
    return 0
