"""`rankwise compress MODEL --method svd-llm --ratio 0.2 --out DIR`: compress, report, save.

The result reloads with `rankwise.load_model(DIR)` (or `rankwise.compress.load_compressed`)
and evaluates with `rankwise eval DIR`. `--ratio` is the fraction of parameters removed from
the targeted layers (`--scope model`: from the whole model); the summary prints both.

Outputs are checked before the model is loaded (a file, a path under a file, a read-only
directory, the input itself, or a directory holding files rankwise did not write are refused)
and published atomically: a run killed at any point leaves the old --out or the new one.
With --method eora, --peft-out also needs the quantised base model the adapter applies to;
it is written to --peft-base (default: --out with "-base" appended).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_DESCRIPTION = __doc__


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `compress` subcommand."""
    from rankwise.compress.allocate import ALLOCATIONS
    from rankwise.compress.presets import METHODS

    methods = "\n".join(f"  {n:<15} {p.description}" for n, p in METHODS.items())
    parser = subparsers.add_parser(
        "compress",
        help="low-rank compress a model's linear layers (SVD-LLM, ASVD, WeLore, EoRA, ...)",
        description=_DESCRIPTION + "\nmethods:\n" + methods,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="bundled model name (smollm2-135m, minilm-l6) or a model directory")
    parser.add_argument("--method", default="svd-llm", choices=list(METHODS), help="compression method (default svd-llm)")
    parser.add_argument("--ratio", type=float, default=0.2,
                        help="fraction of parameters to remove, in [0, 1) (default 0.2)")
    parser.add_argument("--scope", default="targets", choices=("targets", "model"),
                        help="what --ratio is a fraction of: the targeted layers (default) or the whole model")
    parser.add_argument("--allocation", choices=list(ALLOCATIONS), default=None,
                        help="rank allocation across layers (default: the method's)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                        help="layer names/globs to compress (default: every linear but the output head)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="calibration sequence length (default 256)")
    parser.add_argument("--calib-source", default=None,
                        help="calibration text: corpus name, file or glob (default: the embedded python-docs corpus)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    parser.add_argument("--damping", type=float, default=None, help="relative Gram damping (e.g. 1e-2)")
    parser.add_argument("--update", choices=("none", "lstsq", "joint"), default=None,
                        help="SVD-LLM update after whitening (default: the method's)")
    parser.add_argument("--compensation-rank", type=int, default=0,
                        help="spend this much of each layer's rank on an EoRA path (default 0)")
    parser.add_argument("--base", choices=("int8", "int4", "2:4"), default="int4",
                        help="for --method eora: the compression to compensate (default int4)")
    parser.add_argument("--rank", type=int, default=32, help="for --method eora: the EoRA rank (default 32)")
    parser.add_argument("--peft-out", default=None,
                        help="for --method eora: also write the EoRA paths as a PEFT LoRA adapter here")
    parser.add_argument("--peft-base", default=None,
                        help="with --peft-out: where to write the quantised base model the adapter applies to "
                             "(default: OUT-base); an existing directory is replaced only if rankwise wrote it")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration micro-batch size")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load, compress, save and print the summary; returns the exit status."""
    from rankwise.compress import compensate_, compress_, export_peft, get_preset, save_compressed
    from rankwise.compress.base import check_ratio
    from rankwise.models import load_model, load_tokenizer

    check_ratio(args.ratio)  # fail before the (slow) model load
    preset = get_preset(args.method)
    peft_base = check_outputs(args, preset.kind)  # every output writable, none clobbers the input
    progress = not args.no_progress
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    common: dict[str, Any] = dict(
        calibration=args.calib_source, tokenizer=tokenizer, n_samples=args.calib_samples,
        seq_len=args.calib_seq_len, seed=args.seed, target_modules=args.target_modules,
        batch_size=args.batch_size, progress=progress,
    )
    if preset.kind == "compensate":
        report = compensate_(model, args.base, args.rank, **common)
    else:
        report = compress_(model, args.method, args.ratio, allocation=args.allocation, scope=args.scope,
                           damping=args.damping, update=args.update,
                           compensation_rank=args.compensation_rank, **common)
    save_compressed(model, args.out, tokenizer=tokenizer, report=report)
    if preset.kind == "compensate" and args.peft_out:
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
