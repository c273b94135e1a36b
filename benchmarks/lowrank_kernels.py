"""Benchmark: low-rank kernels on real data: matrix completion, calibration-token sampling, Scatterbrain.

One process, rankwise side by side with its peers; writes benchmarks/results/kernels.{json,md} and
kernels.png (+ kernels_camera.png). Sections (run all, or some with --only; results of sections not
run are kept from the previous kernels.json):

completion  rankwise.linalg.complete (AltMin, "exact" = JNS13 k x k solves, "robust" = Gu et al.
            sketch-preconditioned CG) vs fancyimpute's SoftImpute and IterativeSVD (same rank cap, same
            50-sweep cap) on (a) skimage.data.camera() with 50 % / 80 % of the pixels removed and
            (b) a log(1 + count) word x document matrix of the embedded python-docs corpus (train split:
            top 1000 words x 1000-word chunks) with 70 % of the entries held out. Metric: relative error
            ||pred - y|| / ||y|| on the held-out entries (mean fill given for scale) and wall time. Then the
            cost of one sweep vs |Omega| (k fixed) and vs k (|Omega| fixed) on a synthetic incoherent
            rank-k matrix, with log-log slopes (paper: robust ~ |Omega| k, exact ~ |Omega| k^2).
sampling    calibration-token selection (rankwise.linalg.sampling.select_calibration_tokens) for
            SVD-LLM whitening: per-layer inputs of SmolLM2-135M on a pool of python-docs train tokens;
            Grams from m sampled tokens (uniform vs ridge-leverage, equal m) -> (i) the whitened-SVD
            truncation loss ||(W - W')X||^2 / ||W X||^2 on held-out (validation) activations for 16
            linears, (ii) SmolLM2 perplexity (test split) after compress_(svd-llm) of every down_proj,
            and (iii) after compensate_(int4 + EoRA) of every down_proj, each with Grams from m tokens.
attention   Scatterbrain (rankwise.attention) on queries/keys/values captured from SmolLM2-135M on the
            python-docs test split: relative error of the attention output vs exact softmax at equal
            memory per query (window + features) against sparse-only (local window) and low-rank-only
            (Performer); perplexity with the approximation in all 30 layers; time and peak memory of
            one attention call vs sequence length (exact eager, torch SDPA, Scatterbrain).

    .venv/bin/python benchmarks/lowrank_kernels.py                 # everything (single-threaded, see below)
    .venv/bin/python benchmarks/lowrank_kernels.py --only attention --quick
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

# One thread per library by default (override with OMP_NUM_THREADS): both rankwise and its peers then
# run single-threaded, which compares like for like and keeps timings sane on a shared machine (many
# small batched ops in two threads were 10-100x slower under load than in one).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from rankwise.io import read_json, write_json, write_text  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SECTIONS = ("completion", "sampling", "attention")
MODEL = "smollm2-135m"


def _timed(fn):  # noqa: ANN001, ANN202
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


# ------------------------------------------------------------------------------------ completion
def _camera() -> torch.Tensor:
    import skimage.data

    return torch.tensor(skimage.data.camera(), dtype=torch.float64) / 255.0  # (512, 512)


def _word_doc(n_words: int = 1000, chunk: int = 1000) -> torch.Tensor:
    from rankwise.data import load_corpus

    words = [w for text in load_corpus("python-docs", "train") for w in re.findall(r"[a-z]{2,}", text.lower())]
    docs = [words[i : i + chunk] for i in range(0, len(words) - chunk + 1, chunk)]
    vocab = [w for w, _ in collections.Counter(words).most_common(n_words)]
    index = {w: i for i, w in enumerate(vocab)}
    counts = torch.zeros(len(vocab), len(docs), dtype=torch.float64)
    for j, doc in enumerate(docs):
        for w in doc:
            if w in index:
                counts[index[w], j] += 1
    return torch.log1p(counts)


def _complete_case(name: str, M: torch.Tensor, observed: float, rank: int, ridge: float, seed: int = 0,
                   peers: bool = True) -> dict:
    import numpy as np

    from rankwise.linalg.complete import complete, observed_values

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(M.shape, generator=g) < observed
    r, c = mask.nonzero().unbind(1)
    hr, hc = (~mask).nonzero().unbind(1)
    y, held = M[r, c], M[hr, hc]
    mu = float(y.mean())
    norm = float(held.norm())
    row = {"data": name, "shape": list(M.shape), "observed": observed, "n_observed": int(r.numel()),
           "rank": rank, "ridge": ridge, "mean_fill_rel_err": float((held - mu).norm()) / norm, "methods": {}}
    preds = {}
    for method in ("exact", "robust"):
        sweeps = []
        (U, V), sec = _timed(lambda m=method, log=sweeps: complete(
            r, c, y - mu, M.shape, rank, method=m, ridge=ridge, max_iters=50, tol=1e-4, callback=log.append))
        pred = observed_values(U, V, hr, hc) + mu
        row["methods"][f"rankwise {method}"] = {"rel_err": float((pred - held).norm()) / norm, "seconds": sec,
                                                "sweeps": len(sweeps)}
        preds[f"rankwise {method}"] = (U @ V.T + mu)
    if peers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fancyimpute import IterativeSVD, SoftImpute

            X = (M - mu).numpy().copy()
            X[~mask.numpy()] = np.nan
            for label, solver in (("fancyimpute SoftImpute", SoftImpute(max_rank=rank, max_iters=50, verbose=False)),
                                  ("fancyimpute IterativeSVD", IterativeSVD(rank=rank, max_iters=50, verbose=False))):
                Z, sec = _timed(lambda s=solver: s.fit_transform(X.copy()))
                Z = torch.from_numpy(Z) + mu
                row["methods"][label] = {"rel_err": float((Z[hr, hc] - held).norm()) / norm, "seconds": sec}
                preds[label] = Z
    row["_preds"] = preds
    row["_mask"] = mask
    return row


def _sweep_seconds(n: int, k: int, n_obs: int, method: str, preconditioner: str = "sketch") -> float:
    import logging

    from rankwise.linalg.complete import complete

    logging.getLogger("rankwise.linalg.complete").setLevel(logging.ERROR)  # k=128 warns: timing only
    g = torch.Generator().manual_seed(0)
    U0 = torch.randn(n, k, generator=g, dtype=torch.float64)
    V0 = torch.randn(n, k, generator=g, dtype=torch.float64)
    r = torch.randint(0, n, (n_obs,), generator=g)
    c = torch.randint(0, n, (n_obs,), generator=g)
    vals = (U0[r] * V0[c]).sum(1)
    stamps: list[float] = []
    complete(r, c, vals, (n, n), k, method=method, preconditioner=preconditioner, init="random", max_iters=4,
             tol=0.0, callback=lambda info: stamps.append(info["seconds"]) and None)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def run_completion(quick: bool) -> dict:
    out: dict = {"cases": [], "scaling": {}}
    cam = _camera()
    cases = [("camera 512x512, 50% removed", cam, 0.5, 20, 0.03),
             ("camera 512x512, 80% removed", cam, 0.2, 10, 0.03)]
    if not quick:
        cases.append(("python-docs words x docs (log1p counts), 70% held out", _word_doc(), 0.3, 10, 0.1))
    images = {}
    for name, M, obs, k, ridge in cases:
        print(f"completion: {name}", file=sys.stderr)
        row = _complete_case(name, M, obs, k, ridge)
        if name.startswith("camera") and obs == 0.2:
            images = {"mask": row["_mask"], **row["_preds"], "original": M}
        del row["_preds"], row["_mask"]
        out["cases"].append(row)
    if images:
        _camera_plot(images)
    n, k0 = 2000, 16
    sizes = [100_000, 200_000, 400_000] if quick else [100_000, 200_000, 400_000, 800_000]
    ks = [8, 16, 32] if quick else [8, 16, 32, 64, 128]
    variants = [("exact", "sketch"), ("robust", "sketch"), ("robust", "jacobi")]
    vs_omega = {f"{m} ({p})" if m == "robust" else m: [_sweep_seconds(n, k0, s, m, p) for s in sizes]
                for m, p in variants}
    vs_k = {f"{m} ({p})" if m == "robust" else m: [_sweep_seconds(n, k, 400_000, m, p) for k in ks]
            for m, p in variants}
    out["scaling"] = {
        "n": n, "k_fixed": k0, "omega_sizes": sizes, "omega_fixed": 400_000, "ks": ks,
        "sweep_seconds_vs_omega": vs_omega, "sweep_seconds_vs_k": vs_k,
        "slope_in_omega": {m: _slope(sizes, t) for m, t in vs_omega.items()},
        "slope_in_k": {m: _slope(ks, t) for m, t in vs_k.items()},
    }
    return out


def _camera_plot(images: dict) -> None:
    plt = _pyplot()
    names = ["original", "mask", "rankwise exact", "fancyimpute SoftImpute", "fancyimpute IterativeSVD"]
    names = [n for n in names if n in images]
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3.2))
    for ax, name in zip(axes, names, strict=True):
        img = images[name]
        if name == "mask":
            img = images["original"] * images["mask"]
            name = "observed (20%)"
        ax.imshow(img.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(OUT / "kernels_camera.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ SmolLM2 helpers
def _model_and_tokenizer():  # noqa: ANN202
    from rankwise.models import load_model, load_tokenizer

    return load_model(MODEL), load_tokenizer(MODEL)


def _capture_inputs(model, ids: torch.Tensor, layers: list[int] | None = None) -> tuple[dict, dict]:  # noqa: ANN001
    """Inputs (N, in) of each distinct linear input of the chosen decoder layers, and their fqns."""
    acts: dict[str, list[torch.Tensor]] = {}
    members: dict[str, list[str]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if layers is not None and i not in layers:
            continue
        groups = (("attn_in", layer.self_attn.q_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("o_in", layer.self_attn.o_proj, ("self_attn.o_proj",)),
                  ("mlp_in", layer.mlp.gate_proj, ("mlp.gate_proj", "mlp.up_proj")),
                  ("down_in", layer.mlp.down_proj, ("mlp.down_proj",)))
        for name, mod, fqns in groups:
            key = f"{i}.{name}"
            acts[key], members[key] = [], [f"model.layers.{i}.{f}" for f in fqns]
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, a, key=key: acts[key].append(a[0].detach().reshape(-1, a[0].shape[-1]).float())))
    try:
        with torch.no_grad():
            for batch in ids.split(4):
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}, members


def _ppl(model, tok, max_tokens: int, seq_len: int) -> float:  # noqa: ANN001
    from rankwise.eval import evaluate_split

    return evaluate_split(model, tok, "python-docs", "test", seq_len=seq_len, max_tokens=max_tokens,
                          progress=False)["perplexity"]


# ------------------------------------------------------------------------------------ sampling
def _truncation_loss(W: torch.Tensor, gram: torch.Tensor, rank: int, X_ho: torch.Tensor) -> float:
    """SVD-LLM with this Gram (Cholesky whitening, damping 1e-4 of the mean diagonal), held-out loss."""
    from rankwise.linalg import cholesky_whitener, inverse_lower, truncated_svd

    d = gram.shape[0]
    G = gram + 1e-4 * gram.diagonal().mean() * torch.eye(d, dtype=gram.dtype)
    L = cholesky_whitener(G)
    U, S, Vh = truncated_svd(W.double() @ L, rank)
    W2 = (U * S) @ (Vh @ inverse_lower(L))
    Y = X_ho.double() @ W.double().T
    return float((X_ho.double() @ (W.double() - W2).T).square().sum() / Y.square().sum())


def _sampled_stats(acts: dict, members: dict, m: int | None, method: str, seed: int) -> dict:
    from rankwise.calibrate import LayerStats
    from rankwise.linalg.sampling import select_calibration_tokens, weighted_gram

    stats = {}
    for key, X in acts.items():
        if m is None:
            idx, w = torch.arange(X.shape[0]), torch.ones(X.shape[0])
        else:
            idx, w = select_calibration_tokens(X, m, method=method, seed=seed)
        st = LayerStats(n_tokens=torch.tensor(idx.numel()), gram=weighted_gram(X, idx, w))
        for fqn in members[key]:
            stats[fqn] = st
    return stats


def run_sampling(quick: bool) -> dict:
    from rankwise.compress import compensate_, compress_
    from rankwise.data import calibration_batch
    from rankwise.linalg import rank_for_ratio

    model, tok = _model_and_tokenizer()
    n_pool, seq = (8, 256) if quick else (16, 256)
    pool = calibration_batch(tok, n=n_pool, seq_len=seq, seed=0)
    held = calibration_batch(tok, n=2 if quick else 4, seq_len=seq, split="validation", seed=1)
    budgets = [256, 512] if quick else [256, 512, 1024]
    seeds = [0] if quick else [0, 1]
    layers = [0, 10, 20, 29]
    print("sampling: capturing activations", file=sys.stderr)
    acts, members = _capture_inputs(model, pool)
    acts_ho, _ = _capture_inputs(model, held, layers)
    modules = dict(model.named_modules())
    out: dict = {"pool_tokens": pool.numel(), "heldout_tokens": held.numel(), "budgets": budgets, "seeds": seeds,
                 "layers": layers, "ratio": 0.2, "truncation_loss": {}}

    # (i) held-out whitened-SVD truncation loss for one linear per input group of 4 layers
    targets = [(key, members[key][0]) for key in acts_ho]
    configs = [("full pool", None, "uniform", 0)] + [
        (f"{method} m={m} seed={s}", m, method, s) for m in budgets for method in ("uniform", "leverage") for s in seeds]
    for label, m, method, s in configs:
        losses = {}
        for key, fqn in targets:
            X = acts[key]
            if m is None:
                gram = X.double().T @ X.double()
            else:
                from rankwise.linalg.sampling import select_calibration_tokens, weighted_gram

                idx, w = select_calibration_tokens(X, m, method=method, seed=s)
                gram = weighted_gram(X, idx, w)
            W = modules[fqn].weight.detach()
            losses[fqn] = _truncation_loss(W, gram, rank_for_ratio(*W.shape, 0.2), acts_ho[key])
        out["truncation_loss"][label] = losses
    summary = {}
    for m in budgets:
        for method in ("uniform", "leverage"):
            vals = [statistics.fmean(out["truncation_loss"][f"{method} m={m} seed={s}"].values()) for s in seeds]
            summary[f"{method} m={m}"] = statistics.fmean(vals)
    summary["full pool"] = statistics.fmean(out["truncation_loss"]["full pool"].values())
    out["truncation_loss_mean"] = summary

    # (ii) perplexity after SVD-LLM of every down_proj, (iii) after int4 + EoRA of every down_proj
    eval_tokens = 2048 if quick else 4096
    out["eval_tokens"] = eval_tokens
    out["dense_ppl"] = _ppl(model, tok, eval_tokens, 256)
    m_ppl = 512
    down = {k: v for k, v in acts.items() if k.endswith("down_in")}
    down_members = {k: members[k] for k in down}
    ppl: dict = {"svd-llm down_proj ratio 0.3": {}, "int4 + EoRA rank 32 down_proj": {}}
    for label, m, method in (("full pool", None, "uniform"), (f"uniform m={m_ppl}", m_ppl, "uniform"),
                             (f"leverage m={m_ppl}", m_ppl, "leverage")):
        stats = _sampled_stats(down, down_members, m, method, 0)
        work = copy.deepcopy(model)
        compress_(work, method="svd-llm", ratio=0.3, target_modules=["down_proj"], stats=stats, progress=False)
        ppl["svd-llm down_proj ratio 0.3"][label] = _ppl(work, tok, eval_tokens, 256)
        work = copy.deepcopy(model)
        compensate_(work, base="int4", rank=32, target_modules=["down_proj"], stats=stats, progress=False)
        ppl["int4 + EoRA rank 32 down_proj"][label] = _ppl(work, tok, eval_tokens, 256)
        del work
    out["perplexity"] = ppl
    out["perplexity_tokens_m"] = m_ppl
    return out


# ------------------------------------------------------------------------------------ attention
def _capture_qkv(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:  # noqa: ANN001
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    store: dict[int, tuple] = {}

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):  # noqa: ANN001, ANN003, ANN202
        if module.layer_idx in layers:
            g = query.shape[1] // key.shape[1]
            store[module.layer_idx] = (query.detach().clone(), key.detach().repeat_interleave(g, 1),
                                       value.detach().repeat_interleave(g, 1), scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)

    AttentionInterface.register("rankwise_capture", capture)
    AttentionMaskInterface.register("rankwise_capture", sdpa_mask)
    old = model.config._attn_implementation
    model.config._attn_implementation = "rankwise_capture"
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.config._attn_implementation = old
    return store


def _approx(q, k, v, scaling, kind: str, budget: int, seed: int, sinks: int = 4):  # noqa: ANN001, ANN202
    from rankwise.attention import (
        lsh_scatterbrain_attention,
        orthogonal_gaussian,
        scatterbrain_attention,
    )

    H, d = q.shape[1], q.shape[-1]

    def om(M: int):  # noqa: ANN202
        return orthogonal_gaussian(M, d, heads=H, seed=seed)

    half = budget // 2
    if kind == "sparse (local)":
        return scatterbrain_attention(q, k, v, omega=None, window=budget, scaling=scaling)
    if kind == "low-rank (Performer)":
        return scatterbrain_attention(q, k, v, omega=om(budget), window=0, scaling=scaling)
    if kind == "scatterbrain (local)":
        return scatterbrain_attention(q, k, v, omega=om(half), window=half, scaling=scaling)
    if kind == "sparse (local + 4 sinks)":
        return scatterbrain_attention(q, k, v, omega=None, window=budget - sinks, global_tokens=sinks, scaling=scaling)
    if kind == "scatterbrain (local + 4 sinks)":
        return scatterbrain_attention(q, k, v, omega=om(half), window=half - sinks, global_tokens=sinks,
                                      scaling=scaling)
    if kind == "sparse (LSH)":
        return lsh_scatterbrain_attention(q, k, v, omega=None, n_hashes=1, cluster_size=budget, scaling=scaling,
                                          seed=seed)
    if kind == "scatterbrain (LSH)":
        return lsh_scatterbrain_attention(q, k, v, omega=om(half), n_hashes=1, cluster_size=half, scaling=scaling,
                                          seed=seed)
    raise ValueError(kind)


KINDS = ("sparse (local)", "low-rank (Performer)", "scatterbrain (local)", "sparse (local + 4 sinks)",
         "scatterbrain (local + 4 sinks)", "sparse (LSH)", "scatterbrain (LSH)")


def _trim() -> None:
    """glibc malloc_trim(0): without it, memory freed by an earlier call is reused and RSS does not grow."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then read low
        pass


