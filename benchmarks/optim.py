"""Benchmark rankwise.optim against torch AdamW and galore-torch, side by side in one process.

Two parts (results in benchmarks/results/optim.{json,md,png}):

1. SmolLM2-135M (bundled, fp32), short sequences, a few steps: optimizer-state bytes (whole
   model, and over the projected attn/mlp matrices alone), peak RSS of the first step, the
   optimizer-step time, the time of one subspace refresh over every projected matrix (same
   gradients for every projector), the step time amortised over a refresh period
   T = 200 (``step + refresh / T``: T steps cannot run here), and the loss after N steps.
2. A tiny Llama trained from scratch on the bundled python-docs corpus (SmolLM2 tokenizer,
   ids remapped to the most frequent `VOCAB` tokens) for enough steps to see the curves
   separate: the loss curve of every optimizer (plotted), and the measurement of the Adam-moment
   policy on subspace change (keep / reproject / reset) that sets rankwise's default.

Rank is d/4 per matrix (``rank_fraction=0.25`` of min(m, n)); galore-torch gets one group per
distinct rank so it sees the same ranks. Run: ``.venv/bin/python benchmarks/optim.py``
(``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rankwise.optim as ro
from rankwise import profiling
from rankwise.io import write_json, write_text

RESULTS = Path(__file__).parent / "results"
T_AMORTISE = 200
RANK_FRACTION = 0.25
VOCAB = 2048
TARGETS: str | None = None  # None: every attn/mlp linear; --quick: a regex over two layers


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _projected(model: nn.Module) -> list[nn.Parameter]:
    groups = ro.param_groups(model, target_modules=TARGETS, rank_fraction=RANK_FRACTION)
    return groups[0]["params"]


def _galore_torch() -> Any:
    """galore-torch imports bitsandbytes at package import (works on CPU, with a warning)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        import galore_torch
    return galore_torch


def make_optimizers(lr_scale: float = 1.0) -> dict[str, Callable[[nn.Module], Any]]:
    """label -> factory(model) -> optimizer. Learning rates: each method's own default family
    (AdamW 1e-3-style, GaLore-style 1e-2 with scale 0.25), times `lr_scale`."""

    def torch_adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=2e-3 * lr_scale)

    def galore_torch(model):
        proj = _projected(model)
        ids = {id(p) for p in proj}
        by_rank: dict[int, list] = {}
        for p in proj:
            by_rank.setdefault(max(1, round(RANK_FRACTION * min(p.shape))), []).append(p)
        groups = [{"params": ps, "rank": r, "update_proj_gap": T_AMORTISE, "scale": 0.25,
                   "proj_type": "std"} for r, ps in by_rank.items()]
        groups.append({"params": [p for p in model.parameters() if id(p) not in ids]})
        return _galore_torch().GaLoreAdamW(groups, lr=1e-2 * lr_scale,
                                           no_deprecation_warning=True)

    def preset(name, lr=None, **kw):
        def build(model):
            extra = {"lr": lr * lr_scale} if lr is not None else {}
            if name != "apollo_mini":
                kw.setdefault("rank_fraction", RANK_FRACTION)
            return ro.create(name, model, update_proj_gap=T_AMORTISE, target_modules=TARGETS,
                             **extra, **kw)
        return build

    return {
        "torch AdamW": torch_adamw,
        "galore-torch GaLoreAdamW": galore_torch,
        "galore_adamw (svd)": preset("galore_adamw", lr=1e-2),
        "galore_adamw (randomized)": preset("galore_adamw", lr=1e-2, projector="randomized"),
        "galore_adamw (svd, int8 projector)": preset("galore_adamw", lr=1e-2, proj_bits=8),
        "galore_adafactor": preset("galore_adafactor", lr=1e-2),
        "galore_adamw8bit": preset("galore_adamw8bit", lr=1e-2),
        "q_galore_adamw8bit": preset("q_galore_adamw8bit", lr=1e-2),
        "fira": preset("fira", lr=1e-2),
        "frugal": preset("frugal", lr=2e-3),
        "apollo": preset("apollo", lr=1e-2),
        "apollo_mini": preset("apollo_mini", lr=1e-2),
        "dct_adamw": preset("dct_adamw", lr=2e-3),
    }


def _state_bytes(opt: Any, params: list[nn.Parameter]) -> int:
    return profiling.tensor_bytes([opt.state[p] for p in params if p in opt.state])


