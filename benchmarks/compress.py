"""Benchmark rankwise.compress on the bundled real models; writes benchmarks/results/compress.*.

SmolLM2-135M: perplexity on the embedded python-docs test split after removing 10/20/30/40 % of
the block linears' parameters, for every method (lord, fwsvd, asvd, svd-llm, afm) x allocation
(uniform, budget, welore, dynamic; + energy for svd-llm), SVD-LLM's closed-form update
(svd-llm-update, svd-llm-seq), EoRA compensation (of int4/int8 quantisation, 2:4 pruning and of
plain-SVD truncation), compression time and forward latency. MiniLM-L6: embedding cosine
similarity to the dense model and fortunes nearest-centroid accuracy at the same ratios.

Statistics are captured once (Grams shared by q/k/v and gate/up) and every method's SVDs are
computed once and reused across ratios and allocations (`compress_(..., compressor=c)`).

    .venv/bin/python benchmarks/compress.py --threads 1                  # everything, one process

The committed results were produced in parallel processes (each ~4 GB of RAM: one process per
free 4 GB), each writing a partial JSON after every row, then merged (duplicates dropped):

    B=".venv/bin/python benchmarks/compress.py --threads 1 --eval-tokens 1024"
    $B --sections grid --methods svd-llm lord asvd --partial p1.json
    $B --sections grid --methods fwsvd afm --partial p5.json
    $B --sections latency eora minilm --partial p2.json
    $B --sections sequential --partial p3.json            # 20 % first; ~4 min a row on 1 thread
    $B --sections search --partial p4.json
    .venv/bin/python benchmarks/compress.py --merge p*.json
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


SECTIONS = ("grid", "sequential", "search", "eora", "latency", "minilm")


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
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="parts to run (default all); run several processes with --partial, then --merge")
    p.add_argument("--partial", type=Path, default=None,
                   help="write only this JSON (updated after every row) instead of compress.{json,md,png}")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="combine --partial JSONs into compress.{json,md,png} and exit")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="one-shot methods of the grid section (split them across processes)")
    p.add_argument("--seq-methods", nargs="+", default=["svd-llm-seq", "svd-llm-update"],
                   choices=["svd-llm-seq", "svd-llm-update"], help="block-wise methods of the sequential section")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- SmolLM2
class Smol:
    """SmolLM2 with its calibration statistics, dense perplexity and row recording."""

    def __init__(self, args: argparse.Namespace, res: dict[str, Any], save: Any) -> None:
        import rankwise
        from rankwise.compress import find_targets
        from rankwise.compress.calibration import calibration_ids
        from rankwise.compress.calibration import capture as _capture  # was compress.api._capture

        self.args, self.res, self.save = args, res, save
        t0 = time.perf_counter()
        self.model = rankwise.load_model("smollm2-135m")
        self.tok = rankwise.load_tokenizer("smollm2-135m")
        log(f"SmolLM2 loaded in {time.perf_counter() - t0:.1f}s")
        self.targets = find_targets(self.model)
        self.originals = dict(self.targets)
        self.ids, calib = calibration_ids(self.model, None, self.tok, n_samples=args.calib_samples,
                                          seq_len=args.calib_seq_len)
        t = time.perf_counter()
        self.stats = _capture(self.model, self.ids, self.targets, ("gram", "mean", "abs_mean"), batch_size=8,
                              progress=False, loss_fn=None)
        capture_s = time.perf_counter() - t
        log(f"statistics of {len(self.targets)} layers from {self.ids.numel()} tokens in {capture_s:.1f}s")
        self.dense_ppl = self.ppl()
        log(f"dense perplexity {self.dense_ppl:.3f}")
        res.update({
            "dense": {"perplexity": self.dense_ppl},
            "calibration": calib | {"capture_s": capture_s, "fisher_samples": args.fisher_samples,
                                    "update_samples": args.update_samples},
            "eval": {"corpus": "python-docs", "split": "test", "tokens": args.eval_tokens,
                     "seq_len": args.eval_seq_len},
            "targets": {"layers": len(self.targets),
                        "params": sum(m.weight.numel() for m in self.targets.values()),
                        "model_params": sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())},
        })

    def ppl(self) -> float:
        from rankwise.eval import evaluate_split

        return evaluate_split(self.model, self.tok, max_tokens=self.args.eval_tokens,
                              seq_len=self.args.eval_seq_len, progress=False)["perplexity"]

    def restore(self) -> None:
        from rankwise.surgery import restore

        restore(self.model, self.originals)

    def record(self, table: str, name: str, allocation: str, ratio: float, report: Any, seconds: float,
               **extra: Any) -> dict[str, Any]:
        p = self.ppl()
        row = {"method": name, "allocation": allocation, "ratio": ratio, "perplexity": p,
               "ppl_vs_dense": p / self.dense_ppl, "ratio_targets": report.ratio_targets,
               "ratio_model": report.ratio_model, "dense_layers": len(report.layers) - report.n_factorized,
               "compress_s": seconds, **extra}
        self.res.setdefault(table, []).append(row)
        self.save()
        log(f"{name:<15}{allocation:<9}{ratio:.2f}  ppl {p:10.2f} ({p / self.dense_ppl:8.2f}x)  removed "
            f"{report.ratio_targets:.3f} targets / {report.ratio_model:.3f} model  {seconds:.1f}s")
        return row

    def fitted(self, method: str, stats: Any = None, damping: float | None = None) -> tuple[Any, float]:
        """A compressor fitted on the (given) statistics with every layer's SVD cached."""
        from rankwise.compress import build_compressor

        stats = self.stats if stats is None else stats
        comp = build_compressor(method, damping=damping)
        t = time.perf_counter()
        for f in self.targets:
            comp.observe_stats(f, stats[f])
            comp.spectrum(f, self.targets[f])
        return comp, time.perf_counter() - t


