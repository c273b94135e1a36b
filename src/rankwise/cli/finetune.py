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
(`rankwise.adapt.load_adapter` onto the base model), OUT/result.json the loss curve and metrics,
OUT/loss.png the curve; --log-dir writes TensorBoard scalars. Ctrl-C finishes the step, saves
and exits with 130. Several processes: `torchrun --nproc_per_node 2 --no-python rankwise
finetune ...` or `accelerate launch --multi_gpu --num_processes 2 --no_python rankwise
finetune ...` (--batch-size is the global batch; rank 0 writes; docs/distributed.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from rankwise.cli.pretrain import _key_values


def register(subparsers: Any) -> argparse.ArgumentParser:
    from rankwise.config import add_arguments
    from rankwise.finetune import FinetuneConfig

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model with an adapter method (LoRA, DoRA, PiSSA, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=FinetuneConfig.help_text("model"))
    # every other flag, default and help text comes from FinetuneConfig's fields
    add_arguments(p, FinetuneConfig)
    p.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help=FinetuneConfig.help_text("target_modules"))
    p.add_argument("--arg", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --arg alpha=16 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from rankwise.config import from_args
    from rankwise.finetune import FinetuneConfig

    targets = args.target_modules
    if targets is not None and len(targets) == 1 and (targets[0] == "all-linear"
                                                      or any(c in targets[0] for c in "*[(|\\")):
        targets = targets[0]  # one string: "all-linear" or a full-match regex
    return from_args(FinetuneConfig, args, target_modules=targets,
                     method_args=_key_values(args.arg, "--arg"))


def run(args: argparse.Namespace) -> int:
    from rankwise.adapt import list_methods
    from rankwise.finetune import finetune
    from rankwise.finetune.config import FULL
    from rankwise.train.dist import is_main

    if args.method not in (*list_methods(), FULL):
        raise ValueError(f"unknown method {args.method!r}: choose one of {list_methods()} or "
                         f"{FULL!r}")
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
    if not is_main():
        return 130 if result.interrupted else 0
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
    if result.interrupted:
        print(f"  interrupted: saved step {result.steps}; the same command with --resume "
              "continues it")
        return 130
    return 0
