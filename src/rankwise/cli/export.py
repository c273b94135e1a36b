"""`rankwise export DIR --format onnx|dense`: formats other runtimes run.

  --format onnx    the factorised graph as ONNX (two MatMuls per factorised layer: it keeps the
                   parameter and FLOP savings), checked in onnxruntime against PyTorch's
                   logits; --latency also times it against the dense model in ONNX.
  --format dense   the factors multiplied back into a standard Hugging Face checkpoint that
                   plain transformers (and any runtime taking HF weights) loads; it keeps the
                   compressed model's outputs, not its size or speed.

DIR is a directory written by `rankwise compress` / `rankwise shrink` (or any model
`rankwise.load_model` takes). The output (default DIR-onnx / DIR-dense) is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="write a compressed model as ONNX or as a dense HF checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="compressed directory (or bundled name / HF directory)")
    parser.add_argument("--format", required=True, choices=("onnx", "dense"), help="output format")
    parser.add_argument("--out", default=None, help="output directory (default: MODEL-FORMAT)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-check", action="store_true",
                        help="skip reloading the export and comparing its logits")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--dynamo", action="store_true",
                        help="ONNX via torch.export instead of the TorchScript tracer (slower)")
    parser.add_argument("--latency", action="store_true",
                        help="onnx: also time PyTorch, this ONNX model and the dense ONNX model")
    parser.add_argument("--latency-seq-len", type=int, default=128,
                        help="tokens per timed forward pass (default: 128)")
    parser.add_argument("--latency-rounds", type=int, default=10,
                        help="interleaved timing rounds (default: 10)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.latency and args.format != "onnx":
        raise ValueError("--latency times the ONNX export: use it with --format onnx")
    if args.latency_seq_len < 1 or args.latency_rounds < 1:
        raise ValueError("--latency-seq-len and --latency-rounds must be >= 1")
    out = Path(args.out) if args.out else Path(f"{str(args.model).rstrip('/')}-{args.format}")
    if args.format == "dense":
        from rankwise.export.dense import export_dense

        summary = export_dense(args.model, out, overwrite=args.overwrite, check=not args.no_check)
        print(f"wrote {out}: {summary['merged_layers']} layers merged, "
              f"{summary['parameters_factorised'] / 1e6:.1f}M -> {summary['parameters_dense'] / 1e6:.1f}M "
              "parameters; loads with transformers.AutoModelForCausalLM.from_pretrained")
    else:
        summary = _onnx(args, out)
    if "max_abs_logit_diff" in summary:
        print(f"  checked: max |logit difference| vs rankwise = {summary['max_abs_logit_diff']:.2e}")
    return 0


def _onnx(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from rankwise.export.onnx import ONNX_FILE, export_onnx
    from rankwise.models import load_model

    model = load_model(args.model)
    tokenizer = _tokenizer(args.model)
    summary = export_onnx(model, out, tokenizer=tokenizer, opset=args.opset, dynamo=args.dynamo,
                          overwrite=args.overwrite, check=not args.no_check)
    print(f"wrote {out / ONNX_FILE} ({summary['bytes'] / 2**20:.1f} MiB, opset {args.opset}, "
          f"{summary['exporter']}); run it with onnxruntime.InferenceSession")
    if args.latency:
        from rankwise.export.timing import latency_vs_dense
        from rankwise.io import write_json

        lat = latency_vs_dense(model, out / ONNX_FILE, seq_len=args.latency_seq_len,
                               rounds=args.latency_rounds)
        print(f"  latency, batch 1 x {lat['seq_len']} tokens, {lat['threads']} threads "
              "(median, ratio to the dense ONNX model):")
        for name, ratio in lat["ratio_to_onnx_dense"].items():
            print(f"    {name:<20} {lat['median_seconds'][name] * 1e3:8.1f} ms   x{ratio:.2f}")
        summary["latency"] = lat
        write_json(out / "rankwise_export.json", summary)
    return summary


def _tokenizer(src: str) -> Any:
    from rankwise.export.dense import _load_tokenizer

    return _load_tokenizer(src)
