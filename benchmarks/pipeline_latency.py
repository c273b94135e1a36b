"""Latency of the models `benchmarks/pipeline.py` exported, in a fresh process: the scoring
forward (1 x 256 tokens, every position's logits), time to first token (the same prompt as
`generate` runs it: KV cache, last logits only) and per-token decoding, each against dense,
interleaved medians; each as loaded and with horizontal fusion (rankwise.layers.fused: q/k/v
and gate/up run their first factors as one matmul).

    python benchmarks/pipeline_latency.py --work /tmp/rankwise-pipeline-bench --threads 2

Writes benchmarks/results/pipeline_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--work", type=Path, default=Path("/tmp/rankwise-pipeline-bench"),
                   help="benchmarks/pipeline.py's --work: the exported models are WORK/r10, WORK/r20, ...")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=21, help="interleaved forwards per measurement (decode: x 32 tokens / 4)")
    p.add_argument("--synthetic", action="store_true",
                   help="no exported models: time SmolLM2 with every block linear factorised at the uniform rank "
                        "of each ratio (random factors: latency depends on the shapes only)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def synthetic(dense: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """A copy of `dense` whose block linears are rank-r FactorizedLinear layers with
    r = (1 - ratio) m n / (m + n) (the uniform allocation's rank), random factors."""
    import copy

    from rankwise import surgery
    from rankwise.layers.factorized import FactorizedLinear

    model = copy.deepcopy(dense)
    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Linear and name != "lm_head":
            r = max(1, int((1 - ratio) * m.out_features * m.in_features / (m.out_features + m.in_features)))
            surgery.replace_module(model, name, FactorizedLinear(m.in_features, m.out_features, r, bias=m.bias is not None))
    return model.eval()


def main() -> int:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    import rankwise
    from rankwise.io import write_json, write_text
    from rankwise.layers.fused import fuse_siblings_
    from rankwise.pipeline.measure import decode_latency_vs, latency_vs

    dense = rankwise.load_model("smollm2-135m").eval()
    rows: list[dict[str, Any]] = []
    for ratio in args.ratios:
        path = args.work / f"r{int(round(ratio * 100))}"
        if args.synthetic:
            model = synthetic(dense, ratio)
        elif not (path / "config.json").is_file():
            print(f"skip {ratio:.0%}: no exported model at {path}", flush=True)
            continue
        else:
            model = rankwise.load_model(path).eval()
        n = args.repeats
        for fused in (False, True):
            groups = fuse_siblings_(model) if fused else []
            row = {"ratio": ratio, "fused": fused, "fused_groups": len(groups), "synthetic": args.synthetic,
                   "prefill": latency_vs(model, dense, repeats=n),
                   "first_token": latency_vs(model, dense, repeats=n, first_token=True),
                   "decode": decode_latency_vs(model, dense, repeats=max(n // 4, 3))}
            rows.append(row)
            print(f"{ratio:.0%}{' fused' if fused else ''}: prefill {row['prefill']['latency_vs_dense']:.3f}x, first "
                  f"token {row['first_token']['latency_vs_dense']:.3f}x, decode {row['decode']['latency_vs_dense']:.3f}x",
                  flush=True)
        del model
    meta = {"machine": f"{platform.machine()} CPU ({os.cpu_count()} cores)", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "load_average": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "pipeline_latency_synthetic" if args.synthetic else "pipeline_latency"
    write_json(args.out / f"{name}.json", {"meta": meta, "rows": rows})
    lines = ["# `rankwise shrink` on SmolLM2-135M: latency of the exported models vs dense", "",
             f"Fresh process, {meta['threads']} torch threads, OMP_WAIT_POLICY {meta['omp_wait_policy']}, load average "
             f"{meta['load_average']}; interleaved medians ({args.repeats} forwards each; decode: {max(args.repeats // 4, 3)} x 32 "
             "tokens after a 64-token prompt). Run-to-run spread on this machine is about +-2 %.",
             "", "| removed | horizontal fusion | scoring forward, 1 x 256, all logits | time to first token, 256-token prompt "
             "| decode, per token |", "|---|---|---|---|---|"]
    for r in rows:
        p, f, d = r["prefill"], r["first_token"], r["decode"]
        fusion = f"yes ({r['fused_groups']} groups)" if r.get("fused") else "no"
        lines.append(f"| {r['ratio']:.0%} | {fusion} | {p['latency_vs_dense']:.3f}x ({p['latency_ms']:.0f} vs {p['dense_ms']:.0f} ms) "
                     f"| {f['latency_vs_dense']:.3f}x ({f['latency_ms']:.0f} vs {f['dense_ms']:.0f} ms) "
                     f"| {d['latency_vs_dense']:.3f}x ({d['ms_per_token']:.1f} vs {d['dense_ms_per_token']:.1f} ms) |")
    if args.synthetic:
        lines[0] += " (synthetic: every block linear at the uniform rank of the ratio, random factors)"
    write_text(args.out / f"{name}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
