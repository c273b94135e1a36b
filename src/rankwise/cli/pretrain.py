"""`rankwise pretrain`: train a tiny Llama from scratch on the embedded Python-docs corpus.

    rankwise pretrain --method sltrain --size llama-10m --steps 2000 --seq-len 256 \\
        --batch-size 8 --out runs/sltrain            # Ctrl-C, then the same line + --resume

Methods: full (AdamW), lora, relora, galore, fira, sltrain, lost, sst, maestro, trp (see
docs/pretrain.md). Checkpoints go to OUT/checkpoints/step-NNNNNN every --save-every steps and at
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
    from rankwise.train.config import METHODS
    from rankwise.train.llama import LLAMA_PRESETS

    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a tiny Llama with a memory-efficient method",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=METHODS, help="training method")
    p.add_argument("--size", default="llama-10m", choices=sorted(LLAMA_PRESETS),
                   help="model preset (default: llama-10m)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, result.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    p.add_argument("--steps", type=int, default=1000, help="optimizer updates (default: 1000)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per update (default: 8)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 3e-3; GaLore/Fira 1e-2)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables (default: 1.0)")
    p.add_argument("--rank", type=int, default=None, help="rank r (default: hidden / 4)")
    p.add_argument("--density", type=float, default=None,
                   help="sparsity level in (0, 1): SLTrain's fraction of entries (0.03), "
                        "LOST's fraction of channels (0.05)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA/ReLoRA/SLTrain alpha (32)")
    p.add_argument("--period", type=int, default=None,
                   help="steps between the method's periodic actions (ReLoRA restarts, GaLore "
                        "refreshes, SST resampling, TRP projections, Maestro shrinking)")
    p.add_argument("--vocab-limit", type=int, default=None,
                   help="keep only the N-1 most frequent train tokens (others share one id)")
    p.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer name or directory")
    p.add_argument("--corpus", default="python-docs", help="embedded corpus (default: python-docs)")
    p.add_argument("--eval-every", type=int, default=None, help="default: --steps / 10")
    p.add_argument("--eval-tokens", type=int, default=16_384,
                   help="validation tokens scored (default: 16384)")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint period in steps (default: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step as if interrupted (continue with --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-override", action="append", metavar="KEY=VALUE",
                   help="LlamaConfig field over the preset (repeatable)")
    for kind in ("layer", "schedule", "optimizer"):
        p.add_argument(f"--{kind}-option", action="append", metavar="KEY=VALUE",
                       help=f"extra keyword argument for the method's {kind} (repeatable)")
    p.add_argument("--no-export", action="store_true", help="do not write OUT/final")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from rankwise.train.config import PretrainConfig

    return PretrainConfig(
        method=args.method, size=args.size, out=args.out, steps=args.steps,
        seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, rank=args.rank, density=args.density, alpha=args.alpha,
        period=args.period, vocab_limit=args.vocab_limit, tokenizer=args.tokenizer,
        corpus=args.corpus, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        stop_after=args.stop_after, seed=args.seed,
        model_overrides=_key_values(args.model_override, "--model-override"),
        layer_options=_key_values(args.layer_option, "--layer-option"),
        schedule_options=_key_values(args.schedule_option, "--schedule-option"),
        optimizer_options=_key_values(args.optimizer_option, "--optimizer-option"),
        export=not args.no_export, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from rankwise.profiling import format_bytes
    from rankwise.train.loop import pretrain

    config = config_from_args(args)
    from rankwise.io import check_output

    check_output(args.out, flag="--out")  # writable, before any training step
    try:
        result = pretrain(config, resume=args.resume)
    except FloatingPointError as exc:
        raise ValueError(str(exc)) from None
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
    return 0