def section_grid(s: Smol) -> None:
    """Every one-shot method x allocation x ratio on cached SVDs."""
    from rankwise.compress import compress_
    from rankwise.compress.calibration import capture as _capture  # was api._capture

    args = s.args
    if "fwsvd" in args.methods:
        t = time.perf_counter()
        grads = _capture(s.model, s.ids[: args.fisher_samples], s.targets, ("sq_grad",), batch_size=4,
                         progress=False, loss_fn=None)
        s.res["calibration"]["fisher_s"] = time.perf_counter() - t
        for f, g in grads.items():
            s.stats[f].sq_grad, s.stats[f].n_batches = g.sq_grad, g.n_batches
        log(f"squared gradients from {args.fisher_samples} sequences in {time.perf_counter() - t:.1f}s")
    for method in args.methods:
        comp, fit_s = s.fitted(method)
        for allocation in ALLOCATIONS + (("energy",) if method == "svd-llm" else ()):
            for ratio in args.ratios:
                t = time.perf_counter()
                rep = compress_(s.model, method, ratio, allocation=allocation, compressor=comp, progress=False)
                s.record("grid", method, allocation, ratio, rep, time.perf_counter() - t + fit_s, fit_s=fit_s)
                s.restore()
        del comp


def section_sequential(s: Smol) -> None:
    """SVD-LLM's block-by-block update (lstsq B) and the joint re-fit, with every allocation.

    20 % first, so that an interrupted run still has the goal ratio for every configuration.
    """
    from rankwise.compress import compress_

    comp, fit_s = s.fitted("svd-llm")  # spectra for the allocation, A for the lstsq update
    upd = s.ids[: s.args.update_samples]
    order = sorted(s.args.ratios, key=lambda r: (r != 0.2, r))
    for ratio in order:
        for method in s.args.seq_methods:
            for allocation in ALLOCATIONS:
                t = time.perf_counter()
                rep = compress_(s.model, method, ratio, allocation=allocation, calibration=upd,
                                compressor=comp, progress=False)
                s.record("sequential", method, allocation, ratio, rep, time.perf_counter() - t,
                         update_tokens=int(upd.numel()))
                s.restore()


