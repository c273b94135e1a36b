"""Latency of SmolLM2-135M compressed by 20 % in the formats `rankwise export` writes.

The 20 % model: by default ("--method shapes") every block linear of SmolLM2 becomes a
FactorizedLinear at the ranks of a uniform 20 % allocation (`allocate_ranks(..., "uniform")`,
the ranks `compress_(model, "svd-llm", 0.2)` uses), with the default initialisation instead of
SVD factors: latency depends on the shapes only, and this takes seconds where 210 SVDs took
30+ minutes on the shared 2-core machine. `--method svd-llm` (or any compress_ method) runs
the real compression; --model-dir uses a compressed directory. It is exported to ONNX (the factorised graph) and, with its
factors multiplied back, to a dense ONNX model; the four runners (PyTorch factorised / dense,
onnxruntime factorised / dense) each run one scoring forward (batch 1, every position's logits,
no KV cache) per round, interleaved, with the same thread count. Reported: medians as ratios to
the dense ONNX model, and each ONNX file's logits checked against PyTorch.

    python benchmarks/export.py --threads 2 --rounds 15

Writes benchmarks/results/export.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

# a script here named like an installed package (transformers probes for `kernels`) would
# shadow it: drop this folder from the import path (the script imports nothing from it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNNERS = ("pytorch_factorised", "onnx_factorised", "onnx_dense", "pytorch_dense")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a compressed directory to use instead of compressing SmolLM2 here")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--method", default="shapes",
                   help="shapes (random factors at uniform ranks) or a compress_ method")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 32])
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def compressed_model(args: argparse.Namespace) -> torch.nn.Module:
    import rankwise

    if args.model_dir is not None:
        return rankwise.load_model(args.model_dir)
    model = rankwise.load_model("smollm2-135m")
    if args.method == "shapes":
        return factorised_shapes(model, args.ratio).eval()
    from rankwise.compress import compress_

    tok = rankwise.load_tokenizer("smollm2-135m")
    compress_(model, args.method, args.ratio, allocation="uniform", tokenizer=tok, n_samples=16,
              seq_len=256)
    return model.eval()


def factorised_shapes(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """Every block nn.Linear -> FactorizedLinear at its uniform-allocation rank (random factors)."""
    from torch import nn

    from rankwise import surgery
    from rankwise.compress.allocate import LayerSpec, allocate_ranks
    from rankwise.layers.factorized import FactorizedLinear

    linears = {f: m for f, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in f}
    ranks = allocate_ranks({f: LayerSpec(m.out_features, m.in_features) for f, m in linears.items()},
                           ratio, "uniform")
    for fqn, rank in ranks.items():
        if rank is not None:
            m = linears[fqn]
            surgery.replace_module(model, fqn, FactorizedLinear(
                m.in_features, m.out_features, rank, bias=m.bias is not None))
    return model


def main() -> int:
    args = parse()
    torch.set_num_threads(args.threads)
    from rankwise.export.dense import merge_factors_
    from rankwise.export.onnx import check_onnx, export_onnx
    from rankwise.export.timing import compare_latency, onnx_runner, torch_runner
    from rankwise.io import write_json, write_text

    model = compressed_model(args)
    dense = copy.deepcopy(model)
    merge_factors_(dense)
    work = Path(tempfile.mkdtemp(prefix="rankwise-export-bench-"))
    files: dict[str, Any] = {}
    for name, m in (("factorised", model), ("dense", dense)):
        summary = export_onnx(m, work / name)
        files[name] = {"bytes": summary["bytes"], "max_abs_logit_diff": summary["max_abs_logit_diff"]}
        print(f"onnx {name}: {summary['bytes'] / 2**20:.0f} MiB, logits within "
              f"{summary['max_abs_logit_diff']:.1e} of PyTorch", flush=True)
    rows = []
    for seq_len in args.seq_lens:
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        check_onnx(work / "factorised" / "model.onnx", model, ids, mask)
        medians = compare_latency({
            "pytorch_factorised": torch_runner(model, ids, mask),
            "onnx_factorised": onnx_runner(work / "factorised" / "model.onnx", ids, mask),
            "onnx_dense": onnx_runner(work / "dense" / "model.onnx", ids, mask),
            "pytorch_dense": torch_runner(dense, ids, mask),
        }, rounds=args.rounds)
        base = medians["onnx_dense"]
        rows.append({"seq_len": seq_len, "median_seconds": medians,
                     "ratio_to_onnx_dense": {k: v / base for k, v in medians.items()}})
        print(f"1 x {seq_len}: " + ", ".join(f"{k} {v / base:.3f}x" for k, v in medians.items()), flush=True)
    params = {n: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
              for n, m in (("factorised", model), ("dense", dense))}
    load = os.getloadavg()[0]
    what = "random factors at the uniform ranks" if args.method == "shapes" else args.method
    result = {"model": str(args.model_dir or f"SmolLM2-135M, {what}, {args.ratio:.0%} removed"),
              "threads": args.threads, "rounds": args.rounds, "load_average": load,
              "platform": platform.platform(), "torch": torch.__version__, "onnx_files": files,
              "parameters": params, "rows": rows}
    write_json(args.out / "export.json", result)
    write_text(args.out / "export.md", render(result))
    print(f"wrote {args.out / 'export.md'}")
    return 0


def render(r: dict[str, Any]) -> str:
    lines = [
        "# `rankwise export`: latency of SmolLM2-135M compressed by 20 % in each format",
        "",
        f"{r['model']}; {r['parameters']['factorised'] / 1e6:.1f}M parameters factorised vs "
        f"{r['parameters']['dense'] / 1e6:.1f}M dense. One scoring forward (batch 1, all logits, "
        f"no KV cache), {r['threads']} threads for both runtimes, interleaved medians of "
        f"{r['rounds']} rounds; load average {r['load_average']:.1f} on a 2-core machine shared "
        "with other jobs, so only the ratios measured side by side are meaningful. Ratios are to "
        "the dense ONNX model (below 1 = faster).",
        "",
        "| tokens | PyTorch factorised | ONNX factorised | ONNX dense | PyTorch dense |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        ratio = row["ratio_to_onnx_dense"]
        lines.append(f"| 1 x {row['seq_len']} | " + " | ".join(f"{ratio[k]:.3f}x" for k in RUNNERS) + " |")
    f = r["onnx_files"]
    lines += [
        "",
        f"ONNX files: factorised {f['factorised']['bytes'] / 2**20:.0f} MiB, dense "
        f"{f['dense']['bytes'] / 2**20:.0f} MiB; onnxruntime's logits within "
        f"{max(f['factorised']['max_abs_logit_diff'], f['dense']['max_abs_logit_diff']):.1e} of PyTorch's.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
