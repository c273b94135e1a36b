"""Benchmark rankwise.compress on the bundled real models; writes benchmarks/results/compress.*.

SmolLM2-135M: perplexity on the embedded python-docs test split after removing 10/20/30/40 % of
the block linears' parameters, for every method (lord, fwsvd, asvd, svd-llm, afm) x allocation
(uniform, budget, welore, dynamic; + energy for svd-llm), SVD-LLM's closed-form update
(svd-llm-update, svd-llm-seq), EoRA compensation (of int4/int8 quantisation, 2:4 pruning and of
plain-SVD truncation), compression time and forward latency. MiniLM-L6: embedding cosine
similarity to the dense model and fortunes nearest-centroid accuracy at the same ratios.

Statistics are captured once (Grams shared by q/k/v and gate/up) and every method's SVDs are
computed once and reused across ratios and allocations (`compress_(..., compressor=c)`).

    .venv/bin/python benchmarks/compress.py                 # full run
    .venv/bin/python benchmarks/compress.py --quick         # 20 % only, fewer methods
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lord", "fwsvd", "asvd", "svd-llm", "afm")
ALLOCATIONS = ("uniform", "budget", "welore", "dynamic")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--fisher-samples", type=int, default=8, help="sequences for FWSVD's squared gradients")
    p.add_argument("--update-samples", type=int, default=16, help="sequences for SVD-LLM's update (reference: 16)")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--latency-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=int(os.environ.get("RANKWISE_BENCH_THREADS", "0")) or None,
                   help="torch threads (default: torch's); 1 is far faster on a contended machine")
    p.add_argument("--quick", action="store_true", help="20 %% only, svd-llm/lord, no MiniLM grid")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- SmolLM2
def smollm(args: argparse.Namespace) -> dict[str, Any]:
    import rankwise
    from rankwise.compress import build_compressor, compensate_, compress_, find_targets
    from rankwise.compress.api import _capture, calibration_ids
    from rankwise.eval import evaluate_split
    from rankwise.surgery import replaced, restore

    t0 = time.perf_counter()
    model = rankwise.load_model("smollm2-135m")
    tok = rankwise.load_tokenizer("smollm2-135m")
    log(f"SmolLM2 loaded in {time.perf_counter() - t0:.1f}s")
    targets = find_targets(model)
    originals = dict(targets)
    ids, calib = calibration_ids(model, None, tok, n_samples=args.calib_samples, seq_len=args.calib_seq_len)

    def ppl() -> float:
        return evaluate_split(model, tok, max_tokens=args.eval_tokens, seq_len=args.eval_seq_len,
                              progress=False)["perplexity"]

    batch = ids[:4]

    t = time.perf_counter()
    stats = _capture(model, ids, targets, ("gram", "mean", "abs_mean"), batch_size=8, progress=False, loss_fn=None)
    capture_s = time.perf_counter() - t
    log(f"statistics of {len(targets)} layers from {ids.numel()} tokens in {capture_s:.1f}s")
    fisher_s = 0.0
    methods = ("lord", "svd-llm") if args.quick else METHODS
    if "fwsvd" in methods:
        t = time.perf_counter()
        grads = _capture(model, ids[: args.fisher_samples], targets, ("sq_grad",), batch_size=4,
                         progress=False, loss_fn=None)
        fisher_s = time.perf_counter() - t
        for f, g in grads.items():
            stats[f].sq_grad, stats[f].n_batches = g.sq_grad, g.n_batches
        log(f"squared gradients from {args.fisher_samples} sequences in {fisher_s:.1f}s")

    dense_ppl = ppl()
    log(f"dense perplexity {dense_ppl:.3f}")
    ratios = [0.2] if args.quick else args.ratios
    rows: list[dict[str, Any]] = []

    def record(name: str, allocation: str, ratio: float, report: Any, seconds: float, **extra: Any) -> None:
        p = ppl()
        row = {"method": name, "allocation": allocation, "ratio": ratio, "perplexity": p,
               "ppl_vs_dense": p / dense_ppl, "ratio_targets": report.ratio_targets,
               "ratio_model": report.ratio_model, "dense_layers": len(report.layers) - report.n_factorized,
               "compress_s": seconds, **extra}
        rows.append(row)
        log(f"{name:<15}{allocation:<9}{ratio:.2f}  ppl {p:10.2f} ({p / dense_ppl:8.2f}x)  removed "
            f"{report.ratio_targets:.3f} targets / {report.ratio_model:.3f} model  {seconds:.1f}s")

    for method in methods:
        comp = build_compressor(method)
        t = time.perf_counter()
        for f in targets:
            comp.observe_stats(f, stats[f])
            comp.spectrum(f, targets[f])  # fit: one SVD (or eigh) per layer, cached
        fit_s = time.perf_counter() - t
        allocations = ALLOCATIONS + (("energy",) if method == "svd-llm" else ())
        for allocation in (("uniform",) if args.quick and method == "lord" else allocations):
            for ratio in ratios:
                t = time.perf_counter()
                rep = compress_(model, method, ratio, allocation=allocation, compressor=comp, progress=False)
                record(method, allocation, ratio, rep, time.perf_counter() - t + fit_s, fit_s=fit_s)
                restore(model, originals)
        del comp

    upd_ids = ids[: args.update_samples]
    sequential = (("svd-llm-update", "uniform", {}, ratios), ("svd-llm-seq", "welore", {}, ratios),
                  ("svd-llm-seq", "uniform", {}, [0.2]),
                  ("svd-llm-seq", "uniform", {"update_target": "original", "damping": 0.05}, [0.2]))
    for method, allocation, kw, grid in sequential:
        label = method + ("-orig" if kw.get("update_target") == "original" else "")
        for ratio in (r for r in ratios if r in grid):
            t = time.perf_counter()
            rep = compress_(model, method, ratio, allocation=allocation, calibration=upd_ids, stats=stats,
                            progress=False, **kw)
            record(label, allocation, ratio, rep, time.perf_counter() - t, update_tokens=int(upd_ids.numel()), **kw)
            restore(model, originals)

    # ---- EoRA: compensation of quantisation / pruning, and of our own truncation
    eora_rows = []
    for base, rank, comp_kind in (("int8", 0, "eora"), ("int4", 0, "eora"), ("int4", 32, "svd"),
                                  ("int4", 32, "eora"), ("2:4", 0, "eora"), ("2:4", 64, "svd"),
                                  ("2:4", 64, "eora")):
        if args.quick and base == "int8":
            continue
        t = time.perf_counter()
        rep = compensate_(model, base, rank, compensation=comp_kind, stats=stats, block_size=64, progress=False)
        seconds = time.perf_counter() - t
        p = ppl()
        eora_rows.append({"base": base, "rank": rank, "compensation": comp_kind if rank else "none",
                          "perplexity": p, "ppl_vs_dense": p / dense_ppl, "ratio_model": rep.ratio_model,
                          "compress_s": seconds})
        log(f"{base:<5} + {comp_kind if rank else 'none':<5} r={rank:<3} ppl {p:10.2f} ({p / dense_ppl:.2f}x)")
        restore(model, originals)
    for method, k in (("lord", 0), ("lord", 32), ("svd-llm", 0), ("svd-llm", 32)):
        t = time.perf_counter()
        rep = compress_(model, method, 0.2, compensation_rank=k, stats=stats, progress=False)
        seconds = time.perf_counter() - t
        p = ppl()
        eora_rows.append({"base": f"{method} 20%", "rank": k, "compensation": "eora" if k else "none",
                          "perplexity": p, "ppl_vs_dense": p / dense_ppl, "ratio_model": rep.ratio_model,
                          "compress_s": seconds})
        log(f"{method} 20% + eora r={k}: ppl {p:.2f} ({p / dense_ppl:.2f}x)")
        restore(model, originals)

    # ---- latency: uniform ranks give one structure for every method (timed with lord); the best
    # 20 % configuration's own structure too. Dense and compressed forwards are interleaved and
    # the medians compared, so that load from other processes hits both alike.
    lat_rows = []
    structures = [("lord", "uniform", r) for r in ratios]
    best = min((r for r in rows if r["ratio"] == 0.2), key=lambda r: r["perplexity"], default=None)
    if best and best["allocation"] != "uniform":
        structures.append(("svd-llm" if best["method"] not in METHODS else best["method"], best["allocation"], 0.2))
    for method, allocation, ratio in structures:
        rep = compress_(model, method, ratio, allocation=allocation, stats=stats, progress=False)
        compressed = {f: model.get_submodule(f) for f in targets}
        restore(model, originals)
        dense_t, comp_t = [], []
        with torch.inference_mode():
            model(batch)  # warm-up
            for _ in range(args.latency_repeats):
                t = time.perf_counter()
                model(batch)
                dense_t.append(time.perf_counter() - t)
                with replaced(model, compressed):
                    if not comp_t:
                        model(batch)  # warm-up
                    t = time.perf_counter()
                    model(batch)
                    comp_t.append(time.perf_counter() - t)
        d, c = statistics.median(dense_t), statistics.median(comp_t)
        label = "uniform ranks" if allocation == "uniform" else f"{method} + {allocation} ranks"
        lat_rows.append({"config": label, "ratio": ratio, "dense_ms": d * 1e3, "latency_ms": c * 1e3,
                         "latency_vs_dense": c / d, "ratio_model": rep.ratio_model})
        log(f"latency {label} {ratio:.2f}: {c * 1e3:.0f} ms vs dense {d * 1e3:.0f} ms ({c / d:.3f}x)")
    return {
        "dense": {"perplexity": dense_ppl},
        "calibration": calib | {"capture_s": capture_s, "fisher_samples": args.fisher_samples,
                                "fisher_s": fisher_s, "update_samples": args.update_samples},
        "eval": {"corpus": "python-docs", "split": "test", "tokens": args.eval_tokens,
                 "seq_len": args.eval_seq_len},
        "latency_batch": list(batch.shape),
        "grid": rows, "eora": eora_rows, "latency": lat_rows,
        "targets": {"layers": len(targets), "params": sum(m.weight.numel() for m in targets.values()),
                    "model_params": sum(p.numel() for p in model.parameters())},
    }


# ----------------------------------------------------------------------------- MiniLM
def minilm(args: argparse.Namespace) -> dict[str, Any]:
    import rankwise
    from rankwise.compress import build_compressor, compress_, find_targets
    from rankwise.compress.api import _capture, calibration_ids
    from rankwise.data import load_topics
    from rankwise.eval import embed, nearest_centroid_accuracy
    from rankwise.surgery import restore

    model = rankwise.load_model("minilm-l6")
    tok = rankwise.load_tokenizer("minilm-l6")
    targets = find_targets(model)
    originals = dict(targets)
    ids, calib = calibration_ids(model, None, tok, n_samples=args.calib_samples, seq_len=128)
    stats = _capture(model, ids, targets, ("gram", "mean", "abs_mean"), batch_size=8, progress=False, loss_fn=None)
    def split(name: str) -> tuple[list[str], list[int]]:
        d = load_topics("fortunes", name)
        return list(d.texts if hasattr(d, "texts") else d[0]), list(d.labels if hasattr(d, "labels") else d[1])

    (train, train_y), (test, test_y) = split("train"), split("test")

    def evaluate() -> tuple[torch.Tensor, float]:
        e_test = embed(model, tok, test)
        return e_test, nearest_centroid_accuracy(embed(model, tok, train), train_y, e_test, test_y)

    ref, dense_acc = evaluate()
    log(f"MiniLM dense fortunes accuracy {dense_acc:.3f}")
    rows = []
    configs = [(m, "uniform") for m in ("lord", "asvd", "svd-llm", "afm")]
    configs += [("svd-llm", a) for a in ("welore", "dynamic")]
    for method, allocation in configs:
        comp = build_compressor(method)
        for f in targets:
            comp.observe_stats(f, stats[f])
        for ratio in ([0.2] if args.quick else args.ratios):
            t = time.perf_counter()
            rep = compress_(model, method, ratio, allocation=allocation, compressor=comp, progress=False)
            seconds = time.perf_counter() - t
            emb, acc = evaluate()
            cos = (emb.double() * ref.double()).sum(-1)
            rows.append({"method": method, "allocation": allocation, "ratio": ratio,
                         "mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(),
                         "accuracy": acc, "ratio_targets": rep.ratio_targets, "ratio_model": rep.ratio_model,
                         "compress_s": seconds})
            log(f"MiniLM {method:<8}{allocation:<8}{ratio:.2f} cos {cos.mean():.4f} acc {acc:.3f} "
                f"removed {rep.ratio_targets:.3f}/{rep.ratio_model:.3f}")
            restore(model, originals)
    return {"dense_accuracy": dense_acc, "texts": len(test), "calibration": calib, "grid": rows,
            "note": "fwsvd is not run on MiniLM: a bare encoder has no training loss for the Fisher"}


# ----------------------------------------------------------------------------- reports
def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def markdown(res: dict[str, Any]) -> str:
    s = res["smollm2"]
    ratios = sorted({r["ratio"] for r in s["grid"]})
    lines = [
        "# rankwise.compress benchmark",
        "",
        f"Generated by `benchmarks/compress.py` on {res['machine']['platform']} with "
        f"{res['machine']['threads']} torch thread(s), torch {res['machine']['torch']}; total "
        f"{res['seconds'] / 60:.1f} min. `ratio` = fraction of parameters removed from the targeted "
        "layers (every linear of the 30 blocks; embeddings/head untouched); the model-level "
        "fraction is given alongside.",
        "",
        f"## SmolLM2-135M: perplexity / dense perplexity ({s['eval']['tokens']} tokens of the "
        f"python-docs test split, windows of {s['eval']['seq_len']}; dense = {s['dense']['perplexity']:.3f})",
        "",
        f"Calibration: {s['calibration']['n_samples']} x {s['calibration']['seq_len']} tokens of "
        f"python-docs train (seed 0), captured in {s['calibration']['capture_s']:.0f} s; FWSVD's "
        f"squared gradients from {s['calibration']['fisher_samples']} sequences; SVD-LLM updates "
        f"on {s['calibration']['update_samples']} sequences.",
        "",
        "| method | allocation | " + " | ".join(f"{r:.0%}" for r in ratios) + " | model removed at 20% | time at 20% (s) |",
        "|---|---|" + "---|" * len(ratios) + "---|---|",
    ]
    keys = []
    for r in s["grid"]:
        if (r["method"], r["allocation"]) not in keys:
            keys.append((r["method"], r["allocation"]))
    for key in keys:
        cells = {r["ratio"]: r for r in s["grid"] if (r["method"], r["allocation"]) == key}
        at20 = cells.get(0.2)
        tail = f" | {at20['ratio_model']:.1%} | {at20['compress_s']:.0f} |" if at20 else " | - | - |"
        body = " | ".join(fmt(cells[r]["ppl_vs_dense"]) + "x" if r in cells else "-" for r in ratios)
        lines.append(f"| {key[0]} | {key[1]} | {body}{tail}")
    best = min((r for r in s["grid"] if r["ratio"] == 0.2), key=lambda r: r["perplexity"])
    lat20 = [r for r in s["latency"] if r["ratio"] == 0.2]
    lines += [
        "",
        "## EoRA compensation (SmolLM2, perplexity / dense)",
        "",
        "| base compression | correction | rank | ppl | vs dense | model params removed |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["eora"]:
        lines.append(f"| {r['base']} | {r['compensation']} | {r['rank']} | {fmt(r['perplexity'])} | "
                     f"{fmt(r['ppl_vs_dense'])}x | {r['ratio_model']:.1%} |")
    lines += ["", "Quantised/pruned weights are simulated (stored dequantised); `ratio` counts parameters, "
              "so the EoRA paths show as a negative removal.", "",
              f"## Latency (forward of a {s['latency_batch'][0]} x {s['latency_batch'][1]} batch, "
              f"median of {res['settings']['latency_repeats']} interleaved with the dense model)", "",
              "| structure | ratio | model removed | dense (ms) | compressed (ms) | vs dense |",
              "|---|---|---|---|---|---|"]
    for r in s["latency"]:
        lines.append(f"| {r['config']} | {r['ratio']:.0%} | {r['ratio_model']:.1%} | {r['dense_ms']:.0f} | "
                     f"{r['latency_ms']:.0f} | {r['latency_vs_dense']:.3f} |")
    if "minilm" in res:
        m = res["minilm"]
        mr = sorted({r["ratio"] for r in m["grid"]})
        lines += ["", f"## MiniLM-L6: embedding cosine to dense / fortunes accuracy (dense {m['dense_accuracy']:.3f})",
                  "", "| method | allocation | " + " | ".join(f"{r:.0%}" for r in mr) + " |",
                  "|---|---|" + "---|" * len(mr)]
        mkeys = []
        for r in m["grid"]:
            if (r["method"], r["allocation"]) not in mkeys:
                mkeys.append((r["method"], r["allocation"]))
        for key in mkeys:
            cells = {r["ratio"]: r for r in m["grid"] if (r["method"], r["allocation"]) == key}
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(
                f"{cells[r]['mean_cosine']:.3f} / {cells[r]['accuracy']:.3f}" if r in cells else "-" for r in mr) + " |")
        lines += ["", m["note"] + "."]
    lines += [
        "",
        "## Goal check (20 % removed)",
        "",
        f"- best configuration: **{best['method']} + {best['allocation']}**: perplexity "
        f"{best['perplexity']:.2f} = **{best['ppl_vs_dense']:.2f}x** dense (goal <= 1.25x: "
        f"{'met' if best['ppl_vs_dense'] <= 1.25 else 'not met'}).",
    ]
    if lat20:
        worst = max(r["latency_vs_dense"] for r in lat20)
        parts = ", ".join("{:.3f}x ({})".format(r["latency_vs_dense"], r["config"]) for r in lat20)
        lines.append(f"- latency at 20 %: {parts} (goal <= 0.9x: {'met' if worst <= 0.9 else 'not met'}).")
    lines += ["", "![perplexity vs ratio](compress.png)", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    from rankwise._optional import require

    mpl = require("matplotlib", purpose="the perplexity-vs-ratio plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    s = res["smollm2"]
    fig, ax = plt.subplots(figsize=(9, 6))
    keys = []
    for r in s["grid"]:
        if (r["method"], r["allocation"]) not in keys:
            keys.append((r["method"], r["allocation"]))
    styles = {"uniform": "-", "budget": "--", "welore": ":", "dynamic": "-.", "energy": (0, (1, 4))}
    colors = dict(zip(sorted({k[0] for k in keys}), plt.cm.tab10.colors, strict=False))
    for key in keys:
        pts = sorted((r["ratio"], r["ppl_vs_dense"]) for r in s["grid"] if (r["method"], r["allocation"]) == key)
        if len(pts) < 2:
            continue
        ax.plot(*zip(*pts, strict=True), marker="o", linestyle=styles.get(key[1], "-"),
                color=colors[key[0]], label=f"{key[0]} / {key[1]}")
    ax.axhline(1.25, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of targeted parameters removed")
    ax.set_ylabel("perplexity / dense perplexity (log)")
    ax.set_title("SmolLM2-135M, python-docs test")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    res: dict[str, Any] = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                       "torch": torch.__version__, "cpus": os.cpu_count()},
                           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    res["smollm2"] = smollm(args)
    if not args.skip_minilm:
        res["minilm"] = minilm(args)
    res["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    from rankwise.io import write_json, write_text

    write_json(args.out / "compress.json", res)
    write_text(args.out / "compress.md", markdown(res))
    plot(res, args.out / "compress.png")
    log(f"wrote {args.out}/compress.{{json,md,png}} in {res['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