def section_search(s: Smol) -> None:
    """Training-free variants at 20 %, most promising first: Gram damping (regularises the
    whitening), 2x the calibration tokens, EoRA inside the same budget, the original target."""
    from rankwise.compress import compress_
    from rankwise.compress.calibration import calibration_ids
    from rankwise.compress.calibration import capture as _capture  # was compress.api._capture

    ratio, upd = 0.2, s.ids[: s.args.update_samples]

    def run(method: str, allocation: str, comp: Any = None, extra_s: float = 0.0, **kw: Any) -> None:
        t = time.perf_counter()
        opts = {k: v for k, v in kw.items() if k in ("compensation_rank", "update_target", "damping")}
        calib = kw.pop("calibration", upd)
        rep = compress_(s.model, method, ratio, allocation=allocation, calibration=calib,
                        **({"compressor": comp} if comp is not None else {"stats": s.stats}),
                        progress=False, **opts)
        s.record("search", method, allocation, ratio, rep, time.perf_counter() - t + extra_s, **kw)
        s.restore()

    for damping in (1e-2, 1e-1):
        comp, fit_s = s.fitted("svd-llm", damping=damping)
        for allocation in ("welore", "uniform"):
            run("svd-llm", allocation, comp, fit_s, damping=damping)
        del comp
    n_big = 2 * s.args.calib_samples
    ids, _ = calibration_ids(s.model, None, s.tok, n_samples=n_big, seq_len=s.args.calib_seq_len, seed=1)
    t = time.perf_counter()
    big = _capture(s.model, ids, s.targets, ("gram",), batch_size=8, progress=False, loss_fn=None)
    cap_s = time.perf_counter() - t
    log(f"{ids.numel()} calibration tokens captured in {cap_s:.0f}s")
    comp, fit_s = s.fitted("svd-llm", stats=big)
    for allocation in ("welore", "uniform", "energy"):
        run("svd-llm", allocation, comp, fit_s + cap_s, calib_tokens=int(ids.numel()))
    run("svd-llm-seq", "welore", comp, fit_s + cap_s, calibration=ids[: 2 * len(upd)],
        calib_tokens=int(ids.numel()), update_tokens=int(2 * upd.numel()))
    del comp, big
    comp, fit_s = s.fitted("svd-llm")
    for allocation in ("welore", "uniform"):
        for k in (16, 64):
            run("svd-llm", allocation, comp, fit_s, compensation_rank=k)
    del comp
    run("lord", "uniform", compensation_rank=32)  # EoRA on plain SVD's own truncation error
    run("svd-llm-seq", "welore", update_target="original", damping=0.05)


def section_eora(s: Smol) -> None:
    """EoRA compensation of int8/int4 quantisation and 2:4 pruning, against plain SVD of the error."""
    from rankwise.compress import compensate_

    for base, rank, comp_kind in (("int8", 0, "eora"), ("int4", 0, "eora"), ("int4", 32, "svd"),
                                  ("int4", 32, "eora"), ("2:4", 0, "eora"), ("2:4", 64, "svd"),
                                  ("2:4", 64, "eora")):
        t = time.perf_counter()
        rep = compensate_(s.model, base, rank, compensation=comp_kind, stats=s.stats, block_size=64, progress=False)
        seconds = time.perf_counter() - t
        p = s.ppl()
        s.res.setdefault("eora", []).append({
            "base": base, "rank": rank, "compensation": comp_kind if rank else "none", "perplexity": p,
            "ppl_vs_dense": p / s.dense_ppl, "ratio_model": rep.ratio_model, "compress_s": seconds})
        s.save()
        log(f"{base:<5} + {comp_kind if rank else 'none':<5} r={rank:<3} ppl {p:10.2f} ({p / s.dense_ppl:.2f}x)")
        s.restore()


def section_latency(s: Smol) -> None:
    """Forward latency of each rank structure, interleaved with the dense model (medians).

    Latency depends only on the ranks: uniform ranks are one structure for every method (timed
    with lord); the svd-llm allocations at 20 % are also the structures of svd-llm-update/-seq
    with the same allocation (same ranks); EoRA inside the budget splits each rank in two paths.
    """
    from rankwise.compress import compress_
    from rankwise.surgery import replaced

    batch = s.ids[:4]
    s.res["latency_batch"] = list(batch.shape)
    structures = [("lord", "uniform", r, 0) for r in s.args.ratios]
    structures += [("svd-llm", a, 0.2, 0) for a in ("welore", "budget", "dynamic")]
    structures += [("svd-llm", "dynamic", 0.2, 16)]
    for method, allocation, ratio, k in structures:
        rep = compress_(s.model, method, ratio, allocation=allocation, stats=s.stats, compensation_rank=k,
                        progress=False)
        compressed = {f: s.model.get_submodule(f) for f in s.targets}
        s.restore()
        dense_t, comp_t = [], []
        with torch.inference_mode():
            s.model(batch)  # warm-up
            for _ in range(s.args.latency_repeats):
                t = time.perf_counter()
                s.model(batch)
                dense_t.append(time.perf_counter() - t)
                with replaced(s.model, compressed):
                    if not comp_t:
                        s.model(batch)  # warm-up
                    t = time.perf_counter()
                    s.model(batch)
                    comp_t.append(time.perf_counter() - t)
        d, c = statistics.median(dense_t), statistics.median(comp_t)
        label = "uniform ranks" if allocation == "uniform" else f"{allocation} ranks"
        label += f" + EoRA {k}" if k else ""
        s.res.setdefault("latency", []).append({
            "config": label, "ratio": ratio, "dense_ms": d * 1e3, "latency_ms": c * 1e3,
            "latency_vs_dense": c / d, "ratio_model": rep.ratio_model})
        s.save()
        log(f"latency {label} {ratio:.2f}: {c * 1e3:.0f} ms vs dense {d * 1e3:.0f} ms ({c / d:.3f}x)")


