"""`rankwise eval MODEL --harness TASK[,TASK]`: lm-evaluation-harness on local tasks."""

from __future__ import annotations

import argparse
import time
from typing import Any


def run_harness(args: argparse.Namespace) -> int:
    import torch

    from rankwise.harness import evaluate

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: pass N >= 1 documents per task")
    start = time.perf_counter()
    results = evaluate(
        args.model, args.harness, include=args.harness_include, limit=args.limit,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size, max_length=args.seq_len,
        dtype=getattr(torch, args.dtype),
    )
    seconds = time.perf_counter() - start
    for task, metrics in results.items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, float) and k != "sample_len"}
        print(f"{task} ({metrics['documents']} documents, lm-evaluation-harness): "
              + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    print(f"  {seconds:.1f} s; max length {args.seq_len} tokens, batch size {args.batch_size}")
    if args.json:
        from rankwise.io import write_json

        payload: dict[str, Any] = {"model": str(args.model), "harness": results,
                                   "seconds": seconds, "max_length": args.seq_len}
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
