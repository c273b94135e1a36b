"""Benchmark rankwise.pipeline.shrink on SmolLM2-135M; writes benchmarks/results/pipeline.*.

For each ratio (fraction of the block linears' parameters removed): the test-split perplexity
after each stage of `shrink` (compress with the measured best method + allocation, + EoRA
compensation inside the budget, + time-budgeted healing), next to uniform whitened SVD
(SVD-LLM's whitening, `method="svd-llm", allocation="uniform"`) computed in the same run on the
same calibration data, with wall time per stage and the exported model's latency vs dense.

    .venv/bin/python benchmarks/pipeline.py --threads 2                   # 10/20/30 %
    .venv/bin/python benchmarks/pipeline.py --ratios 0.2 --heal-minutes 3 --quick

Results are rewritten after every ratio, so a run that is stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
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
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.1, 0.3], help="run order (20 %% first)")
    p.add_argument("--heal-minutes", type=float, default=15.0, help="healing budget at 20 %%")
    p.add_argument("--heal-minutes-other", type=float, default=6.0, help="healing budget at the other ratios")
    p.add_argument("--heal-method", default=None, help="default: the library's")
    p.add_argument("--heal-data", default=None, help="text / teacher / mixture / auto (default: the library's)")
    p.add_argument("--heal-clock", choices=["wall", "cpu"], default="wall",
                   help="what the healing minutes count (cpu: this process's CPU time, for a shared machine)")
    p.add_argument("--heal-steps", type=int, default=None, help="also stop healing after this many steps")
    p.add_argument("--calibration", default=None, help="calibration source (default: the library's)")
    p.add_argument("--teacher-samples", type=int, default=128)
    p.add_argument("--method", default="auto", help="pin the compression method (skips the candidates)")
    p.add_argument("--allocation", default=None)
    p.add_argument("--no-compensation", action="store_true")
    p.add_argument("--no-baseline", action="store_true", help="skip uniform whitened SVD (saves CPU)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--compensation-ranks", type=int, nargs="+", default=[16, 32])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/rankwise-pipeline-bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="fewer eval tokens (smoke run)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other ratios already in the results JSON (rerun some ratios only)")
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def baseline(dense: Any, tok: Any, ratio: float, cache: dict[str, Any], eval_tokens: int) -> dict[str, Any]:
    """Uniform whitened SVD (SVD-LLM step 1) at `ratio`, on the same calibration statistics as
    the pipeline run (shared cache)."""
    from rankwise.compress import build_compressor, compress_
    from rankwise.pipeline.measure import decode_latency_vs, latency_vs, test_perplexity

    t = time.perf_counter()
    model = copy.deepcopy(dense)
    comp = build_compressor("svd-llm")
    for f, st in cache["calib"][2].items():
        comp.observe_stats(f, st)
    rep = compress_(model, "svd-llm", ratio, allocation="uniform", compressor=comp, progress=False)
    del comp
    seconds = time.perf_counter() - t
    ppl = test_perplexity(model, tok, eval_tokens)
    lat = latency_vs(model, dense)
    dec = decode_latency_vs(model, dense)
    return {"perplexity": ppl, "ratio_targets": rep.ratio_targets, "ratio_model": rep.ratio_model,
            "seconds": seconds, "latency_vs_dense": lat["latency_vs_dense"],
            "decode_latency_vs_dense": dec["latency_vs_dense"]}


def block_linear_share(dense: Any, tokens: int = 256, repeats: int = 9) -> dict[str, float]:
    """Fraction of one dense (1, tokens) forward spent in the block linears (the layers a ratio
    applies to), each timed alone on an input of its shape: the ceiling on the prefill speed-up
    that compressing them can give (share x fraction removed, at best)."""
    import statistics

    from rankwise.pipeline.measure import latency_vs

    def median_seconds(layer: torch.nn.Module, x: torch.Tensor) -> float:
        layer(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.inference_mode():
        linears = [m for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        block = sum(median_seconds(m, torch.randn(1, tokens, m.in_features)) for m in linears)
        head = median_seconds(dense.lm_head, torch.randn(1, tokens, dense.lm_head.in_features))
    whole = latency_vs(dense, dense, tokens=tokens, repeats=repeats)["dense_ms"] / 1e3
    return {"block_linears": block / whole, "lm_head": head / whole, "forward_ms": 1e3 * whole, "tokens": tokens}


def run_ratio(args: argparse.Namespace, dense: Any, tok: Any, ratio: float, cache: dict[str, Any]) -> dict[str, Any]:
    from rankwise.pipeline import shrink
    from rankwise.pipeline.report import domain_summary

    minutes = args.heal_minutes if abs(ratio - 0.2) < 1e-9 else args.heal_minutes_other
    log(f"ratio {ratio:.2f}: shrink with {minutes:g} min of healing")
    t = time.perf_counter()
    result = shrink(dense, ratio, out=args.work / f"r{int(round(ratio * 100))}", tokenizer=tok,
                    heal_minutes=minutes, eval_tokens=args.eval_tokens, heal_clock=args.heal_clock,
                    **{k: v for k, v in (("heal_method", args.heal_method), ("heal_data", args.heal_data)) if v},
                    compensation_ranks=tuple(args.compensation_ranks), progress=False, cache=cache,
                    heal_steps=args.heal_steps,
                    **({"calibration": args.calibration} if args.calibration is not None else {}),
                    teacher_samples=args.teacher_samples, method=args.method, allocation=args.allocation,
                    compensation=not args.no_compensation)
    total = time.perf_counter() - t
    s = result.stages
    d = s["dense"]["test_ppl"]
    if args.no_baseline:
        base = {"perplexity": float("nan"), "latency_vs_dense": float("nan"), "decode_latency_vs_dense": float("nan")}
    else:
        log(f"ratio {ratio:.2f}: uniform whitened SVD baseline")
        base = baseline(dense, tok, ratio, cache, args.eval_tokens)
        log(f"  baseline ppl {base['perplexity']:.3f}")
    row = {
        "ratio": ratio, "heal_minutes": minutes, "dense_ppl": d, "baseline": base | {"x_dense": base["perplexity"] / d},
        "method": s["compress"]["method"], "allocation": s["compress"]["allocation"],
        "candidates": s["compress"]["candidates"],
        "compensation": {k: s["compensate"].get(k) for k in ("used_rank", "layers_compensated", "variants")},
        "healing": s["heal"].get("training", {}) | {"kept": s["heal"].get("kept")},
        "stages": {k: {"test_ppl": s[k]["test_ppl"], "x_dense": s[k]["test_ppl"] / d,
                       "heldout_ppl": s[k]["heldout_ppl"], "seconds": s[k]["seconds"],
                       "ratio_targets": s[k]["ratio_targets"], "ratio_model": s[k]["ratio_model"]}
                   for k in ("compress", "compensate", "heal")},
        "export_seconds": s["export"]["seconds"], "latency": s["export"]["latency"],
        "decode_latency": s["export"]["decode_latency"],
        "reload_max_abs_diff": s["export"]["reload"]["max_abs_diff"], "total_seconds": total,
        "first_token_latency": s["export"].get("first_token_latency"), "fused_groups": s["export"].get("fused_groups"),
        "heal_data": s["heal"].get("data"), "domains_used": s["export"]["domains_used"],
        "domains": domain_summary(s, s["export"]["domains_used"]), "generations": s["export"].get("generations"),
    }
    log(f"  compress {row['stages']['compress']['x_dense']:.3f}x  + comp {row['stages']['compensate']['x_dense']:.3f}x"
        f"  + heal {row['stages']['heal']['x_dense']:.3f}x  (baseline {row['baseline']['x_dense']:.3f}x); "
        f"latency {row['latency']['latency_vs_dense']:.3f}x (decode {row['decode_latency']['latency_vs_dense']:.3f}x); "
        f"{total:.0f} s")
    return row


def _worst_held(r: dict[str, Any], key: str) -> tuple[str, float]:
    held = {d: v[key] for d, v in r["domains"].items() if v["held_out"] and v[key] is not None}
    if not held:
        return "-", float("nan")
    d = max(held, key=held.get)
    return d, held[d]


def goals(rows: list[dict[str, Any]], unit: str = "min") -> list[str]:
    """Issue 17's goals at 20 % (`unit`: what the healing budget counted)."""
    r20 = next((r for r in rows if abs(r["ratio"] - 0.2) < 1e-9), None)
    if r20 is None or "domains" not in r20:
        return []
    dh, healed = _worst_held(r20, "healed_x_dense")
    df, free = _worst_held(r20, "training_free_x_dense")
    ind = r20["domains"].get("python-docs", {}).get("healed_x_dense")
    dec = r20["decode_latency"]["latency_vs_dense"]
    steps = r20["healing"].get("steps", 0)
    return [
        f"| every held-out domain after <= 15 min healing <= 1.3x dense | worst {dh} {healed:.3f}x after "
        f"{r20['healing'].get('seconds', 0) / 60:.1f} {unit} ({steps} steps on the shared machine) | "
        f"{'met' if healed <= 1.3 else 'not met'} |",
        f"| every held-out domain training-free <= 3x dense | worst {df} {free:.3f}x | {'met' if free <= 3 else 'not met'} |",
        f"| in-domain (python-docs) after healing <= 1.1x | {ind:.3f}x | {'met' if ind <= 1.1 else 'not met'} |",
        f"| decode latency per token <= 0.85x dense | {dec:.3f}x (horizontal fusion, {r20.get('fused_groups')} groups) "
        f"| {'met' if dec <= 0.85 else 'not met'} |",
    ]


