"""`rankwise compress MODEL --method svd-llm --ratio 0.2 --out DIR`: compress, report, save.

The result reloads with `rankwise.load_model(DIR)` (or `rankwise.compress.load_compressed`)
and evaluates with `rankwise eval DIR`. `--ratio` is the fraction of parameters removed from
the targeted layers (`--scope model`: from the whole model); the summary prints both.

Outputs are checked before the model is loaded (a file, a path under a file, a read-only
directory, the input itself, or a directory holding files rankwise did not write are refused)
and published atomically: a run killed at any point leaves the old --out or the new one.
With --method eora, --peft-out also needs the quantised base model the adapter applies to;
it is written to --peft-base (default: --out with "-base" appended).
`--streaming` compresses a model that does not fit in memory block by block from its files
(rankwise.compress.streaming); `--device cuda` runs each block on the GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any

_DESCRIPTION = __doc__


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `compress` subcommand; its option flags are generated from CompressConfig and
    CompensateConfig (rankwise.config.add_arguments), so defaults are declared once."""
    from rankwise.compress.allocate import ALLOCATIONS
    from rankwise.compress.config import CalibrationConfig, CompensateConfig, CompressConfig
    from rankwise.compress.presets import METHODS
    from rankwise.config import add_arguments
    from rankwise.registry import canonical_name

    methods = "\n".join(f"  {n:<15} {p.description}" for n, p in METHODS.items())
    parser = subparsers.add_parser(
        "compress",
        help="low-rank compress a model's linear layers (SVD-LLM, ASVD, WeLore, EoRA, ...)",
        description=_DESCRIPTION + "\nmethods (dashes accepted, e.g. svd-llm):\n" + methods,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="bundled model name (smollm2-135m, minilm-l6) or a model directory")
    parser.add_argument("--out", required=True, help="output directory")
    add_arguments(parser, CompressConfig)
    parser.set_defaults(method=CompressConfig.method)
    for action in parser._actions:  # the choices come from the registry, spelled either way
        if action.dest == "method":
            action.type, action.choices = canonical_name, list(METHODS)
        if action.dest == "target_modules":
            action.metavar = "NAME"
        if action.dest == "allocation":
            action.choices = list(ALLOCATIONS)
        if action.choices is not None and None in action.choices:  # None is the default only
            action.choices = [c for c in action.choices if c is not None]
    eora = parser.add_argument_group("for --method eora (compensate_)")
    add_arguments(eora, CompensateConfig, exclude=[f.name for f in fields(CalibrationConfig)])
    parser.add_argument("--calib-source", dest="calibration", default=None,
                        help=CalibrationConfig.help_text("calibration").split("; from Python")[0])
    for old, dest in (("--calib-samples", "n_samples"), ("--calib-seq-len", "seq_len")):
        parser.add_argument(old, dest=dest, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true",
                        help="compress block by block from the model's safetensors files without "
                        "loading it (peak memory ~ one block); writes --out directly")
    parser.add_argument("--device", default="cpu",
                        help="with --streaming: where each block is calibrated and compressed (e.g. cuda)")
    parser.add_argument("--peft-out", default=None,
                        help="for --method eora: also write the EoRA paths as a PEFT LoRA adapter here")
    parser.add_argument("--peft-base", default=None,
                        help="with --peft-out: where to write the quantised base model the adapter applies to "
                             "(default: OUT-base); an existing directory is replaced only if rankwise wrote it")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load, compress, save and print the summary; returns the exit status."""
    from rankwise.compress import compensate_, compress_, export_peft, get_preset, save_compressed
    from rankwise.compress.base import check_ratio
    from rankwise.compress.config import CompensateConfig, CompressConfig
    from rankwise.config import from_args
    from rankwise.models import load_model, load_tokenizer

    check_ratio(args.ratio)  # fail before the (slow) model load
    preset = get_preset(args.method)
    peft_base = check_outputs(args, preset.kind)  # every output writable, none clobbers the input
    overrides = {"progress": not args.no_progress}
    if preset.kind == "compensate":
        config: Any = from_args(CompensateConfig, args, **overrides)
    else:
        config = from_args(CompressConfig, args, **overrides)
    if args.streaming:
        from rankwise.compress.streaming import compensate_streaming, compress_streaming

        stream = compensate_streaming if preset.kind == "compensate" else compress_streaming
        report = stream(args.model, args.out, config=config, device=args.device)
        model = tokenizer = None
    else:
        model = load_model(args.model)
        tokenizer = load_tokenizer(args.model)
        if preset.kind == "compensate":
            report = compensate_(model, config=config, tokenizer=tokenizer)
        else:
            report = compress_(model, config=config, tokenizer=tokenizer)
        save_compressed(model, args.out, tokenizer=tokenizer, report=report)
    if preset.kind == "compensate" and args.peft_out:
        if model is None:
            model, tokenizer = load_model(args.out), load_tokenizer(args.out)
        export_peft(model, args.peft_out, base_directory=peft_base, tokenizer=tokenizer)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.summary())
        print(f"\nsaved to {args.out}; evaluate with: rankwise eval {args.out}")
    return 0


def check_outputs(args: argparse.Namespace, kind: str) -> str | None:
    """Refuse unusable outputs before any work; returns the PEFT base directory (or None)."""
    from rankwise.compress.saving import MARKER

    if args.peft_out and kind != "compensate":
        raise ValueError("--peft-out exports EoRA paths: it needs --method eora")
    outs = {"--out": args.out}
    peft_base = None
    if args.peft_out and kind == "compensate":
        peft_base = args.peft_base or f"{args.out.rstrip('/')}-base"
        outs |= {"--peft-out": args.peft_out, "--peft-base": peft_base}
    check_output_dir(args.out, "--out", (args.model,), MARKER)
    if peft_base is not None:
        check_output_dir(args.peft_out, "--peft-out", (args.model, args.out), "adapter_config.json")
        check_output_dir(peft_base, "--peft-base", (args.model, args.out, args.peft_out), MARKER)
    return peft_base


def check_output_dir(path: str, flag: str, sources: tuple[str, ...], marker: str) -> None:
    """`path` must be writable, not one of `sources` (nor inside / around one), and either new,
    empty, or a directory rankwise wrote before (it holds `marker`): never a user's other files."""
    from pathlib import Path

    from rankwise.io import check_output

    check_output(path, sources=sources, flag=flag)
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not (p / marker).is_file():
        example = sorted(e.name for e in p.iterdir())[0]
        raise ValueError(f"{flag} {path} already holds files that rankwise did not write there (e.g. {example}): "
                         "choose a new or empty directory")