def _attention_timing(ns: list[int]) -> list[dict]:
    from rankwise.attention import exact_attention, orthogonal_gaussian, scatterbrain_attention
    from rankwise.profiling import peak_rss_of

    H, d = 9, 64
    omega = orthogonal_gaussian(32, d, heads=H)
    rows = []
    for n in ns:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, H, n, d, generator=g) for _ in range(3))
        qkv = {"q": q, "k": k, "v": v}
        fns = {
            "exact (eager, n x n scores)": (lambda t=qkv: exact_attention(**t, causal=True)) if n <= 4096 else None,
            "torch SDPA (causal)": lambda t=qkv: torch.nn.functional.scaled_dot_product_attention(
                t["q"], t["k"], t["v"], is_causal=True),
            "scatterbrain 32 + 32": lambda t=qkv: scatterbrain_attention(**t, omega=omega, window=32),
        }
        row = {"n": n}
        for name, fn in fns.items():
            if fn is None:
                continue
            fn()
            times = [_timed(fn)[1] for _ in range(3)]
            _trim()  # hand freed heap back to the OS, so RSS growth measures this call's peak
            _, peak = peak_rss_of(fn)
            row[name] = {"seconds": statistics.median(times), "peak_bytes": peak}
        rows.append(row)
    return rows


