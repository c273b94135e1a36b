"""EoRA's two calibration orders on SmolLM2-135M: parallel (dense activations) vs sequential.

Writes benchmarks/results/eora_order.json + .md. Parallel: every layer's EoRA path is fitted on
the Gram of the *dense* model's inputs (one whole-model pass). Sequential (EoRA's reference):
blocks in order, block i's Gram from inputs through the compensated blocks < i. Two settings:
SVD-LLM truncation removing 20 % of the block linears' parameters with a rank-16 EoRA path
inside that budget (`compress_(..., compensation_rank=16)`), and int4 quantisation + rank-16
EoRA (`compensate_`). Perplexity on the embedded python-docs test split.

    .venv/bin/python benchmarks/eora_order.py --calib 8 256 --eval-tokens 3072
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def write(rows: list[dict], info: dict, args: argparse.Namespace) -> None:
    """benchmarks/results/eora_order.json + .md from the rows measured so far."""
    dense_ppl = rows[0]["ppl"]
    for x in rows:
        x["x_dense"] = x["ppl"] / dense_ppl
    result = {"model": "smollm2-135m", "calibration": info, "eval": {"corpus": "python-docs", "split": "test",
              "tokens": args.eval_tokens}, "rank": args.rank, "ratio": args.ratio, "rows": rows,
              "machine": f"{os.cpu_count()} CPU cores shared with ~7 other jobs; seconds indicative only"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eora_order.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# EoRA: parallel vs sequential calibration order (SmolLM2-135M)", "",
             f"Calibration {info['n_samples']} x {info['seq_len']} python-docs tokens; perplexity on "
             f"{args.eval_tokens} python-docs test tokens. {result['machine']}.", "",
             "| setting | order | perplexity | x dense | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {x['setting']} | {x['order'] or '-'} | {x['ppl']:.3f} | {x['x_dense']:.3f} | {x['seconds']:.0f} |"
              for x in rows]
    (RESULTS / "eora_order.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", type=int, nargs=2, default=(8, 256), metavar=("N", "SEQ"))
    p.add_argument("--eval-tokens", type=int, default=3072)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense-ppl", type=float, default=None,
                   help="reuse a dense perplexity measured with the same --eval-tokens")
    p.add_argument("--skip-truncation-alone", action="store_true",
                   help="leave out the svd_llm row without EoRA (context only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import rankwise
    from rankwise.calibrate import capture_input_stats
    from rankwise.compress import calibration_ids, compensate_, compress_, find_targets
    from rankwise.pipeline.measure import test_perplexity

    tok = rankwise.load_tokenizer("smollm2-135m")
    dense = rankwise.load_model("smollm2-135m")
    ids, info = calibration_ids(dense, None, tok, n_samples=args.calib[0], seq_len=args.calib[1])
    stats = capture_input_stats(dense, ids, find_targets(dense), share_inputs=True, progress=False)
    rows = []

    def row(name: str, order: str | None, build) -> None:
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        build(model)
        seconds = time.perf_counter() - t
        ppl = test_perplexity(model, tok, args.eval_tokens)
        rows.append({"setting": name, "order": order, "ppl": ppl, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        write(rows, info, args)  # partial results survive an interrupted run

    k, r = args.rank, args.ratio
    if args.dense_ppl is None:
        row("dense", None, lambda m: None)
    else:
        rows.append({"setting": "dense", "order": None, "ppl": args.dense_ppl, "seconds": 0.0})
    if not args.skip_truncation_alone:
        row(f"svd_llm {r:.0%}", None, lambda m: compress_(m, "svd_llm", r, stats=stats, progress=False))
    row(f"int4 + EoRA r={k}", "parallel", lambda m: compensate_(m, "int4", k, stats=stats, progress=False))
    row(f"int4 + EoRA r={k}", "sequential",
        lambda m: compensate_(m, "int4", k, calibration=ids, sequential=True, progress=False))
    row(f"svd_llm {r:.0%} + EoRA k={k} in budget", "parallel",
        lambda m: compress_(m, "svd_llm", r, stats=stats, compensation_rank=k, progress=False))
    row(f"svd_llm {r:.0%} + EoRA k={k} in budget", "sequential",
        lambda m: compress_(m, "svd_llm", r, calibration=ids, compensation_rank=k,
                            compensation_sequential=True, progress=False))
    write(rows, info, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
