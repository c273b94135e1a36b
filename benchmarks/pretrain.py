"""Pretraining benchmark: every method trains the same tiny Llama on the same tokens.

All ten methods of `rankwise pretrain` (full-rank AdamW, LoRA, ReLoRA, GaLore, Fira, SLTrain,
LOST, SST, Maestro, TRP) train llama-10m from the same seeded initialisation on the same
python-docs token rows in the same order, for the same number of steps (so the same token
budget), one after the other in one process. Reported per method: validation perplexity on a
fixed prefix of the python-docs validation split, parameter counts (trainable / total, and the
attention + MLP part the methods change), weight + optimizer-state bytes (rankwise.profiling),
training tokens per second, and the loss curves (plot).

The vocabulary is SmolLM2's tokenizer limited to its 4096 most frequent train tokens (the rest
share one id; `--vocab-limit`): with all 49152 tokens the tied embedding holds 7.9M of the
10.4M parameters and the output head costs ~3.6x the rest of a step on CPU, so a run of a few
minutes would be mostly embedding training. These are short runs (default 64 steps of 8 x 128
tokens = 65,536 tokens per method, about a minute each on a busy 2-core machine, one torch
thread, which is steadier than two there): they rank how fast each method learns early on, not
where it converges. Tokens/s is the median over steps of (tokens per step / step time). Run:

    .venv/bin/python benchmarks/pretrain.py            # <= ~12 min on 2 busy CPU cores
    .venv/bin/python benchmarks/pretrain.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rankwise.io import write_json, write_text
from rankwise.train.llama import llama_config, parameter_breakdown
from rankwise.train.loop import METHODS, PretrainConfig, prepare_data, pretrain

RESULTS = Path(__file__).parent / "results"
LABELS = {"full": "full-rank AdamW", "lora": "LoRA", "relora": "ReLoRA", "galore": "GaLore",
          "fira": "Fira", "sltrain": "SLTrain", "lost": "LOST", "sst": "SST",
          "maestro": "Maestro", "trp": "TRP"}
# Controls and ablations: run key -> (method, config changes, label, in the default run).
# full_lr1e-2 separates GaLore/Fira's larger lr from their projection; the TRP / Maestro rows
# switch off one ingredient each (`--ablations`).
EXTRAS: dict[str, tuple[str, dict[str, Any], str, bool]] = {
    "full_lr1e-2": ("full", {"lr": 1e-2}, "full-rank AdamW, lr 1e-2 (control)", True),
    "trp_lam0": ("trp", {"schedule_options": {"lam": 0.0}},
                 "TRP without the nuclear-norm term (lam 0)", False),
    "trp_energy1": ("trp", {"schedule_options": {"energy": 1.0}},
                    "TRP without the projection (energy 1.0)", False),
    "maestro_lam0": ("maestro", {"schedule_options": {"lam": 0.0}},
                     "Maestro without the group lasso (lam 0)", False),
}


def _config(method: str, args: argparse.Namespace, **changes: Any) -> PretrainConfig:
    return PretrainConfig(method=method, **changes, size=args.size, steps=args.steps,
                          seq_len=args.seq_len, batch_size=args.batch_size,
                          vocab_limit=args.vocab_limit,
                          eval_every=max(1, args.steps // 4), eval_tokens=args.eval_tokens,
                          progress=not args.no_progress, seed=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    base = _config("full", args)
    data, _ = prepare_data(base)
    logging.getLogger(__name__).info("data ready in %.1f s", time.perf_counter() - start)
    dense = parameter_breakdown(llama_config(args.size, vocab_size=data.vocab_size))
    runs: dict[str, Any] = {}
    plan = []
    for key in args.runs:
        if key in EXTRAS:
            method, changes, label, _ = EXTRAS[key]
        elif key in LABELS:
            method, changes, label = key, {}, LABELS[key]
        else:
            raise SystemExit(f"unknown run {key!r}: choose from {sorted(LABELS) + sorted(EXTRAS)}")
        plan.append((key, method, changes, label))
    for key, method, changes, label in plan:
        gc.collect()
        config = _config(method, args, **changes)
        t0 = time.perf_counter()
        result = pretrain(config, data=data)
        per_step = config.batch_size * config.seq_len
        tail = result.losses[-10:]
        runs[key] = {
            "label": label,
            "val_perplexity": result.val_perplexity,
            "final_train_loss": sum(tail) / len(tail),
            "parameters": result.parameters,
            "memory": result.memory,
            "tokens": result.tokens,
            "tokens_per_s": result.tokens_per_s,
            "median_tokens_per_s": per_step / statistics.median(result.step_seconds),
            "train_seconds": result.train_seconds,
            "wall_seconds": time.perf_counter() - t0,
            "rank": config.resolved_rank,
            "period": config.resolved_period,
            "lr": config.resolved_lr,
            "schedule_runs": {k: len(v) for k, v in result.schedule_runs.items()},
            "val": result.val,
            "losses": result.losses,
        }
        print(f"{key:12s} ppl {result.val_perplexity:9.2f}  "
              f"loss {runs[key]['final_train_loss']:.3f}  {result.tokens_per_s:7.0f} tok/s  "
              f"{time.perf_counter() - t0:5.1f} s", flush=True)
    return {
        "settings": {"size": args.size, "steps": args.steps, "seq_len": args.seq_len,
                     "batch_size": args.batch_size, "tokens_per_method": base.tokens,
                     "vocab_limit": data.vocab_size, "tokenizer": base.tokenizer,
                     "train_rows": int(data.train.shape[0]), "eval_tokens": int(data.val.numel()),
                     "warmup_steps": base.resolved_warmup, "min_lr_ratio": base.min_lr_ratio,
                     "threads": torch.get_num_threads(), "torch": torch.__version__},
        "dense_model": dense,
        "runs": runs,
        "total_seconds": time.perf_counter() - start,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def markdown(report: dict[str, Any]) -> str:
    s, runs, dense = report["settings"], report["runs"], report["dense_model"]
    order = sorted((k for k in runs if k in LABELS), key=lambda m: runs[m]["val_perplexity"])
    extras = [k for k in EXTRAS if k in runs]
    full = runs.get("full")
    merged = report.get("merged_seconds")
    took = f"{report['total_seconds'] / 60:.1f} min" + (
        f" (plus {merged / 60:.1f} min for rows added later with `--merge`)" if merged else "")
    lines = [
        "# Pretraining benchmark: ten methods, one token budget",
        "",
        f"{s['size']} ({dense['non_embedding']:,} attention + MLP + norm parameters; embedding "
        f"{dense['embedding']:,} with the vocabulary limited to {s['vocab_limit']} tokens of "
        f"SmolLM2's tokenizer), trained from the same seeded initialisation on the same "
        f"python-docs rows in the same order: **{s['steps']} steps x {s['batch_size']} x "
        f"{s['seq_len']} tokens = {s['tokens_per_method']:,} tokens per method**. Validation "
        f"perplexity on the first {s['eval_tokens']:,} tokens of the python-docs validation "
        f"split (same limited vocabulary). These are **short runs** on {s['threads']} CPU "
        f"thread(s) (torch {s['torch']}); the run took {took}. Generated by "
        "`benchmarks/pretrain.py`.",
        "",
        "| # | method | val ppl | train loss (last 10) | params total | trainable | attn+MLP "
        "(trainable) | weights MiB | optimizer MiB | weights+opt vs full | tokens/s* |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, m in enumerate(order, 1):
        r = runs[m]
        p, mem = r["parameters"], r["memory"]
        ratio = f"{mem['total'] / full['memory']['total']:.2f}x" if full else "-"
        lines.append(
            f"| {i} | {r['label']} | {r['val_perplexity']:.1f} | {r['final_train_loss']:.3f} | "
            f"{p['total']:,} | {p['trainable']:,} | {p['attn_mlp']:,} "
            f"({p['attn_mlp_trainable']:,}) | {_mib(mem['weights'])} | {_mib(mem['optimizer'])} "
            f"| {ratio} | {r['median_tokens_per_s']:,.0f} |"
        )
    if extras and full:
        lines += ["", "Controls and ablations (same data, steps and seed; dashed in the plot):", "",
                  "| run | val ppl | vs full-rank AdamW | train loss (last 10) | tokens/s* |",
                  "|---|---|---|---|---|"]
        for k in extras:
            r = runs[k]
            lines.append(f"| {r['label']} | {r['val_perplexity']:.1f} | {_rel(runs, k)} | "
                         f"{r['final_train_loss']:.3f} | {r['median_tokens_per_s']:,.0f} |")
    lines += [
        "",
        "\\* tokens/s: median over the steps of batch tokens / step wall time (evaluation "
        f"excluded), {s['threads']} torch thread(s) on a machine shared with other jobs: "
        "compare ratios, not absolute values. Parameters count each tensor once (the tied "
        "embedding / output head once); weights include frozen tensors and buffers "
        "(ReLoRA/LoRA's frozen W0, SST's frozen singular vectors, SLTrain's int32 support).",
        "",
        "Settings per method (rank r = hidden / 4 = 40 unless noted; `period` = steps between the "
        "method's periodic action):",
        "",
        "| method | lr | rank | period | periodic actions run |",
        "|---|---|---|---|---|",
    ]
    for m in [*LABELS, *extras]:
        if m not in runs:
            continue
        r = runs[m]
        acts = ", ".join(f"{k} x{v}" for k, v in r["schedule_runs"].items()) or "-"
        width = "full width" if m.startswith("maestro") else "-"
        rank = r["rank"] if r["rank"] is not None else width
        lines.append(f"| {r['label']} | {r['lr']:g} | {rank} | {r['period'] or '-'} | {acts} |")
    lines += ["", "![loss curves](pretrain.png)", "", "## Reading the numbers", ""]
    lines += observations(report, order)
    return "\n".join(lines) + "\n"


def _rel(runs: dict[str, Any], key: str, ref: str = "full") -> str:
    """`key`'s perplexity relative to `ref`'s, as a signed percentage."""
    ratio = runs[key]["val_perplexity"] / runs[ref]["val_perplexity"] - 1
    return f"{ratio:+.0%}"


def observations(report: dict[str, Any], order: list[str]) -> list[str]:
    """Sentences comparing the measured ordering with the seed papers' (numbers from `report`)."""
    runs = report["runs"]
    place = {m: i + 1 for i, m in enumerate(order)}
    tokens = report["settings"]["tokens_per_method"]
    out = [f"- Measured order (best first): {', '.join(runs[m]['label'] for m in order)}. "
           "One seed per method, so gaps of a few percent are not resolved; perplexity "
           "relative to full-rank AdamW: "
           + ", ".join(f"{runs[m]['label']} {_rel(runs, m)}" for m in order if m != "full")
           + "."]
    if not {"full", "lora", "galore"} <= set(runs):
        return out
    out.append(
        "- The seed papers (GaLore, SLTrain, LOST, SST: 60M-7B parameters, billions of tokens) "
        "find full-rank best, SLTrain/LOST/Fira/SST close behind and plain low-rank clearly "
        f"worst. Here full-rank AdamW places {place['full']} of {len(order)} and LoRA "
        f"{place['lora']}. After {tokens:,} tokens (loss still falling steeply, see the plot) "
        "every model is in the early phase that the embedding, the norms and the first few "
        "dominant directions of each weight govern; the capacity limit that separates the "
        "methods in the papers (r (m + n) trainable entries per layer for LoRA, a dropped "
        "gradient residual for GaLore) binds only later. This ordering is therefore about "
        "early speed, and it would need runs 100-1000x longer to test the papers' claim."
    )
    if "full_lr1e-2" in runs:
        ctrl, full = runs["full_lr1e-2"]["val_perplexity"], runs["full"]["val_perplexity"]
        if ctrl >= full:
            why = ("so the larger step size alone does not explain GaLore/Fira's lead. A "
                   "candidate is the projected update itself: Adam's per-coordinate "
                   "normalisation applied in the gradient's top-r singular basis (refreshed "
                   "every period) moves all dominant directions of a weight at a similar rate, "
                   "a whitening that could speed the early phase (our reading, not tested here "
                   "and not a claim of the papers)")
        else:
            why = "so part of GaLore/Fira's lead is their larger step size"
        out.append(
            "- Learning rate: GaLore and Fira run their preset lr 1e-2 (scale 0.25 on the "
            "projected update; the embedding and norms get plain AdamW at 1e-2) against 3e-3 "
            f"for the AdamW-trained methods. The control, full-rank AdamW at lr 1e-2, reaches "
            f"{ctrl:.1f} against {full:.1f} at 3e-3 and GaLore's "
            f"{runs['galore']['val_perplexity']:.1f}, {why}."
        )
    out += [
        "- LoRA and ReLoRA start from the same function as the full model (frozen random W0, "
        "B = 0) and train the embedding and norms fully, so early on they track full-rank "
        f"AdamW ({_rel(runs, 'lora')} and {_rel(runs, 'relora')} here) although each layer "
        "learns only r (m + n) parameters; ReLoRA's restarts re-warm the LR from 0 every "
        "period, which costs a little in a run this short. SST also starts from the full "
        "model's function (the SVD of the init) and trains every singular value plus r "
        "sampled vector pairs. SLTrain starts from small weights (B = 0 and a sparse random S "
        "on 3 % of the entries) and LOST from the SVD split of the random init (top-r part + "
        "5 % of the residual channels); both train under half of the parameters. Why SLTrain "
        "learns faster than full-rank early on is not established here (a smaller starting "
        "function is one candidate).",
    ]
    out.append(
        "- TRP and Maestro come from CNN training with SGD; here they run under AdamW. TRP "
        "projects every weight to its 0.99-energy rank after every step and adds the "
        "nuclear-norm subgradient lam U_k V_k^T (lam 3e-4); Maestro adds a self-distillation "
        "loss on a truncated forward and the hierarchical group lasso (lam 5e-3). AdamW "
        "normalises each entry's update, and after the first few steps the embedding's "
        "gradient is several times larger than all projections' together, whose per-entry "
        "loss gradients are then ~1e-5, the size of lam U_k V_k^T's entries (measured with this "
        "setup): the regulariser sets the direction of many entries and moves them at about lr "
        "per step toward smaller singular values / trailing ranks. Both also run fewer "
        "tokens/s (an SVD per layer per step; a second forward and a full-width d (m + n) > m n "
        "factorisation until shrinking, which a run this short never triggers)."
    )
    if {"trp", "trp_lam0", "trp_energy1", "maestro", "maestro_lam0"} <= set(runs):
        out.append(
            f"- Ablations (vs full-rank AdamW): TRP {_rel(runs, 'trp')}; without the nuclear "
            f"term {_rel(runs, 'trp_lam0')}; without the projection {_rel(runs, 'trp_energy1')}"
            f". Maestro {_rel(runs, 'maestro')}; without the group lasso "
            f"{_rel(runs, 'maestro_lam0')}."
        )
    out += [
        "- Memory: weights + optimizer state are counted from the tensors (rankwise.profiling); "
        "the GaLore family keeps dense weights but r (a + 2 b) optimizer floats per projected "
        "matrix instead of 2 m n; SLTrain/LOST halve both. Activations and gradients are not "
        "included.",
    ]
    speed = {k: runs[k]["median_tokens_per_s"] / runs["full"]["median_tokens_per_s"]
             for k in runs}
    out.append(
        "- Speed relative to full-rank AdamW (same process, same load): "
        + ", ".join(f"{runs[k]['label']} {speed[k]:.2f}x" for k in LABELS if k in runs
                    and k != "full")
        + "."
    )
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    from rankwise._optional import require

    require("matplotlib", purpose="the loss-curve plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    per_step = s["batch_size"] * s["seq_len"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(LABELS, plt.get_cmap("tab10").colors, strict=False))
    runs = report["runs"]
    dashes = iter(["--", ":", "-.", (0, (5, 1, 1, 1))])
    for key in [*LABELS, *EXTRAS]:  # extras: dashed, in the colour of their method
        if key not in runs:
            continue
        r = runs[key]
        color = colors[EXTRAS[key][0] if key in EXTRAS else key]
        style = next(dashes) if key in EXTRAS else "-"
        losses = r["losses"]
        k = 10
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        x = [(i + 1) * per_step for i in range(len(losses))]
        ax1.plot(x, smooth, linestyle=style, color=color, label=r["label"], lw=1.4)
        ax2.plot([v["step"] * per_step for v in r["val"]],
                 [math.log(v["perplexity"]) for v in r["val"]], linestyle=style, color=color,
                 marker="o", ms=3, label=r["label"], lw=1.4)
    ax1.set(xlabel="training tokens", ylabel="train loss (10-step moving average)",
            title="training loss")
    ax2.set(xlabel="training tokens", ylabel="log validation perplexity",
            title="validation (python-docs)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7.5, ncol=2, loc="upper right")
    fig.suptitle(f"{s['size']}, vocab {s['vocab_limit']}, {s['tokens_per_method']:,} tokens "
                 "per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="llama-10m")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-limit", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady timings on a shared machine)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="methods to run (default: all ten)")
    parser.add_argument("--ablations", action="store_true",
                        help="also run the TRP / Maestro ablations (not in the default run)")
    parser.add_argument("--only", default=None,
                        help="comma list of run keys to run instead (methods or extras)")
    parser.add_argument("--merge", action="store_true",
                        help="add the runs to the existing results/pretrain.json (same settings)")
    parser.add_argument("--quick", action="store_true", help="10 steps, results not written")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-json", action="store_true",
                        help="re-render pretrain.md and .png from results/pretrain.json")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="output folder (default: benchmarks/results)")
    args = parser.parse_args()
    if args.only is not None:
        args.runs = [k for k in args.only.split(",") if k]
    else:
        args.runs = [m for m in args.methods.split(",") if m]
        args.runs += [k for k, (_, _, _, default) in EXTRAS.items()
                      if (default or args.ablations) and not args.quick]
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.eval_tokens = 10, 2048
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.from_json:
        from rankwise.io import read_json

        report = read_json(args.out / "pretrain.json")
        write_text(args.out / "pretrain.md", markdown(report))
        plot(report, args.out / "pretrain.png")
        return
    report = run(args)
    if args.merge:
        from rankwise.io import read_json

        old = read_json(args.out / "pretrain.json")
        if old["settings"] != report["settings"]:
            raise SystemExit("--merge needs the settings of results/pretrain.json: "
                             f"{old['settings']} vs {report['settings']}")
        old["runs"].update(report["runs"])
        old["merged_seconds"] = old.get("merged_seconds", 0) + report["total_seconds"]
        report = old
    out = args.out if not args.quick else Path("/tmp/rankwise-pretrain-quick")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pretrain.json", report)
    write_text(out / "pretrain.md", markdown(report))
    plot(report, out / "pretrain.png")
    print(f"wrote {out}/pretrain.{{json,md,png}}")


if __name__ == "__main__":
    main()