def run_attention(quick: bool) -> dict:
    from rankwise.attention import ScatterbrainConfig, use_scatterbrain

    model, tok = _model_and_tokenizer()
    from rankwise.data import load_corpus, pack_tokens

    n = 512 if quick else 1024
    ids = pack_tokens(load_corpus("python-docs", "test"), tok, n)[:1]
    layers = [0, 10, 20, 29] if quick else [0, 5, 10, 15, 20, 25, 29]
    qkv = _capture_qkv(model, ids, layers)
    budgets = [32, 64, 128]
    seeds = [0, 1, 2]
    errors: dict = {kind: {} for kind in KINDS}
    for budget in budgets:
        for kind in KINDS:
            vals = []
            for layer in layers:
                q, k, v, scaling = qkv[layer]
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
                for seed in seeds if "low-rank" in kind or "scatterbrain" in kind else seeds[:1]:
                    out = _approx(q, k, v, scaling, kind, budget, seed)
                    vals.append(float(((out - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).mean()))
            errors[kind][budget] = statistics.fmean(vals)
    res: dict = {"seq_len": n, "layers": layers, "budgets": budgets, "seeds": seeds, "rel_error": errors}
    res["error_ratio_vs_best_baseline"] = {
        b: min(errors["sparse (local)"][b], errors["low-rank (Performer)"][b]) / errors["scatterbrain (local)"][b]
        for b in budgets}
    res["error_ratio_with_sinks"] = {
        b: min(errors["sparse (local + 4 sinks)"][b], errors["low-rank (Performer)"][b])
        / errors["scatterbrain (local + 4 sinks)"][b] for b in budgets}

    eval_tokens, seq = (1024, 512) if quick else (2048, 512)
    cfgs = {
        "sparse (local 64)": ScatterbrainConfig(window=64, n_features=0),
        "low-rank (Performer 64)": ScatterbrainConfig(window=0, n_features=64),
        "scatterbrain (32 + 32)": ScatterbrainConfig(window=32, n_features=32),
        "sparse (60 + 4 sinks)": ScatterbrainConfig(window=60, n_features=0, global_tokens=4),
        "scatterbrain (28 + 4 sinks + 32)": ScatterbrainConfig(window=28, n_features=32, global_tokens=4),
    }
    ppl = {"exact": _ppl(model, tok, eval_tokens, seq)}
    for name, cfg in cfgs.items():
        print(f"attention: perplexity {name}", file=sys.stderr)
        with use_scatterbrain(model, cfg):
            ppl[name] = _ppl(model, tok, eval_tokens, seq)
    res["perplexity"] = ppl
    res["perplexity_setup"] = {"eval_tokens": eval_tokens, "window": seq, "memory_per_query": 64}
    res["timing"] = _attention_timing([512, 1024, 2048] if quick else [512, 1024, 2048, 4096, 8192])
    return res


# ------------------------------------------------------------------------------------ report
def _pyplot():  # noqa: ANN202
    from rankwise._optional import require

    mpl = require("matplotlib", purpose="benchmark plots")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(results: dict) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    sc = results.get("completion", {}).get("scaling")
    if sc:
        for name, ts in sc["sweep_seconds_vs_omega"].items():
            axes[0, 0].loglog(sc["omega_sizes"], ts, "o-", label=name)
        axes[0, 0].set(title=f"completion: one sweep vs |Omega| (k={sc['k_fixed']})", xlabel="|Omega|",
                       ylabel="seconds")
        for name, ts in sc["sweep_seconds_vs_k"].items():
            axes[0, 1].loglog(sc["ks"], ts, "o-", label=name)
        axes[0, 1].set(title=f"completion: one sweep vs k (|Omega|={sc['omega_fixed']:,})", xlabel="k",
                       ylabel="seconds")
        axes[0, 0].legend(fontsize=8)
        axes[0, 1].legend(fontsize=8)
    smp = results.get("sampling")
    if smp:
        tl = smp["truncation_loss_mean"]
        for method in ("uniform", "leverage"):
            axes[0, 2].plot(smp["budgets"], [tl[f"{method} m={m}"] for m in smp["budgets"]], "o-", label=method)
        axes[0, 2].axhline(tl["full pool"], color="k", ls="--", label=f"full pool ({smp['pool_tokens']} tokens)")
        axes[0, 2].set(title="SVD-LLM held-out loss vs calibration tokens", xlabel="tokens m",
                       ylabel="held-out loss (mean of 16 linears)", xscale="log")
        axes[0, 2].legend(fontsize=8)
    att = results.get("attention")
    if att:
        for kind, vals in att["rel_error"].items():
            bs = sorted(int(b) for b in vals)
            axes[1, 0].plot(bs, [vals[b] if b in vals else vals[str(b)] for b in bs], "o-", label=kind)
        axes[1, 0].set(title="SmolLM2 attention: rel. output error at equal memory", xlabel="entries per query",
                       ylabel="||O_hat - O|| / ||O||", xscale="log", yscale="log")
        axes[1, 0].legend(fontsize=7)
        names = list(att["perplexity"])
        axes[1, 1].barh(names, [att["perplexity"][n] for n in names])
        axes[1, 1].set(title="SmolLM2 perplexity, approximation in all layers", xscale="log")
        axes[1, 1].tick_params(axis="y", labelsize=7)
        rows = att["timing"]
        for name in ("exact (eager, n x n scores)", "torch SDPA (causal)", "scatterbrain 32 + 32"):
            pts = [(r["n"], r[name]["seconds"]) for r in rows if name in r]
            axes[1, 2].loglog(*zip(*pts, strict=True), "o-", label=name)
        axes[1, 2].set(title="one attention call: time vs n", xlabel="sequence length",
                       ylabel="seconds")
        axes[1, 2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "kernels.png", dpi=100)
    plt.close(fig)


def _md(results: dict) -> str:
    env = results.get("env", {})
    lines = ["# Kernels: matrix completion, calibration-token sampling, Scatterbrain", "",
             f"Generated by `benchmarks/lowrank_kernels.py`; torch {env.get('torch')}, {env.get('threads')} threads, "
             f"load average at start {env.get('loadavg')} (timings on a shared machine are noisy).", ""]
    comp = results.get("completion")
    if comp:
        lines += ["## Matrix completion (held-out relative error, wall time)", "",
                  "Peers: fancyimpute 0.7.0 SoftImpute (max_rank = k) and IterativeSVD (rank = k), dense; "
                  "all methods capped at 50 iterations, values centred by the observed mean.", "",
                  "| data | k | method | held-out rel. error | seconds |", "|---|---|---|---|---|"]
        for row in comp["cases"]:
            lines.append(f"| {row['data']} ({row['n_observed']:,} observed) | {row['rank']} | mean fill | "
                         f"{row['mean_fill_rel_err']:.4f} | |")
            for name, r in row["methods"].items():
                lines.append(f"| | | {name} | {r['rel_err']:.4f} | {r['seconds']:.2f} |")
        sc = comp["scaling"]
        lines += ["", f"Cost of one sweep on a synthetic incoherent {sc['n']}x{sc['n']} matrix "
                  "(log-log slopes; paper: robust ~ |Omega| k, exact ~ |Omega| k^2):", "",
                  "| method | " + " | ".join(f"|Omega|={s:,}" for s in sc["omega_sizes"]) + " | slope in |Omega| |",
                  "|---|" + "---|" * (len(sc["omega_sizes"]) + 1)]
        for name, ts in sc["sweep_seconds_vs_omega"].items():
            lines.append(f"| {name} | " + " | ".join(f"{t:.3f}" for t in ts) + f" | {sc['slope_in_omega'][name]:.2f} |")
        lines += ["", "| method | " + " | ".join(f"k={k}" for k in sc["ks"]) + " | slope in k |",
                  "|---|" + "---|" * (len(sc["ks"]) + 1)]
        for name, ts in sc["sweep_seconds_vs_k"].items():
            lines.append(f"| {name} | " + " | ".join(f"{t:.3f}" for t in ts) + f" | {sc['slope_in_k'][name]:.2f} |")
    smp = results.get("sampling")
    if smp:
        lines += ["", "## Calibration tokens: leverage vs uniform sampling at equal token count", "",
                  f"Pool: {smp['pool_tokens']} python-docs train tokens; held-out: {smp['heldout_tokens']} validation "
                  f"tokens. Whitened-SVD (SVD-LLM) truncation at ratio {smp['ratio']}, mean held-out loss "
                  f"||(W-W')X||^2/||WX||^2 over one linear per input group of layers {smp['layers']} "
                  f"(mean over seeds {smp['seeds']}):", "", "| tokens m | uniform | leverage | leverage / uniform |",
                  "|---|---|---|---|"]
        tl = smp["truncation_loss_mean"]
        for m in smp["budgets"]:
            u, lv = tl[f"uniform m={m}"], tl[f"leverage m={m}"]
            lines.append(f"| {m} | {u:.4f} | {lv:.4f} | {lv / u:.3f} |")
        lines.append(f"| {smp['pool_tokens']} (full pool) | {tl['full pool']:.4f} | | |")
        lines += ["", f"SmolLM2-135M perplexity (python-docs test, {smp['eval_tokens']} tokens; dense "
                  f"{smp['dense_ppl']:.3f}); Grams of every down_proj from m = {smp['perplexity_tokens_m']} tokens:",
                  "", "| compression | full pool | uniform | leverage |", "|---|---|---|---|"]
        m = smp["perplexity_tokens_m"]
        for name, vals in smp["perplexity"].items():
            lines.append(f"| {name} | {vals['full pool']:.3f} | {vals[f'uniform m={m}']:.3f} | "
                         f"{vals[f'leverage m={m}']:.3f} |")
    att = results.get("attention")
    if att:
        lines += ["", "## Scatterbrain on SmolLM2 attention", "",
                  f"Queries/keys/values captured from SmolLM2-135M on one {att['seq_len']}-token python-docs test "
                  f"window, layers {att['layers']}, all 9 heads; mean relative error of the attention output "
                  f"(features averaged over seeds {att['seeds']}). Budget = entries kept per query "
                  "(window + sinks + random features).", "",
                  "| method | " + " | ".join(f"budget {b}" for b in att["budgets"]) + " |",
                  "|---|" + "---|" * len(att["budgets"])]
        for kind, vals in att["rel_error"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{vals.get(b, vals.get(str(b))):.4f}" for b in att["budgets"]) + " |")
        r1, r2 = att["error_ratio_vs_best_baseline"], att["error_ratio_with_sinks"]
        lines += ["", "Error of the better baseline / Scatterbrain's (paper: ~2.1x): local "
                  + ", ".join(f"{b}: {r1.get(b, r1.get(str(b))):.2f}x" for b in att["budgets"])
                  + "; with 4 sink tokens " + ", ".join(f"{b}: {r2.get(b, r2.get(str(b))):.2f}x" for b in att["budgets"]),
                  "", f"Perplexity with the approximation in all 30 layers ({att['perplexity_setup']['eval_tokens']} "
                  f"test tokens, {att['perplexity_setup']['window']}-token windows, 64 entries per query):", "",
                  "| attention | perplexity |", "|---|---|"]
        for name, p in att["perplexity"].items():
            lines.append(f"| {name} | {p:.3f} |")
        lines += ["", "One causal attention call, 9 heads x 64 dims, fp32 (median of 3; peak = RSS growth during the call, "
                  "after malloc_trim):", "",
                  "| n | exact eager s | peak MiB | SDPA s | peak MiB | scatterbrain 32+32 s | peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in att["timing"]:
            cells = []
            for name in ("exact (eager, n x n scores)", "torch SDPA (causal)", "scatterbrain 32 + 32"):
                cells += ([f"{r[name]['seconds']:.4f}", f"{r[name]['peak_bytes'] / 2**20:.1f}"]
                          if name in r else ["-", "-"])
            lines.append(f"| {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    global OUT  # --out: the report and the plots write to OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--quick", action="store_true", help="smaller grids (smoke run)")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: benchmarks/results)")
    args = parser.parse_args()
    OUT = args.out
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}: choose from {SECTIONS}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "kernels.json"
    results = read_json(path) if path.exists() else {}
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if only:  # a report-only run (--only "") keeps the environment of the last measuring run
        results["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "loadavg": [round(x, 2) for x in os.getloadavg()], "quick": args.quick}
    runners = {"completion": run_completion, "sampling": run_sampling, "attention": run_attention}
    for name in only:
        start = time.perf_counter()
        results[name] = runners[name](args.quick)
        results[name]["section_seconds"] = time.perf_counter() - start
        results[name]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        print(f"{name}: {results[name]['section_seconds']:.0f} s", file=sys.stderr)
        write_json(path, results)
    write_text(OUT / "kernels.md", _md(results))
    _plot(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
