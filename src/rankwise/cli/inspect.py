"""`rankwise inspect MODEL`: spectral diagnostics of a model's weights and representations.

    rankwise inspect smollm2-135m --quick        # per-layer effective-rank table, seconds
    rankwise inspect minilm-l6 --out report/     # table + JSON + PNGs + report.html
    rankwise inspect base --compare finetuned    # also the rank of W1 - W0 per matrix
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="spectral diagnostics: ranks, heavy-tail alpha, WeLore classes, RankMe, HTML report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="bundled model name (smollm2-135m, minilm-l6) or a local path")
    p.add_argument("--quick", action="store_true", help="only print the per-layer effective-rank table")
    p.add_argument("--out", metavar="DIR", help="output folder (default ./inspect-NAME/)")
    p.add_argument("--compare", metavar="MODEL2", help="second model: analyse the update W1 - W0 per matrix")
    p.add_argument("--no-data", action="store_true", help="skip RankMe / Matrix Nuclear-Norm on the corpus")
    p.add_argument("--corpus", default="python-docs", help="embedded corpus for the representations")
    p.add_argument("--max-texts", type=int, default=16, help="texts of the corpus test split to embed (16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per text (256)")
    p.add_argument(
        "--reduction", type=float, default=0.5, help="WeLore target rank reduction that sets tau (0.5)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name.rstrip("/")).name) or "model"


def run(args: argparse.Namespace) -> int:
    import rankwise
    from rankwise.inspect import inspect_model, quick_table_data, report, summarize, write_outputs
    from rankwise.inspect.weights import short_kinds

    if args.quick and args.compare:
        raise ValueError("--quick and --compare do not combine: drop --quick to compare two models")
    if args.max_texts < 1 or args.seq_len < 8:
        raise ValueError("--max-texts must be >= 1 and --seq-len >= 8")
    progress = not args.no_progress
    start = time.perf_counter()
    model = rankwise.load_model(args.model)
    model.eval()
    tokenizer = texts = None
    if not (args.quick or args.no_data):
        tokenizer = rankwise.load_tokenizer(args.model)
        texts = rankwise.data.load_corpus(args.corpus, "test")
    second = rankwise.load_model(args.compare) if args.compare else None
    result = inspect_model(
        model,
        name=args.model,
        tokenizer=tokenizer,
        texts=texts,
        compare_to=second,
        quick=args.quick,
        welore_reduction=args.reduction,
        max_texts=args.max_texts,
        max_length=args.seq_len,
        progress=progress,
    )
    if args.quick:
        kinds, grid = quick_table_data(result.weights, "erank")
        print(f"effective rank per layer ({args.model}; full rank in the summary below)")
        if grid:
            print(report.format_grid(kinds, grid))
        others = [r for r in result.weights.rows if r["block"] is None]
        if others:
            print()
            print(report.format_table(others, report.QUICK_COLUMNS))
        fulls = {r["kind"]: r["rank_full"] for r in result.weights.rows if r["block"] is not None}
        if fulls:
            labels = short_kinds(list(fulls))
            print("full rank: " + ", ".join(f"{h}={v}" for h, v in zip(labels, fulls.values(), strict=True)))
        print(f"{len(result.weights.rows)} matrices in {time.perf_counter() - start:.1f} s")
        return 0
    out = Path(args.out) if args.out else Path(f"inspect-{_slug(args.model)}")
    paths = write_outputs(result, out)
    print(paths["table"].read_text(encoding="utf-8"), end="")
    print()
    for key, value in summarize(result).items():
        print(f"{key:>26}: {report.fmt(value, '.4g') if isinstance(value, float) else value}")
    print(f"\nwrote {', '.join(p.name for p in paths.values())} to {out}/")
    print(f"open {paths['html'].resolve().as_uri()}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