SMOL_SECTIONS = {"grid": section_grid, "sequential": section_sequential, "search": section_search,
                 "eora": section_eora, "latency": section_latency}


# ----------------------------------------------------------------------------- MiniLM
def minilm(args: argparse.Namespace) -> dict[str, Any]:
    import rankwise
    from rankwise.compress import build_compressor, compress_, find_targets
    from rankwise.compress.calibration import calibration_ids
    from rankwise.compress.calibration import capture as _capture  # was compress.api._capture
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
    configs = [(m, a) for m in ("lord", "asvd", "svd-llm", "afm") for a in ALLOCATIONS]
    for method, allocation in configs:
        if configs.index((method, allocation)) % len(ALLOCATIONS) == 0:
            comp = build_compressor(method)  # one fit (SVDs cached) per method
            for f in targets:
                comp.observe_stats(f, stats[f])
        for ratio in args.ratios:
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


def _keys(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for r in rows:
        if (r["method"], r["allocation"]) not in keys:
            keys.append((r["method"], r["allocation"]))
    return keys


def _variant(r: dict[str, Any]) -> str:
    parts = [f"{k}={r[k]}" for k in ("compensation_rank", "damping", "update_target", "calib_tokens",
                                     "update_tokens") if k in r]
    return ", ".join(parts) or "defaults"


def markdown(res: dict[str, Any]) -> str:
    s = res["smollm2"]
    table = s.get("grid", []) + s.get("sequential", [])
    ratios = sorted({r["ratio"] for r in table})
    m = res["machine"]
    lines = [
        "# rankwise.compress benchmark",
        "",
        f"Generated by `benchmarks/compress.py` on {m['platform']} ({m['cpus']} shared cores) with "
        f"{m['threads']} torch thread(s), torch {m['torch']}; sections run as separate processes "
        f"({', '.join(res.get('runs', []))}), total {res['seconds'] / 60:.0f} process-min. `ratio` = "
        "fraction of parameters removed from the targeted layers (every linear of the 30 blocks; "
        "embeddings/head untouched); the model-level fraction is given alongside.",
        "",
        f"## SmolLM2-135M: perplexity / dense perplexity ({s['eval']['tokens']} tokens of the "
        f"python-docs test split, windows of {s['eval']['seq_len']}; dense = {s['dense']['perplexity']:.3f})",
        "",
        f"Calibration: {s['calibration']['n_samples']} x {s['calibration']['seq_len']} tokens of "
        f"python-docs train (seed 0); FWSVD's squared gradients from "
        f"{s['calibration']['fisher_samples']} sequences; svd-llm-update / svd-llm-seq run block by "
        f"block on {s['calibration']['update_samples']} of the sequences. Time = compression time "
        "(one-shot methods: their SVD fit + the replacement).",
        "",
        "| method | allocation | " + " | ".join(f"{r:.0%}" for r in ratios) + " | model removed at 20% | time at 20% (s) |",
        "|---|---|" + "---|" * len(ratios) + "---|---|",
    ]
    for key in _keys(table):
        cells = {r["ratio"]: r for r in table if (r["method"], r["allocation"]) == key}
        at20 = cells.get(0.2)
        tail = f" | {at20['ratio_model']:.1%} | {at20['compress_s']:.0f} |" if at20 else " | - | - |"
        body = " | ".join(fmt(cells[r]["ppl_vs_dense"]) + "x" if r in cells else "-" for r in ratios)
        lines.append(f"| {key[0]} | {key[1]} | {body}{tail}")
    if s.get("search"):
        lines += ["", "## Training-free variants at 20 % removed (SmolLM2)", "",
                  "| method | allocation | variant | ppl | vs dense | model removed | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["search"]:
            lines.append(f"| {r['method']} | {r['allocation']} | {_variant(r)} | {fmt(r['perplexity'])} | "
                         f"{fmt(r['ppl_vs_dense'])}x | {r['ratio_model']:.1%} | {r['compress_s']:.0f} |")
    if s.get("eora"):
        lines += ["", "## EoRA compensation of quantisation / pruning (SmolLM2, perplexity / dense)", "",
                  "| base compression | correction | rank | ppl | vs dense | model params removed |",
                  "|---|---|---|---|---|---|"]
        for r in s["eora"]:
            lines.append(f"| {r['base']} | {r['compensation']} | {r['rank']} | {fmt(r['perplexity'])} | "
                         f"{fmt(r['ppl_vs_dense'])}x | {r['ratio_model']:.1%} |")
        lines += ["", "Quantised/pruned weights are simulated (stored dequantised); `ratio` counts "
                  "parameters, so the EoRA paths show as a negative removal."]
    if s.get("latency"):
        lines += ["", f"## Latency (forward of a {s['latency_batch'][0]} x {s['latency_batch'][1]} batch, "
                  f"median of {res['settings']['latency_repeats']} interleaved with the dense model)", "",
                  "Latency depends only on the ranks: a structure is shared by every method with that "
                  "allocation (svd-llm-seq + dynamic has the ranks of svd-llm + dynamic). Absolute times "
                  "depend on the shared machine's load (these runs: load average ~13 on 2 cores, so "
                  "~20x inflated); only the interleaved ratios mean something, and they are noisy.", "",
                  "| structure | ratio | model removed | dense (ms) | compressed (ms) | vs dense |",
                  "|---|---|---|---|---|---|"]
        for r in s["latency"]:
            lines.append(f"| {r['config']} | {r['ratio']:.0%} | {r['ratio_model']:.1%} | {r['dense_ms']:.0f} | "
                         f"{r['latency_ms']:.0f} | {r['latency_vs_dense']:.3f} |")
    if "minilm" in res:
        mm = res["minilm"]
        mr = sorted({r["ratio"] for r in mm["grid"]})
        lines += ["", f"## MiniLM-L6: mean embedding cosine to dense / fortunes accuracy (dense "
                  f"{mm['dense_accuracy']:.3f}, {mm['texts']} test texts)", "",
                  "| method | allocation | " + " | ".join(f"{r:.0%}" for r in mr) + " |",
                  "|---|---|" + "---|" * len(mr)]
        for key in _keys(mm["grid"]):
            cells = {r["ratio"]: r for r in mm["grid"] if (r["method"], r["allocation"]) == key}
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(
                f"{cells[r]['mean_cosine']:.3f} / {cells[r]['accuracy']:.3f}" if r in cells else "-" for r in mr) + " |")
        lines += ["", mm["note"] + "."]
    at20 = [r for r in table + s.get("search", []) if r["ratio"] == 0.2]
    lines += ["", "## Goal check (20 % removed)", ""]
    if at20:
        best = min(at20, key=lambda r: r["perplexity"])
        lines.append(f"- best training-free configuration: **{best['method']} + {best['allocation']}** "
                     f"({_variant(best)}): perplexity {best['perplexity']:.2f} = **{best['ppl_vs_dense']:.2f}x** "
                     f"dense (goal <= 1.25x: {'met' if best['ppl_vs_dense'] <= 1.25 else 'not met'}).")
    lat20 = [r for r in s.get("latency", []) if r["ratio"] == 0.2]
    if lat20:
        parts = ", ".join("{:.3f}x ({})".format(r["latency_vs_dense"], r["config"]) for r in lat20)
        lines.append(f"- latency at 20 %: {parts} (goal <= 0.9x).")
    missing = _missing(res)
    if missing:
        lines += ["", "**Incomplete run** (missing: " + "; ".join(missing) + "). Finish with the commands "
                  "in the module docstring of `benchmarks/compress.py` (`--sections ... --partial`, then `--merge`)."]
    lines += ["", "![perplexity vs ratio](compress.png)", ""]
    return "\n".join(lines)


def _missing(res: dict[str, Any]) -> list[str]:
    """What a merged result lacks against the full default grid."""
    s, out = res.get("smollm2", {}), []
    ratios = res["settings"]["ratios"]
    have = {(r["method"], r["allocation"], r["ratio"]) for r in s.get("grid", []) + s.get("sequential", [])}
    for method in (*METHODS, "svd-llm-seq", "svd-llm-update"):
        lost = [f"{a} {r:.0%}" for a in ALLOCATIONS for r in ratios if (method, a, r) not in have]
        if lost:
            out.append(f"{method}: " + (", ".join(lost) if len(lost) < 6 else f"{len(lost)} of {len(ALLOCATIONS) * len(ratios)} cells"))
    out += [name for name in ("search", "eora", "latency") if not s.get(name)]
    return out + ([] if "minilm" in res else ["minilm"])


def plot(res: dict[str, Any], path: Path) -> None:
    from rankwise._optional import require

    mpl = require("matplotlib", purpose="the perplexity-vs-ratio plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    s = res["smollm2"]
    table = s.get("grid", []) + s.get("sequential", [])
    allocs = list(dict.fromkeys(r["allocation"] for r in table))
    cols = min(3, len(allocs))
    rows = math.ceil(len(allocs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), sharey=True, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in table))
    colors = dict(zip(methods, plt.cm.tab10.colors, strict=False))
    for ax in axes.flat[len(allocs):]:
        ax.axis("off")
    for ax, alloc in zip(axes.flat, allocs, strict=False):
        for method in methods:
            pts = sorted((r["ratio"], r["ppl_vs_dense"]) for r in table
                         if r["method"] == method and r["allocation"] == alloc)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=colors[method], label=method)
        ax.axhline(1.25, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_title(f"allocation: {alloc}")
        ax.set_xlabel("fraction of targeted parameters removed")
        ax.grid(alpha=0.3, which="both")
    for row in axes:
        row[0].set_ylabel("perplexity / dense (log; dashed: 1.25x)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, python-docs test perplexity after compression")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_reports(res: dict[str, Any], out: Path) -> None:
    from rankwise.io import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compress.json", res)
    write_text(out / "compress.md", markdown(res))
    plot(res, out / "compress.png")
    log(f"wrote {out}/compress.{{json,md,png}}")


def _row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    skip = ("perplexity", "ppl_vs_dense", "compress_s", "fit_s", "dense_ms", "latency_ms", "latency_vs_dense",
            "ratio_targets", "ratio_model", "dense_layers")
    return tuple(sorted((k, str(v)) for k, v in r.items() if k not in skip))


def merge(paths: list[Path]) -> dict[str, Any]:
    """One result from several --partial JSONs (tables concatenated, first run's settings)."""
    from rankwise.io import read_json

    parts = [read_json(p) for p in paths]
    res = {k: v for k, v in parts[0].items() if k not in ("smollm2", "minilm", "seconds")}
    res["runs"], res["seconds"], res["smollm2"] = [], 0.0, {}
    for part in parts:
        res["runs"].append(" ".join(part["settings"]["sections"]))
        res["seconds"] += part.get("seconds", 0.0)
        for key, value in part.get("smollm2", {}).items():
            if isinstance(value, list) and key != "latency_batch":
                rows = res["smollm2"].setdefault(key, [])
                seen = {_row_key(r) for r in rows}
                rows.extend(r for r in value if _row_key(r) not in seen)  # a section run twice
            else:
                res["smollm2"].setdefault(key, value)
        if "minilm" in part:
            res["minilm"] = part["minilm"]
    return res


def main() -> int:
    args = parse()
    if args.merge:
        _write_reports(merge(args.merge), args.out)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    res: dict[str, Any] = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                       "torch": torch.__version__, "cpus": os.cpu_count()},
                           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    def save() -> None:
        if args.partial:
            from rankwise.io import write_json

            res["seconds"] = time.perf_counter() - start
            write_json(args.partial, res)

    smol = [n for n in args.sections if n in SMOL_SECTIONS]
    if smol:
        res["smollm2"] = {}
        s = Smol(args, res["smollm2"], save)
        for name in smol:
            log(f"section {name}")
            SMOL_SECTIONS[name](s)
        del s
    if "minilm" in args.sections:
        res["minilm"] = minilm(args)
    res["seconds"] = time.perf_counter() - start
    save()
    if not args.partial:
        res["runs"] = [" ".join(args.sections)]
        _write_reports(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