def domain_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per-domain perplexity x dense per ratio, the worst held-out domain first."""
    lines = ["## Perplexity x dense per domain (worst held-out domain first)", "",
             "| removed | domain | held out | training-free | after healing | dense ppl | read by |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for d, v in r.get("domains", {}).items():
            used = ", ".join(k for k in ("calibration", "healing") if v[k]) or "-"
            free, healed = v["training_free_x_dense"], v["healed_x_dense"]
            lines.append(f"| {r['ratio']:.0%} | {d} | {'yes' if v['held_out'] else 'no'} | {free:.3f}x "
                         f"| **{healed:.3f}x** | {v['dense_ppl']:.2f} | {used} |")
    return lines + [""]


def write(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from rankwise.io import write_json, write_text

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "pipeline.json", {"meta": meta, "rows": rows})
    rows = sorted(rows, key=lambda r: r["ratio"])
    lines = [
        "# rankwise.pipeline benchmark: `shrink` on SmolLM2-135M",
        "",
        f"Machine: {meta['machine']}, {meta['threads']} torch threads, torch {meta['torch']}; load average "
        f"{meta.get('load_average', '?')} when it started (other jobs slow the wall times; latency ratios are "
        f"interleaved medians), OMP_WAIT_POLICY {meta.get('omp_wait_policy', '?')}. Perplexity on the embedded python-docs test split "
        f"(first {meta['eval_tokens']} tokens, 512-token windows); decisions on the validation split. "
        "`ratio` = fraction of the block linears' parameters removed (the whole-model fraction is in the JSON).",
        "",
        *domain_lines(rows),
        "## python-docs perplexity after each stage (x dense)",
        "",
        "| removed | dense ppl | uniform whitened SVD | compress | + compensation | + healing (min) | chosen "
        "| prefill latency vs dense (uniform) | decode latency vs dense (uniform) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stages"]
        comp = r["compensation"]
        lines.append(
            f"| {r['ratio']:.0%} | {r['dense_ppl']:.3f} | {r['baseline']['perplexity']:.2f} ({r['baseline']['x_dense']:.2f}x) "
            f"| {st['compress']['test_ppl']:.2f} ({st['compress']['x_dense']:.2f}x) "
            f"| {st['compensate']['test_ppl']:.2f} ({st['compensate']['x_dense']:.2f}x) "
            f"| {st['heal']['test_ppl']:.2f} ({st['heal']['x_dense']:.2f}x, {r['heal_minutes']:g}) "
            f"| {r['method']} + {r['allocation']}; EoRA {'rank ' + str(comp['used_rank']) + ' on ' + str(comp['layers_compensated']) + ' layers' if comp['used_rank'] else 'not used'} "
            f"| {r['latency']['latency_vs_dense']:.3f} ({r['baseline']['latency_vs_dense']:.3f}) "
            f"| {r['decode_latency']['latency_vs_dense']:.3f} ({r['baseline']['decode_latency_vs_dense']:.3f}) |")
    lines += ["", "## Wall time per stage (s)", "",
              "| removed | compress (all candidates) | compensation | healing | export (save, reload, latency) | total |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stages"]
        lines.append(f"| {r['ratio']:.0%} | {st['compress']['seconds']:.0f} | {st['compensate']['seconds']:.0f} "
                     f"| {st['heal']['seconds']:.0f} | {r['export_seconds']:.0f} | {r['total_seconds']:.0f} |")
    lines += ["", "## Candidates (held-out perplexity, validation split)", ""]
    for r in rows:
        cands = ", ".join(f"{c['method']} + {c['allocation']} {c['heldout_ppl']:.2f}" for c in r["candidates"])
        lines.append(f"- {r['ratio']:.0%}: {cands}")
    lines += ["", "## Healing", ""]
    unit = "CPU-min" if meta.get("heal_clock") == "cpu" else "min"
    for r in rows:
        h = r["healing"]
        if h.get("steps"):
            lines.append(f"- {r['ratio']:.0%}: {h['method']}, {h['steps']} steps, {h['tokens']:,} tokens in "
                         f"{h['seconds'] / 60:.1f} {unit} (budget {r['heal_minutes']:g} {unit}), lr {h['lr']:g}, "
                         f"{h['trainable']:,} trainable parameters, train loss {h['loss_first']:.3f} -> {h['loss_last']:.3f}")
    share = meta.get("latency_share")
    if share:
        lines += ["", "## Where prefill time goes (dense, 1 x 256 tokens)", "",
                  f"Block linears {share['block_linears']:.0%} of the forward, lm_head {share['lm_head']:.0%}, the "
                  f"rest (attention, norms, framework overhead) {1 - share['block_linears'] - share['lm_head']:.0%}. "
                  "Removing a fraction f of the block linears' parameters can cut prefill time by at most "
                  f"f x {share['block_linears']:.2f} if their time fell in proportion: "
                  + ", ".join(f"{r['ratio']:.0%} -> {1 - r['ratio'] * share['block_linears']:.3f}x" for r in rows) + "."]
    g = goals(rows, "CPU-min" if meta.get("heal_clock") == "cpu" else "min")
    if g:
        lines += ["", "## Goals (issue #17, 20 %)", "", "| goal | measured | |", "|---|---|---|", *g]
    for r in rows:
        if r.get("generations"):
            lines += ["", f"## Generations at {r['ratio']:.0%} (greedy, 20 tokens)", "", "| prompt | dense | shrunk |",
                      "|---|---|---|"]
            lines += ["| " + " | ".join(g[k].replace("|", "\\|").replace("\n", " ") for k in ("prompt", "dense", "shrunk"))
                      + " |" for g in r["generations"]]
    lines += ["", "![perplexity vs ratio](pipeline.png)", ""]
    if meta.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in meta["notes"]], ""]
    write_text(args.out / "pipeline.md", "\n".join(lines))
    plot(args.out / "pipeline.png", rows)


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    domains = list(rows[0].get("domains", {}))
    for i, d in enumerate(domains):
        held = rows[0]["domains"][d]["held_out"]
        tag = "held out" if held else "seen"
        ax.plot(x, [r["domains"][d]["training_free_x_dense"] for r in rows], "o--", color=f"C{i}",
                label=f"{d} ({tag}), training-free")
        ax.plot(x, [r["domains"][d]["healed_x_dense"] for r in rows], "o-", color=f"C{i}", label=f"{d}, healed")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("% of block-linear parameters removed")
    ax.set_ylabel("test perplexity / dense (per domain)")
    ax.set_title("rankwise shrink on SmolLM2-135M")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    args = parse()
    import logging

    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("rankwise.pipeline").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.eval_tokens = min(args.eval_tokens, 2048)
    import rankwise

    dense = rankwise.load_model("smollm2-135m")
    tok = rankwise.load_tokenizer("smollm2-135m")
    cache: dict[str, Any] = {}  # calibration statistics and SVDs, shared by every ratio
    meta = {"machine": f"{platform.machine()} CPU ({os.cpu_count()} cores)", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0], "eval_tokens": args.eval_tokens,
            "heal_method": args.heal_method or "default", "heal_data": args.heal_data or "default",
            "heal_clock": args.heal_clock, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_average": round(os.getloadavg()[0], 2), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "notes": []}
    if args.heal_clock == "cpu":
        meta["notes"].append("healing budgets count this process's CPU time (the machine was shared): "
                             "N CPU-minutes on 2 threads is what a quiet 2-core run does in N/2 to N minutes")
    if args.heal_minutes_other != args.heal_minutes:
        meta["notes"].append(f"healing budget {args.heal_minutes:g} min at 20 %, {args.heal_minutes_other:g} min at "
                             "the other ratios (to keep the whole run near an hour)")
    if tuple(args.compensation_ranks) != (16, 32):
        meta["notes"].append(f"EoRA ranks tried: {args.compensation_ranks} (library default 16, 32), to save time")
    meta["command"] = " ".join(sys.argv)
    meta["latency_share"] = block_linear_share(dense)
    log(f"block linears {meta['latency_share']['block_linears']:.1%} of a dense forward")
    rows: list[dict[str, Any]] = []
    if args.merge and (args.out / "pipeline.json").exists():
        import json

        old = json.loads((args.out / "pipeline.json").read_text())["rows"]
        rows = [r for r in old if all(abs(r["ratio"] - q) > 1e-9 for q in args.ratios)]
        if rows:
            meta["notes"].append("rows for " + ", ".join(f"{r['ratio']:.0%}" for r in rows)
                                 + " kept from an earlier run (--merge)")
    for ratio in args.ratios:
        rows.append(run_ratio(args, dense, tok, ratio, cache))
        write(args, meta, rows)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
