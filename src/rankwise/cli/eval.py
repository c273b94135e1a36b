"""`rankwise eval MODEL`: perplexity of a causal LM, topic accuracy of an encoder.

A causal LM (smollm2-135m, or any local HF directory with a *ForCausalLM) is scored by strided
perplexity on an embedded corpus split (default python-docs/test). By default only the first
`DEFAULT_EVAL_TOKENS` tokens are scored so that the command finishes in about a minute on two CPU
cores; ``--max-tokens 0`` scores the whole split.

An encoder (minilm-l6) has no perplexity: it is scored by nearest-centroid topic accuracy of its
mean-pooled sentence embeddings on the fortunes topics (centroids from the train split). A
sequence-classification model is scored by the accuracy of its own head on the same topics.

``--harness TASK[,TASK]`` scores a causal LM with lm-evaluation-harness instead, offline, on
local task definitions (rankwise_python_docs: rolling perplexity as lm-eval's wikitext task;
rankwise_fortunes: topic multiple choice); ``--harness-include DIR`` adds your own task YAMLs
(docs/harness.md). ``--limit N`` scores the first N documents of each task.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: Any) -> argparse.ArgumentParser:
    from rankwise.eval import DEFAULT_EVAL_TOKENS

    parser = subparsers.add_parser(
        "eval",
        help="perplexity (causal LMs) or topic accuracy (encoders) of a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", help="bundled name (smollm2-135m, minilm-l6) or a local model directory"
    )
    parser.add_argument(
        "--corpus",
        default=None,
        help="corpus to score (default: python-docs for causal LMs, fortunes for encoders)",
    )
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument(
        "--seq-len", type=int, default=512, help="window length in tokens (default: 512)"
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="window step (default: --seq-len, no overlap)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="windows per forward pass (default: 4); encoders embed 8x as many texts at once",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_EVAL_TOKENS,
        help=f"score only the first N tokens of the split; 0 = all (default: {DEFAULT_EVAL_TOKENS})",
    )
    parser.add_argument(
        "--dtype", choices=_DTYPES, default="float32", help="parameter dtype (default: float32)"
    )
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="also write the result as JSON here"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--harness", metavar="TASK[,TASK]", default=None,
        help="run lm-evaluation-harness tasks (rankwise_python_docs, rankwise_fortunes, or yours)",
    )
    parser.add_argument(
        "--harness-include", metavar="DIR", action="append", default=[],
        help="a folder of extra lm-eval task YAMLs (repeatable)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="--harness: score the first N documents per task"
    )
    parser.add_argument(
        "--num-fewshot", type=int, default=None, help="--harness: few-shot examples per prompt"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from rankwise.models import load_model, load_tokenizer, model_kind

    if args.harness:
        from rankwise.cli.eval_harness import run_harness

        return run_harness(args)
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens {args.max_tokens} is negative: pass N > 0, or 0 for all")
    start = time.perf_counter()
    model = load_model(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(args.model)
    load_s = time.perf_counter() - start
    kind = model_kind(model)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"{args.model}: {kind}, {params / 1e6:.1f}M parameters, loaded in {load_s:.1f} s")

    if kind == "causal-lm":
        result = _perplexity(model, tokenizer, args)
    else:
        result = _topics(model, tokenizer, args, kind)
    result.update(
        model=str(args.model), kind=kind, parameters=params, dtype=args.dtype, load_seconds=load_s
    )
    if args.json:
        from rankwise.io import write_json

        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _perplexity(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from rankwise.eval import DEFAULT_EVAL_TOKENS, evaluate_split

    corpus = args.corpus or "python-docs"
    result = evaluate_split(
        model,
        tokenizer,
        corpus,
        args.split,
        seq_len=args.seq_len,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens or None,
        progress=not args.no_progress,
    )
    print(
        f"perplexity on {corpus}/{args.split}: {result['perplexity']:.3f}  "
        f"({result['tokens']:,} tokens scored, seq_len {result['seq_len']}, stride {result['stride']}, "
        f"{result['seconds']:.1f} s, {result['tokens_per_s']:.0f} tokens/s)"
    )
    if args.max_tokens and result["stream_tokens"] >= args.max_tokens:
        which = "the default " if args.max_tokens == DEFAULT_EVAL_TOKENS else ""
        print(
            f"  scored the first {args.max_tokens:,} tokens of the split ({which}--max-tokens); "
            "pass --max-tokens 0 to score all of it"
        )
    return result


def _topics(model: Any, tokenizer: Any, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    from rankwise.data import load_topics, topic_names
    from rankwise.eval import classification_accuracy, topic_accuracy

    corpus = args.corpus or "fortunes"
    if corpus not in topic_names():
        raise ValueError(
            f"an {kind} model is scored on a topic corpus, not '{corpus}': pass --corpus "
            f"{' or '.join(topic_names())} (perplexity needs a causal LM)"
        )
    batch = max(8, args.batch_size * 8)
    start = time.perf_counter()
    if kind == "sequence-classification":
        data = load_topics(corpus, args.split)
        n_labels = getattr(model.config, "num_labels", None)
        if n_labels != len(data.label_names):
            raise ValueError(
                f"the model's head has {n_labels} labels but {corpus} has {len(data.label_names)}: "
                "evaluate a model fine-tuned on this corpus"
            )
        acc = classification_accuracy(model, tokenizer, data.texts, data.labels, batch_size=batch)
        result = {
            "corpus": corpus,
            "split": args.split,
            "accuracy": acc,
            "chance": 1 / len(data.label_names),
            "test_texts": len(data.texts),
            "method": "classification head",
        }
    else:
        result = topic_accuracy(model, tokenizer, corpus, test_split=args.split, batch_size=batch)
        result.update(
            split=args.split, method="nearest centroid of mean-pooled embeddings (train split)"
        )
    result["seconds"] = time.perf_counter() - start
    print(
        f"{corpus}/{args.split} topic accuracy: {result['accuracy']:.3f} "
        f"(chance {result['chance']:.3f}; {result['method']}; {result['seconds']:.1f} s)"
    )
    return result
