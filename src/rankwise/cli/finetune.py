"""`rankwise finetune`: fine-tune a model with an adapter method on an embedded task.

    rankwise finetune minilm-l6 --method lora --rank 8 --task fortunes --steps 300 \\
        --out runs/fortunes-lora                 # Ctrl-C, then the same line + --resume
    rankwise finetune smollm2-135m --method dora --rank 8 --task python-docs --steps 200 \\
        --target-modules q_proj v_proj --arg alpha=16 --out runs/docs-dora

Tasks: fortunes (MiniLM-style encoder + mean pooling + a trainable Linear head; test accuracy)
and python-docs (causal-LM domain adaptation; validation perplexity). Methods:
`rankwise.adapt.list_methods()`; method options go through --arg KEY=VALUE (JSON values).
Checkpoints (adapter + head + optimizer + scheduler + RNG + step, safetensors + JSON, written
atomically) go to OUT/checkpoints/step-NNNNNN every --save-every steps and at the end; --resume
continues bit-exactly and refuses other settings. OUT/adapter holds the trained adapter
(`rankwise.adapt.load_adapter` onto the base model), OUT/result.json the loss curve and metrics.
"""

from __future__ import annotations

import argparse
from typing import Any

from rankwise.cli.pretrain import _key_values


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model with an adapter method (LoRA, DoRA, PiSSA, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="bundled model name (minilm-l6, smollm2-135m) or a local HF dir")
    p.add_argument("--task", required=True, choices=["fortunes", "python-docs"])
    p.add_argument("--method", default="lora", help="adapter method (default: lora)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank r (default: 8)")
    p.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="layers to adapt (PEFT vocabulary: names, suffixes, a regex, all-linear; "
                        "default: the attention query and value projections)")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --arg alpha=16 (repeatable)")
    p.add_argument("--steps", type=int, default=100, help="optimizer updates (default: 100)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: fortunes 1e-3, python-docs 5e-4)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="fortunes: learning rate of the classification head (default: --lr)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per update (default: fortunes 16, python-docs 4)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: fortunes 64, python-docs 128)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables (default: 1.0)")
    p.add_argument("--train-tokens", type=int, default=131_072,
                   help="python-docs train tokens used (default: 131072)")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="python-docs validation tokens scored (default: 4096)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="fortunes test texts scored (default: all 463)")
    p.add_argument("--eval-every", type=int, default=None, help="default: --steps / 5")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint period in steps (default: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--out", default=None, help="output directory (checkpoints, adapter, result)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step as if interrupted (continue with --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from rankwise.finetune import FinetuneConfig

    targets = args.target_modules
    if targets is not None and len(targets) == 1 and (targets[0] == "all-linear"
                                                      or any(c in targets[0] for c in "*[(|\\")):
        targets = targets[0]  # one string: "all-linear" or a full-match regex
    return FinetuneConfig(
        model=args.model, task=args.task, method=args.method, rank=args.rank,
        target_modules=targets, method_args=_key_values(args.arg, "--arg"), steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, head_lr=args.head_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        train_tokens=args.train_tokens, eval_tokens=args.eval_tokens,
        eval_samples=args.eval_samples, seed=args.seed,
        out=args.out, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        stop_after=args.stop_after, eval_every=args.eval_every, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from rankwise.adapt import list_methods
    from rankwise.finetune import finetune

    if args.method not in list_methods():
        raise ValueError(f"unknown method {args.method!r}: choose one of {list_methods()}")
    config = config_from_args(args)
    if args.out:
        from rankwise.io import check_output

        check_output(args.out, flag="--out")  # writable, before any training step
    try:
        result = finetune(config, resume=args.resume)
    except FloatingPointError as exc:
        raise ValueError(str(exc)) from None
    except TypeError as exc:  # an unknown --arg, or a layer type the method cannot adapt
        raise ValueError(str(exc)) from None
    name = result.metric_name
    state = "done" if result.completed else f"stopped at step {result.steps}/{config.steps}"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"finetune {config.method} (rank {config.rank}) on {config.task}: {state}{resumed}")
    print(f"  trainable parameters {result.trainable_parameters:,} of "
          f"{result.total_parameters:,}; final train loss {result.history['losses'][-1]:.4f}")
    before = f"{result.initial_metric:.4g} -> " if result.initial_metric is not None else ""
    print(f"  {name}: {before}{result.metric:.4g}")
    if config.out:
        print(f"  checkpoint {result.checkpoint}; results {config.out}/result.json")
    return 0
