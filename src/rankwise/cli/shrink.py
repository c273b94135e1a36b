"""`rankwise shrink MODEL --ratio 0.2 --out DIR`: compress, compensate, heal, export, report.

Runs rankwise.pipeline.shrink with one progress bar over the four stages and prints one summary
table. The result reloads with `rankwise.load_model(DIR)`; DIR/report.md has perplexity,
parameters, latency and the per-layer ranks. A killed run continues with `--resume`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_DESCRIPTION = __doc__


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `shrink` subcommand."""
    from rankwise.pipeline.config import HEAL_DATA, HEAL_METHODS

    parser = subparsers.add_parser(
        "shrink", help="compress -> compensate -> heal -> export a model in one command",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="bundled model name (smollm2-135m) or a model directory")
    parser.add_argument("--ratio", type=float, default=0.2,
                        help="fraction of the targeted layers' parameters to remove, in (0, 1) (default 0.2)")
    parser.add_argument("--out", required=True, help="output directory (reload with rankwise.load_model(DIR))")
    parser.add_argument("--heal-minutes", type=float, default=15.0,
                        help="wall-clock budget of the healing fine-tune in minutes (default 15; 0 skips)")
    parser.add_argument("--heal-method", choices=HEAL_METHODS, default="lowrank",
                        help="lowrank: the factors on the causal-LM loss (default); distill: the factors trained "
                             "against the dense model (KL + feature MSE); lora: LoRA on the factors, merged; none")
    parser.add_argument("--heal-data", choices=HEAL_DATA, default="text",
                        help="healing text: text (default: --text or python-docs), teacher (sampled from the dense "
                             "model, data-free), mixture (python-docs + fortunes), auto (--text if given, else teacher)")
    parser.add_argument("--teacher-samples", type=int, default=128,
                        help="sequences of 256 tokens sampled from the dense model for teacher text (default 128)")
    parser.add_argument("--no-compensation", action="store_true", help="do not try EoRA compensation")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished stage")
    parser.add_argument("--method", default="auto",
                        help="compression method (default auto: measure the candidates on held-out data)")
    parser.add_argument("--allocation", default=None, help="rank allocation (default: measured / the method's)")
    parser.add_argument("--calib-source", default="mixture",
                        help="calibration text: mixture (default: python-docs + fortunes, measured best on held-out "
                             "domains), teacher (sampled from the dense model), a corpus name or a file")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="calibration sequence length (default 256)")
    parser.add_argument("--text", default=None,
                        help="healing text: corpus name, .txt/.jsonl file, folder or glob (default: python-docs train)")
    parser.add_argument("--heal-lr", type=float, default=None, help="healing learning rate (default: the method's)")
    parser.add_argument("--heal-steps", type=int, default=None, help="also stop healing after this many steps")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="test-split tokens for the report (default 8192)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--stop-after", default=None, help=argparse.SUPPRESS)  # injected failure (tests)
    parser.add_argument("--keep-stages", action="store_true", help="keep every stage's model after export")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the stage records as JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print the summary; returns the exit status."""
    if not 0 < args.ratio < 1:
        raise ValueError(f"--ratio {args.ratio} is outside (0, 1): pass the fraction of parameters to remove, e.g. 0.2")
    from rankwise.io import check_output

    check_output(args.out, sources=(args.model,), flag="--out")  # before any work
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from rankwise.pipeline import shrink

    result = shrink(
        args.model, args.ratio, out=args.out, heal_minutes=args.heal_minutes, heal_method=args.heal_method,
        calibration=args.calib_source, text=args.text, method=args.method, allocation=args.allocation,
        compensation=not args.no_compensation, resume=args.resume, progress=not args.no_progress,
        stop_after=args.stop_after, keep_stages=args.keep_stages, n_samples=args.calib_samples,
        seq_len=args.calib_seq_len, heal_lr=args.heal_lr, heal_steps=args.heal_steps,
        eval_tokens=args.eval_tokens, heal_data=args.heal_data, teacher_samples=args.teacher_samples,
    )
    if args.json:
        print(json.dumps(result.stages, indent=2, default=str))
    else:
        print(result.summary())
        if result.reused:
            print(f"\nresumed: reused finished stages {', '.join(result.reused)}")
        print(f"\nsaved to {args.out} (report: {args.out}/report.md); reload with rankwise.load_model({args.out!r})")
    return 0
