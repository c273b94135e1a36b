"""Out-of-domain check of `rankwise shrink` on SmolLM2-135M: perplexity on English quotes
(the embedded fortunes test split) of the models `benchmarks/pipeline.py` measured on
python-docs.

The compression is calibrated, and the healing trained, on python-docs; the issue's reference
numbers (uniform whitened SVD ~12x dense at 20 %) are on held-out English text. This script
rebuilds the training-free models of the pipeline benchmark (uniform whitened SVD, and the
method + allocation the pipeline chose at that ratio, without compensation or healing, on the
same calibration), loads the healed models
the benchmark exported, and scores all of them on both domains.

    python benchmarks/pipeline_ood.py --work /tmp/rankwise-pipeline-bench --ratios 0.1 0.2 0.3

Writes benchmarks/results/pipeline_ood.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
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
                   help="benchmarks/pipeline.py's --work: the healed models are read from WORK/r20 etc.")
    p.add_argument("--pipeline-json", type=Path, default=RESULTS / "pipeline.json",
                   help="the pipeline benchmark's results: the method and allocation it chose at each ratio")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fortunes_stream(tokenizer: Any) -> torch.Tensor:
    """The fortunes test quotes, one token stream (documents joined by the tokenizer's EOS)."""
    from rankwise.data import load_topics, token_stream

    return token_stream(load_topics("fortunes", "test").texts, tokenizer)


def scores(model: Any, tokenizer: Any, ood: torch.Tensor, eval_tokens: int) -> dict[str, float]:
    from rankwise.pipeline.measure import heldout_perplexity, test_perplexity

    return {"python_docs": test_perplexity(model, tokenizer, eval_tokens),
            "fortunes": heldout_perplexity(model, ood[: eval_tokens + 1])}


def training_free(dense: Any, tok: Any, ratio: float, method: str, allocation: str, ids: torch.Tensor) -> Any:
    from rankwise.compress import compress_

    model = copy.deepcopy(dense)
    compress_(model, method, ratio, allocation=allocation, calibration=ids, tokenizer=tok, progress=False)
    return model


def main() -> int:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    import rankwise
    from rankwise.compress import calibration_ids
    from rankwise.io import write_json, write_text

    dense = rankwise.load_model("smollm2-135m").eval()
    tok = rankwise.load_tokenizer("smollm2-135m")
    ood = fortunes_stream(tok)
    ids, _ = calibration_ids(dense, None, tok, n_samples=32, seq_len=256)  # the pipeline's default
    ref = scores(dense, tok, ood, args.eval_tokens)
    log(f"dense {ref}")
    chosen = {round(r["ratio"], 6): (r["method"], r["allocation"])
              for r in json.loads(args.pipeline_json.read_text())["rows"]}
    rows = []
    for ratio in args.ratios:
        row: dict[str, Any] = {"ratio": ratio}
        best = chosen.get(round(ratio, 6), ("svd-llm-update", "welore"))
        for key, method, allocation in (("uniform whitened SVD", "svd-llm", "uniform"),
                                        (f"compress ({best[0]} + {best[1]})", *best)):
            model = training_free(dense, tok, ratio, method, allocation, ids)
            row[key] = scores(model, tok, ood, args.eval_tokens)
            del model
            log(f"{ratio:.0%} {key}: {row[key]}")
        healed_dir = args.work / f"r{int(round(ratio * 100))}"
        if (healed_dir / "config.json").is_file():
            healed = scores(rankwise.load_model(healed_dir), tok, ood, args.eval_tokens)
            row["+ healing (the pipeline benchmark's export)"] = healed
            log(f"{ratio:.0%} healed: {healed}")
        rows.append(row)
    meta = {"machine": f"{platform.machine()} CPU ({os.cpu_count()} cores)", "torch": torch.__version__,
            "python": sys.version.split()[0], "eval_tokens": args.eval_tokens, "dense": ref,
            "fortunes_tokens": int(ood.numel()), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "pipeline_ood.json", {"meta": meta, "rows": rows})
    lines = ["# `rankwise shrink` on SmolLM2-135M: in-domain vs out-of-domain perplexity", "",
             "Calibration (32 x 256 tokens) and healing use python-docs. Perplexity x dense on the python-docs test "
             f"split and on the fortunes test quotes (English, out of domain), first {args.eval_tokens} tokens, "
             f"512-token windows. Dense: python-docs {ref['python_docs']:.2f}, fortunes {ref['fortunes']:.2f}.", "",
             "| removed | model | python-docs (x dense) | fortunes (x dense) |", "|---|---|---|---|"]
    for r in rows:
        for key, val in r.items():
            if key != "ratio":
                lines.append(f"| {r['ratio']:.0%} | {key} | {val['python_docs'] / ref['python_docs']:.2f} "
                             f"| {val['fortunes'] / ref['fortunes']:.2f} |")
    write_text(args.out / "pipeline_ood.md", "\n".join(lines) + "\n")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
