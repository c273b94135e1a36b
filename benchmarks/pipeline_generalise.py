"""Which calibration and which healing keep a shrunk model general? Side by side at 20 %.

SmolLM2-135M, `svd-llm-update` + `welore` (the pipeline's measured best at 20 %), no EoRA.
Perplexity x dense on the test split of every embedded domain (python-docs, fortunes,
devils-dictionary); a domain is *held out* when neither calibration nor healing read it.

1. Calibration of the training-free step (32 x 256 tokens each): python-docs (the old default),
   a mixture of python-docs + fortunes, and text sampled from the dense model (LLM-QAT's recipe).
2. Healing from the compressed model with the best worst-domain calibration, the same
   wall-clock budget each: distillation (KL + PELA feature MSE) on the mixture, distillation on
   teacher generations (data-free), the causal-LM loss on python-docs (the old default), and
   the causal-LM loss on the mixture.

    python benchmarks/pipeline_generalise.py --threads 2 --heal-minutes 3.5

Results (rewritten after every step): benchmarks/results/pipeline_generalise.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "pipeline_generalise"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--heal-minutes", type=float, default=0.0, help="wall-clock budget per healing (0: steps only)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="what --heal-minutes counts: CPU-minutes of this process (equal compute on a shared "
                        "machine, the default) or wall-clock minutes")
    p.add_argument("--heal-steps", type=int, default=20, help="steps per healing (equal work when the machine's "
                   "load varies; 0: minutes only)")
    p.add_argument("--method", default="svd-llm", help="compression method (svd-llm-update: the pipeline's at 20 %%)")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--teacher-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--heals", nargs="+", default=["distill-teacher", "distill-mixture", "lm-text", "lm-mixture"])
    p.add_argument("--calibrations", nargs="+", default=["python-docs", "mixture", "teacher"])
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write(out: Path, res: dict[str, Any]) -> None:
    from rankwise.io import write_json, write_text

    write_json(out / f"{NAME}.json", res)
    write_text(out / f"{NAME}.md", render(res))


def _row(label: str, ppl: dict[str, float], dense: dict[str, float], used: list[str], extra: str = "") -> str:
    cells = []
    for d in dense:
        x = ppl[d] / dense[d]
        cells.append(f"{x:.2f}" + ("" if d not in used else " (seen)"))
    held = [ppl[d] / dense[d] for d in dense if d not in used]
    worst = f"**{max(held):.2f}**" if held else "-"
    return f"| {label} | {worst} | " + " | ".join(cells) + f" | {extra} |"


def render(res: dict[str, Any]) -> str:
    dense = res["dense"]
    doms = list(dense)
    head = "| | worst held-out | " + " | ".join(doms) + " | |\n|---|---|" + "---|" * len(doms) + "---|"
    lines = [f"# Keeping a shrunk model general: calibration and healing side by side ({res['ratio']:.0%} removed)",
             "", res["machine"], "",
             f"SmolLM2-135M, {res['method']} + welore, no EoRA. Perplexity x dense on each domain's test split "
             f"(first {res['eval_tokens']} tokens, 512-token windows); dense: "
             + ", ".join(f"{d} {v:.2f}" for d, v in dense.items())
             + ". (seen) = the domain was read by calibration or healing; worst held-out = the largest ratio among "
             "the other domains.", "", "## Calibration of the training-free step (32 x 256 tokens)", "", head]
    for c in res.get("calibration", []):
        lines.append(_row(c["calibration"], c["domains"], dense, c["used"], f"{c['seconds']:.0f} s"))
    if res.get("teacher"):
        t = res["teacher"]
        lines += ["", f"Teacher text: {t['n']} x {t['seq_len']} tokens sampled from the dense model "
                  f"(random first token, {t['greedy']} greedy, then sampled) in {t['seconds']:.0f} s, cached."]
    if res.get("heal"):
        unit = "CPU-min" if res.get("clock") == "cpu" else "min wall"
        budget = (f"{res['heal_steps']} steps of 4 x 256 tokens" if res.get("heal_steps") else
                  f"{res['heal_minutes']:g} {unit}") + " each"
        lines += ["", f"## Healing, the same budget ({budget}), from the compressed model calibrated on "
                  f"{res['heal_start']}", "", head]
        for h in res["heal"]:
            extra = (f"{h['steps']} steps, {h['tokens']:,} tokens, {h['seconds'] / 60:.1f} min wall, "
                     f"{h['cpu_seconds'] / 60:.1f} CPU-min, "
                     f"loss {h['loss_first']:.3f} -> {h['loss_last']:.3f}")
            lines.append(_row(h["label"], h["domains"], dense, h["used"], extra))
    if res.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in res["notes"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    import rankwise
    from rankwise.compress import compress_
    from rankwise.data.domains import mixture_batches, mixture_windows
    from rankwise.data.teacher import GREEDY_TOKENS, teacher_sequences
    from rankwise.pipeline.distill import MIXTURE, distill_loss_fn, lm_loss_fn, teacher_batches
    from rankwise.pipeline.healing import heal_
    from rankwise.pipeline.measure import domain_perplexities

    args.out.mkdir(parents=True, exist_ok=True)
    dense = rankwise.load_model("smollm2-135m").eval()
    tok = rankwise.load_tokenizer("smollm2-135m")
    load = os.getloadavg()[0]
    res: dict[str, Any] = {
        "ratio": args.ratio, "eval_tokens": args.eval_tokens, "heal_minutes": args.heal_minutes,
        "heal_steps": args.heal_steps, "method": args.method, "clock": args.clock,
        "machine": f"Machine: {platform.machine()} CPU ({os.cpu_count()} cores, shared with other jobs; load "
                   f"average {load:.2f} at the start), {torch.get_num_threads()} torch threads, torch "
                   f"{torch.__version__}. The machine was shared with other jobs, so each healing gets the "
                   "same budget of this process's CPU time (or equal steps), and reports wall and CPU time.",
        "calibration": [], "heal": [], "notes": []}
    log("dense per-domain perplexity")
    res["dense"] = domain_perplexities(dense, tok, args.eval_tokens)
    write(args.out, res)
    log(f"dense {res['dense']}; sampling teacher text")
    t = time.perf_counter()
    seqs = teacher_sequences(dense, args.teacher_samples, 256, seed=0,
                             progress=lambda d, n: log(f"teacher text {d}/{n}"))
    res["teacher"] = {"n": args.teacher_samples, "seq_len": 256, "greedy": GREEDY_TOKENS,
                      "seconds": time.perf_counter() - t,
                      "sample": tok.decode(seqs[0, :60].tolist())}
    calibs = {"python-docs": (None, ["python-docs"]),
              "mixture": (mixture_windows(MIXTURE, tok, 32, 256, seed=0), list(MIXTURE)),
              "teacher": (seqs[:32], [])}
    calibs = {k: v for k, v in calibs.items() if k in args.calibrations}
    models = {}
    for label, (ids, used) in calibs.items():
        log(f"compress, calibration {label}")
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        compress_(model, args.method, args.ratio, allocation="welore", calibration=ids, tokenizer=tok,
                  progress=False)
        sec = time.perf_counter() - t
        ppl = domain_perplexities(model, tok, args.eval_tokens)
        res["calibration"].append({"calibration": label, "used": used, "domains": ppl, "seconds": sec})
        models[label] = model
        write(args.out, res)
        log(f"  {ppl}")

    def worst_held(row: dict[str, Any]) -> float:
        held = [row["domains"][d] / res["dense"][d] for d in res["dense"] if d not in row["used"]]
        return max(held) if held else float("inf")

    start = min(res["calibration"], key=worst_held)
    res["heal_start"] = start["calibration"]
    base = models[start["calibration"]]
    del models
    heals = {
        "distill-teacher": ("distill (KL + feature MSE) on teacher text", "distill", []),
        "distill-mixture": ("distill (KL + feature MSE) on the mixture", "distill", list(MIXTURE)),
        "lm-text": ("causal LM on python-docs (old default)", "lowrank", ["python-docs"]),
        "lm-mixture": ("causal LM on the mixture", "lowrank", list(MIXTURE)),
    }
    for key in args.heals:
        label, method, used = heals[key]
        used = sorted(set(used) | set(start["used"]))
        log(f"heal: {label}")
        model = copy.deepcopy(base)
        if key == "distill-teacher":
            batches = teacher_batches(seqs, 4, seed=0)
        elif key == "lm-text":
            batches = mixture_batches(["python-docs"], tok, 4, 256, seed=0)
        else:
            batches = mixture_batches(MIXTURE, tok, 4, 256, seed=0)
        loss_fn = distill_loss_fn(dense, 1.0) if method == "distill" else lm_loss_fn()
        cpu, wall = time.process_time(), time.perf_counter()
        r = heal_(model, torch.empty(0, dtype=torch.long), method=method, minutes=args.heal_minutes,
                  max_steps=args.heal_steps or None, batches=batches, loss_fn=loss_fn, seed=0,
                  clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        ppl = domain_perplexities(model, tok, args.eval_tokens)
        res["heal"].append({"key": key, "label": label, "used": used, "domains": ppl, "steps": r.steps,
                            "tokens": r.tokens, "seconds": wall, "loss_first": r.loss_first,
                            "loss_last": r.loss_last, "lr": r.lr, "load_after": os.getloadavg()[0],
                            "cpu_seconds": cpu})
        write(args.out, res)
        log(f"  {r.steps} steps: {ppl}")
        del model
    print(json.dumps(res["heal"], indent=1))


if __name__ == "__main__":
    main()
