"""`rankwise pretrain`: train a tiny Llama from scratch on the embedded Python-docs corpus.

    rankwise pretrain --method sltrain --size llama-10m --steps 2000 --seq-len 256 \\
        --batch-size 8 --out runs/sltrain            # Ctrl-C, then the same line + --resume

Methods: full (AdamW), lora, galore, fira and the layer methods (relora, sltrain, lost, sst,
maestro, trp; see docs/pretrain.md). Ctrl-C finishes the step, saves a checkpoint and exits with
130. Several processes: `torchrun --nproc_per_node 2 --no-python rankwise pretrain ...` (rank 0
writes; --fsdp shards full/galore/fira with FSDP2; docs/distributed.md). --log-dir writes
TensorBoard scalars; OUT/loss.png is the loss curve.

Checkpoints go to OUT/checkpoints/step-NNNNNN every --save-every steps and at
the end; --resume continues bit-exactly from the newest one and refuses a checkpoint written
by another method or other settings. At the end OUT/result.json holds the loss curve, the
validation perplexities, parameter counts, weight + optimizer bytes and tokens/s, and
OUT/final a dense Hugging Face model (`rankwise eval OUT/final` scores it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """["rank=8", "name=x"] -> {"rank": 8, "name": "x"} (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}: e.g. {flag} hidden_size=64")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def register(subparsers: Any) -> argparse.ArgumentParser:
    from rankwise.config import add_arguments
    from rankwise.train.config import PretrainConfig, methods
    from rankwise.train.llama import LLAMA_PRESETS

    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a tiny Llama with a memory-efficient method",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # every flag, default and help text comes from PretrainConfig's fields
    add_arguments(p, PretrainConfig, defaults={"out": _REQUIRED})
    set_choices(p, method=methods(), size=sorted(LLAMA_PRESETS))
    p.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    p.add_argument("--model-override", action="append", metavar="KEY=VALUE",
                   help="LlamaConfig field over the preset (repeatable)")
    for kind in ("layer", "schedule", "optimizer"):
        p.add_argument(f"--{kind}-option", action="append", metavar="KEY=VALUE",
                       help=f"extra keyword argument for the method's {kind} (repeatable)")
    p.set_defaults(func=run)
    return p


_REQUIRED = object()


def set_choices(parser: argparse.ArgumentParser, **choices: Any) -> None:
    """Restrict generated flags to `choices` (names known only once registries are loaded), and
    make the flags whose default is the `_REQUIRED` marker required."""
    for action in parser._actions:
        if action.dest in choices:
            action.choices = list(choices[action.dest])
        if action.default is _REQUIRED:
            action.default, action.required = None, True


def config_from_args(args: argparse.Namespace) -> Any:
    from rankwise.config import from_args
    from rankwise.train.config import PretrainConfig

    return from_args(
        PretrainConfig, args,
        model_overrides=_key_values(args.model_override, "--model-override"),
        layer_options=_key_values(args.layer_option, "--layer-option"),
        schedule_options=_key_values(args.schedule_option, "--schedule-option"),
        optimizer_options=_key_values(args.optimizer_option, "--optimizer-option"),
    )


def run(args: argparse.Namespace) -> int:
    from rankwise.profiling import format_bytes
    from rankwise.train.dist import is_main
    from rankwise.train.loop import pretrain

    config = config_from_args(args)
    from rankwise.io import check_output

    check_output(args.out, flag="--out")  # writable, before any training step
    try:
        result = pretrain(config, resume=args.resume)
    except FloatingPointError as exc:
        raise ValueError(str(exc)) from None
    if not is_main():
        return 130 if result.interrupted else 0
    p, mem = result.parameters, result.memory
    state = "done" if result.completed else f"stopped at step {result.steps}/{config.steps}"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(f"pretrain {config.method} on {config.size}: {state}{resumed}")
    print(f"  tokens {result.tokens:,} ({result.tokens_per_s:,.0f} tokens/s), "
          f"final train loss {result.losses[-1]:.3f}, validation perplexity "
          f"{result.val_perplexity:.2f}")
    print(f"  parameters {p['total']:,} (trainable {p['trainable']:,}; attention+MLP "
          f"{p['attn_mlp']:,}, embedding {p['embedding']:,})")
    print(f"  memory: weights {format_bytes(mem['weights'])}, optimizer state "
          f"{format_bytes(mem['optimizer'])}")
    print(f"  checkpoint {result.checkpoint}; results {config.out}/result.json")
    if result.completed and config.export:
        print(f"  dense model {config.out}/final")
    if result.interrupted:
        print(f"  interrupted: saved step {result.steps}; the same command with --resume "
              "continues it")
        return 130
    return 0