# ----------------------------------------------------------------------------- SmolLM2


def _refresh_times(model: nn.Module, batch: torch.Tensor, repeat: int) -> tuple[dict, float]:
    """Seconds for one refresh of every projected matrix, per projector, on the same grads.

    Every decoder layer has the same seven shapes, so the matrices of three layers (first,
    middle, last) are timed (median of `repeat`) and scaled by layers / 3. Returns
    (seconds per projector, the scale used).
    """
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    proj_ids = {id(p) for p in _projected(model)}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in proj_ids]
    layers = sorted({int(n.split("layers.")[1].split(".")[0]) for n, _ in named})
    sample = {layers[0], layers[len(layers) // 2], layers[-1]}
    mats = [p.grad.detach().clone() for n, p in named
            if int(n.split("layers.")[1].split(".")[0]) in sample]
    scale = len(layers) / len(sample)
    model.zero_grad(set_to_none=True)
    from galore_torch.galore_projector import GaLoreProjector

    def galore_torch_svd():
        for g in mats:
            rank = max(1, round(RANK_FRACTION * min(g.shape)))
            GaLoreProjector(rank, update_proj_gap=T_AMORTISE, proj_type="std").project(g, 0)

    def ours(kind, **opts):
        def run():
            for g in mats:
                rank = max(1, round(RANK_FRACTION * min(g.shape)))
                ro.make_projector(kind, tuple(g.shape), rank, **opts).update(g, 0)
        return run

    fns = {"galore-torch svd": galore_torch_svd, "svd": ours("svd"),
           "randomized": ours("randomized"), "randomized (power_iters=1)":
           ours("randomized", power_iters=1), "dct": ours("dct"), "random": ours("random"),
           "svd int8": ours("svd", bits=8), "svd int4 (q_galore)": ours("svd", bits=4)}
    # warm every code path once on one matrix (LAPACK/BLAS initialisation must not be billed to
    # whichever projector happens to be timed first), then time each over all matrices
    every = mats
    mats = every[:1]
    for fn in fns.values():
        fn()
    mats = every
    times = {k: profiling.time_fn(fn, warmup=0, repeat=repeat).median * scale
             for k, fn in fns.items()}
    return times, scale


def bench_smollm(steps: int, seq_len: int, batch_size: int, repeat: int) -> dict[str, Any]:
    from rankwise.data import load_corpus, pack_tokens
    from rankwise.models import load_model, load_tokenizer

    log = logging.getLogger(__name__)
    model = load_model("smollm2-135m")
    model.train()
    tok = load_tokenizer("smollm2-135m")
    rows = pack_tokens(load_corpus("python-docs", "train"), tok, seq_len,
                       max_tokens=seq_len * batch_size * (steps + 1) * 4)
    batches = [rows[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
    init = {k: v.clone() for k, v in model.state_dict().items()}
    projected = _projected(model)
    numel_proj = sum(p.numel() for p in projected)
    log.info("SmolLM2 loaded; timing refreshes")
    refresh, refresh_scale = _refresh_times(model, batches[0], repeat)
    log.info("refresh: %s", refresh)
    results: dict[str, Any] = {}
    # fine-tuning a pretrained model: 1/100 of the from-scratch learning rates
    for label, make in make_optimizers(lr_scale=0.01).items():
        log.info("SmolLM2: %s", label)
        model.load_state_dict(init)
        model.zero_grad(set_to_none=True)
        _trim()
        opt = make(model)

        def first_step(opt=opt):
            loss = model(input_ids=batches[0], labels=batches[0]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        losses = [profiling.peak_rss_of(first_step)]
        for b in batches[1:]:
            loss = model(input_ids=b, labels=b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append((float(loss.detach()), None))
        with torch.no_grad():
            final = float(model(input_ids=batches[0], labels=batches[0]).loss)
        # optimizer step time: the median of `repeat` steps on held gradients (no refresh
        # falls in them: the gap is 200), so a burst of load on the machine is not billed
        model(input_ids=batches[0], labels=batches[0]).loss.backward()
        step_s = profiling.time_fn(opt.step, warmup=1, repeat=repeat).median
        results[label] = {
            "state_bytes": profiling.optimizer_state_bytes(opt),
            "state_bytes_projected": _state_bytes(opt, projected),
            "peak_rss_first_step": losses[0][1],
            "step_s": step_s,
            "losses": [loss for loss, _ in losses],
            "loss_after": final,
        }
        opt.zero_grad(set_to_none=True)
        del opt
    adamw = results["torch AdamW"]
    peer_refresh = refresh["galore-torch svd"]
    which_refresh = {"galore-torch GaLoreAdamW": "galore-torch svd", "galore_adamw (svd)": "svd",
                     "galore_adamw (randomized)": "randomized", "galore_adafactor": "svd",
                     "galore_adamw8bit": "svd", "q_galore_adamw8bit": "svd int4 (q_galore)",
                     "galore_adamw (svd, int8 projector)": "svd int8",
                     "fira": "svd", "frugal": "svd", "apollo": "random", "apollo_mini": "random",
                     "dct_adamw": "dct"}
    peer = results["galore-torch GaLoreAdamW"]
    for label, r in results.items():
        kind = which_refresh.get(label)
        r["refresh_s"] = refresh[kind] if kind else 0.0
        r["amortised_step_s"] = r["step_s"] + r["refresh_s"] / T_AMORTISE
        r["state_ratio_vs_adamw"] = r["state_bytes"] / adamw["state_bytes"]
        r["state_ratio_projected_vs_adamw"] = r["state_bytes_projected"] / adamw[
            "state_bytes_projected"]
    for r in results.values():
        r["amortised_ratio_vs_galore_torch"] = r["amortised_step_s"] / peer["amortised_step_s"]
    return {
        "model": "smollm2-135m", "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
        "projected_params": numel_proj, "total_params": sum(p.numel() for p in model.parameters()),
        "refresh_s": refresh, "refresh_layer_scale": refresh_scale,
        "refresh_ratio_vs_galore_torch": {k: v / peer_refresh for k, v in refresh.items()},
        "optimizers": results,
    }


# ----------------------------------------------------------------------------- tiny Llama


def _tiny_data(seq_len: int, n_train: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """python-docs packed with the SmolLM2 tokenizer, remapped to the VOCAB - 1 most frequent
    ids (+ one id for the rest), so a small model has a small embedding."""
    from rankwise.data import load_corpus, pack_tokens
    from rankwise.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    train = pack_tokens(load_corpus("python-docs", "train"), tok, seq_len,
                        max_tokens=seq_len * n_train)
    val = pack_tokens(load_corpus("python-docs", "validation"), tok, seq_len,
                      max_tokens=seq_len * n_val)
    counts = torch.bincount(train.reshape(-1), minlength=tok.vocab_size)
    keep = counts.argsort(descending=True)[: VOCAB - 1]
    remap = torch.full((max(tok.vocab_size, int(train.max()) + 1, int(val.max()) + 1),),
                       VOCAB - 1)
    remap[keep] = torch.arange(VOCAB - 1)
    return remap[train], remap[val]


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def bench_tiny(steps: int, seq_len: int, batch_size: int, gap: int) -> dict[str, Any]:
    train, val = _tiny_data(seq_len, steps * batch_size, 64)
    global T_AMORTISE
    saved_gap, T_AMORTISE = T_AMORTISE, gap
    try:
        factories = make_optimizers()
        factories.pop("galore_adamw (svd, int8 projector)")  # a state-bytes row: SmolLM2 only
        for policy in ("reproject", "reset"):  # "keep" is the presets' own run above
            factories[f"galore_adamw moments={policy}"] = (
                lambda model, policy=policy: ro.create(
                    "galore_adamw", model, rank_fraction=RANK_FRACTION, update_proj_gap=gap,
                    moment_policy=policy, target_modules=TARGETS))
        for policy in ("reproject", "reset"):
            factories[f"dct_adamw moments={policy}"] = (
                lambda model, policy=policy: ro.create(
                    "dct_adamw", model, rank_fraction=RANK_FRACTION, update_proj_gap=gap,
                    moment_policy=policy, lr=2e-3, target_modules=TARGETS))
        results: dict[str, Any] = {}
        n_params = None
        for label, make in factories.items():
            model = _tiny_llama()
            model.train()
            n_params = sum(p.numel() for p in model.parameters())
            opt = make(model)
            curve, times = [], []
            for i in range(steps):
                ids = train[i * batch_size:(i + 1) * batch_size]
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
                curve.append(float(loss.detach()))
            with torch.no_grad():
                model.eval()
                val_loss = sum(float(model(input_ids=val[j:j + 16], labels=val[j:j + 16]).loss)
                               for j in range(0, len(val), 16)) / math.ceil(len(val) / 16)
            results[label] = {"curve": curve, "val_loss": val_loss,
                              "train_loss_last10": sum(curve[-10:]) / 10,
                              # median: robust to load bursts on a shared machine
                              "s_per_step": sorted(times)[len(times) // 2],
                              "state_bytes": profiling.optimizer_state_bytes(opt)}
            logging.getLogger(__name__).info("%s: val %.3f", label, val_loss)
    finally:
        T_AMORTISE = saved_gap
    return {"params": n_params, "vocab": VOCAB, "steps": steps, "seq_len": seq_len,
            "batch_size": batch_size, "update_proj_gap": gap, "optimizers": results}


# ----------------------------------------------------------------------------- 8-bit states


def bench_8bit(steps: int, shape: tuple[int, int] = (1536, 144)) -> dict[str, Any]:
    """Own blockwise int8 moments (rankwise.linalg.quant, sqrt(V) storage) vs torchao's
    AdamW8bit (dynamic-tree int8, the bitsandbytes map) vs fp32 AdamW on one matrix the size
    of a low-rank moment, with heavy-tailed gradients: update error and step time."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * torch.randn(shape, generator=gen).exp()
             for _ in range(steps)]

    def run(make):
        w = nn.Parameter(w0.clone())
        opt = make(w)
        times = []
        for g in grads:
            w.grad = g
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        return w.detach(), times, profiling.optimizer_state_bytes(opt)

    makers = {
        "fp32 AdamW (torch)": lambda w: torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0),
        "rankwise int8 (state_bits=8)": lambda w: ro.LowRankOptimizer(
            [w], lr=1e-3, state_bits=8, min_8bit_size=0, block_size=256),
    }
    try:
        from torchao.optim import AdamW8bit

        makers["torchao AdamW8bit"] = lambda w: AdamW8bit([w], lr=1e-3, weight_decay=0.0,
                                                            block_size=256)
    except ImportError:  # torchao is optional: the row is left out
        pass
    out: dict[str, Any] = {"shape": list(shape), "steps": steps}
    ref = None
    for label, make in makers.items():
        w, times, nbytes = run(make)
        if ref is None:
            ref = w
        rest = sorted(times[1:])
        out[label] = {
            "rel_error_vs_fp32": float((w - ref).norm() / (ref - w0).norm()),
            "step_s": rest[len(rest) // 2], "first_step_s": times[0], "state_bytes": nbytes}
    return out


# ----------------------------------------------------------------------------- report


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def report(res: dict[str, Any]) -> str:
    s = res["smollm2"]
    lines = [
        "# rankwise.optim benchmark", "",
        f"Machine: {res['machine']}. Rank d/4 per matrix (rank_fraction 0.25); "
        f"amortised step = step + refresh / {T_AMORTISE}.", "",
        f"## SmolLM2-135M ({s['steps']} steps, batch {s['batch_size']} x {s['seq_len']} "
        f"tokens; {s['projected_params'] / 1e6:.1f}M of {s['total_params'] / 1e6:.1f}M "
        "params projected)", "",
        "| optimizer | state MiB | x AdamW | projected-only x AdamW | peak RSS 1st step MiB "
        "| step s | refresh s | amortised s | x galore-torch | loss after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in s["optimizers"].items():
        lines.append(
            f"| {label} | {_mib(r['state_bytes'])} | {r['state_ratio_vs_adamw']:.3f} | "
            f"{r['state_ratio_projected_vs_adamw']:.3f} | {_mib(r['peak_rss_first_step'])} | "
            f"{r['step_s']:.3f} | {r['refresh_s']:.2f} | {r['amortised_step_s']:.3f} | "
            f"{r['amortised_ratio_vs_galore_torch']:.2f} | {r['loss_after']:.4f} |")
    lines += ["", "Refresh of every projected matrix (one subspace computation each):", "",
              "| projector | seconds | x galore-torch SVD |", "|---|---|---|"]
    for k, v in s["refresh_s"].items():
        lines.append(f"| {k} | {v:.3f} | {s['refresh_ratio_vs_galore_torch'][k]:.3f} |")
    t = res["tiny_llama"]
    lines += ["", f"## Tiny Llama from scratch ({t['params'] / 1e6:.1f}M params, vocab "
              f"{t['vocab']}, {t['steps']} steps, batch {t['batch_size']} x {t['seq_len']}, "
              f"refresh gap {t['update_proj_gap']})", "",
              "| optimizer | train loss (last 10) | val loss | s/step | state MiB |",
              "|---|---|---|---|---|"]
    for label, r in t["optimizers"].items():
        lines.append(f"| {label} | {r['train_loss_last10']:.3f} | {r['val_loss']:.3f} | "
                     f"{r['s_per_step']:.3f} | {_mib(r['state_bytes'])} |")
    e = res["state_8bit"]
    lines += ["", f"## 8-bit moments: own vs torchao ({e['steps']} AdamW steps on a "
              f"{e['shape'][0]}x{e['shape'][1]} matrix, heavy-tailed gradients)", "",
              "| variant | update error vs fp32 | step s (median) | first step s | state KiB |",
              "|---|---|---|---|---|"]
    for label, r in e.items():
        if isinstance(r, dict):
            lines.append(f"| {label} | {r['rel_error_vs_fp32']:.4f} | {r['step_s']:.4f} | "
                         f"{r['first_step_s']:.2f} | {r['state_bytes'] / 1024:.0f} |")
    lines += ["", "## Goals", ""] + [f"- {g}" for g in res["goals"]] + [""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    from rankwise._optional import require

    require("matplotlib", purpose="plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, r in res["tiny_llama"]["optimizers"].items():
        if "moments=" in label:
            continue
        curve = torch.tensor(r["curve"])
        k = 10
        smooth = torch.nn.functional.avg_pool1d(curve[None, None], k, 1).flatten()
        ax.plot(range(k - 1, len(curve)), smooth.tolist(), label=label, lw=1.3)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (moving average of 10)")
    ax.set_title("Tiny Llama from scratch: rankwise.optim vs torch AdamW and galore-torch")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def goals(res: dict[str, Any]) -> list[str]:
    s = res["smollm2"]
    opts = s["optimizers"]
    lines = []
    for label in ("galore_adamw (svd)", "galore_adamw (randomized)", "dct_adamw", "apollo",
                  "galore_adamw8bit", "q_galore_adamw8bit"):
        r = opts[label]["state_ratio_projected_vs_adamw"]
        lines.append(f"state over projected matrices, {label}: {r:.3f}x AdamW "
                     f"({'meets' if r <= 0.30 else 'misses'} <= 0.30)")
    for k in ("randomized", "randomized (power_iters=1)", "dct"):
        r = s["refresh_ratio_vs_galore_torch"][k]
        lines.append(f"refresh, {k}: {r:.3f}x galore-torch's SVD "
                     f"({'meets' if r <= 0.2 else 'misses'} <= 0.2)")
    tiny = res["tiny_llama"]["optimizers"]
    for family, keep in (("galore_adamw", "galore_adamw (svd)"), ("dct_adamw", "dct_adamw")):
        vals = {"keep": tiny[keep]["val_loss"]}
        vals.update({p: tiny[f"{family} moments={p}"]["val_loss"] for p in ("reproject", "reset")})
        best = min(vals, key=vals.get)
        lines.append(f"moment policy on subspace change, {family}: val loss "
                     + ", ".join(f"{k} {v:.3f}" for k, v in vals.items()) + f" -> best {best}")
    for label, r in opts.items():
        if label in ("torch AdamW", "galore-torch GaLoreAdamW"):
            continue
        x = r["amortised_ratio_vs_galore_torch"]
        lines.append(f"amortised step, {label}: {x:.2f}x galore-torch "
                     f"({'meets' if x <= 1.0 else 'misses'} <= 1)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not committed)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    global TARGETS
    if args.quick:
        TARGETS = r"model\.layers\.[01]\.(self_attn|mlp)\.\w+_proj"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if args.quick:
        smol = bench_smollm(steps=2, seq_len=16, batch_size=1, repeat=1)
        tiny = bench_tiny(steps=20, seq_len=32, batch_size=4, gap=10)
        q8 = bench_8bit(steps=10)
    else:
        smol = bench_smollm(steps=4, seq_len=64, batch_size=2, repeat=3)
        tiny = bench_tiny(steps=150, seq_len=64, batch_size=8, gap=50)
        q8 = bench_8bit(steps=100)
    res = {"machine": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "smollm2": smol, "tiny_llama": tiny, "state_8bit": q8}
    res["goals"] = goals(res)
    res["runtime_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "optim.json", res)
    write_text(args.out / "optim.md", report(res))
    plot(res, args.out / "optim.png")
    print(report(res))
    print(f"runtime {res['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
