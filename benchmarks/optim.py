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

3. Optimizer-state bytes after one step on SmolLM2 in bf16 and in fp32 (state follows the
   parameter dtype; one row with ``state_dtype=torch.float32``), vs torch AdamW on the same
   model. ``--smollm-only`` reruns parts 1 and 3 and keeps the JSON's tiny-Llama part.

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
import statistics
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
LABELS: list[str] | None = None  # --labels: a subset of make_optimizers' rows


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

    table = {
        "torch AdamW": torch_adamw,
        "galore-torch GaLoreAdamW": galore_torch,
        "galore_adamw (svd)": preset("galore_adamw", lr=1e-2),
        "galore_adamw (randomized)": preset("galore_adamw", lr=1e-2, projector="randomized"),
        "galore_adamw (svd, int8 projector)": preset("galore_adamw", lr=1e-2, proj_bits=8),
        "galore_adamw (svd, int4 projector)": preset("galore_adamw", lr=1e-2, proj_bits=4),
        "galore_adamw (svd, bf16 projector)": preset(
            "galore_adamw", lr=1e-2, proj_options={"dtype": torch.bfloat16}),
        "galore_adafactor": preset("galore_adafactor", lr=1e-2),
        "galore_adamw8bit": preset("galore_adamw8bit", lr=1e-2),
        "q_galore_adamw8bit": preset("q_galore_adamw8bit", lr=1e-2),
        "fira": preset("fira", lr=1e-2),
        "frugal": preset("frugal", lr=2e-3),
        "apollo": preset("apollo", lr=1e-2),
        "apollo_mini": preset("apollo_mini", lr=1e-2),
        "dct_adamw": preset("dct_adamw", lr=2e-3),
    }
    if LABELS is None:
        return table
    keep = {"torch AdamW", "galore-torch GaLoreAdamW", *LABELS}
    return {k: v for k, v in table.items() if k in keep}


def _state_bytes(opt: Any, params: list[nn.Parameter]) -> int:
    return profiling.tensor_bytes([opt.state[p] for p in params if p in opt.state])


# ----------------------------------------------------------------------------- SmolLM2


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, the functions taking turns round after round (so a burst of load
    on the shared machine hits every contender alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _layer_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def _refresh_times(model: nn.Module, batches: list[torch.Tensor], repeat: int) -> dict[str, Any]:
    """Seconds for one refresh of every projected matrix, per projector, on the same grads,
    and how much of each gradient's energy the new subspace captures.

    Every decoder layer has the same seven shapes, so the matrices of three layers (first,
    middle, last) are timed (median of `repeat` interleaved rounds) and scaled by layers / 3.
    Cold refreshes use the gradients of batch 0. The warm refresh ("randomized (warm)", every
    refresh after the first) starts from the subspace computed on batch 0 and is timed and
    scored on batch 1's gradients; capture = ||G Pᵀ||² / (sum of the top-r σ²) on the
    gradients each subspace is computed from (1 = the exact SVD's subspace).
    """
    proj_ids = {id(p) for p in _projected(model)}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in proj_ids]
    layers = sorted({_layer_of(n) for n, _ in named})
    sample = {layers[0], layers[len(layers) // 2], layers[-1]}
    grads = []
    for b in batches[:2]:
        model.zero_grad()
        model(input_ids=b, labels=b).loss.backward()
        grads.append([p.grad.detach().clone() for n, p in named if _layer_of(n) in sample])
    model.zero_grad(set_to_none=True)
    scale = len(layers) / len(sample)
    from galore_torch.galore_projector import GaLoreProjector

    def rank_of(g):
        return max(1, round(RANK_FRACTION * min(g.shape)))

    mats = grads[0]
    def galore_torch_svd():
        for g in mats:
            GaLoreProjector(rank_of(g), update_proj_gap=T_AMORTISE, proj_type="std").project(g, 0)

    def ours(kind, **opts):
        def run():
            for g in mats:
                ro.make_projector(kind, tuple(g.shape), rank_of(g), **opts).update(g, 0)
        return run

    warm = []  # the batch-0 subspaces the warm refresh starts from
    for g0 in grads[0]:
        st: dict[str, Any] = {}
        ro.make_projector("randomized", tuple(g0.shape), rank_of(g0), state=st).update(g0, 0)
        st["saved_basis"] = st["proj_basis"]
        warm.append(st)

    def warm_refresh():
        for g, st in zip(grads[1], warm, strict=True):
            _warm_projector(st, g, rank_of(g)).update(g, 0)

    fns = {"galore-torch svd": galore_torch_svd, "svd": ours("svd"),
           "randomized": ours("randomized"), "randomized (warm)": warm_refresh,
           "randomized (power_iters=1)": ours("randomized", power_iters=1),
           "randomized (hmt, rankwise.linalg)": ours("randomized", method="hmt"),
           "dct": ours("dct"), "random": ours("random"),
           "svd int8": ours("svd", bits=8), "svd int4 (q_galore)": ours("svd", bits=4)}
    # warm every code path once on one matrix (LAPACK/BLAS initialisation must not be billed to
    # whichever projector happens to be timed first), then time each over all matrices
    mats = grads[0][:1]
    for k, fn in fns.items():
        if k != "randomized (warm)":
            fn()
    mats = grads[0]
    times = {k: _median(v) * scale for k, v in _interleaved(fns, repeat).items()}
    capture = _capture(grads, warm, rank_of)
    return {"seconds": times, "scale": scale, "capture": capture}


def _warm_projector(st: dict[str, Any], g: torch.Tensor, rank: int) -> Any:
    """A randomized projector whose previous subspace is the saved batch-0 one (refresh 2)."""
    st["proj_basis"], st["proj_count"] = st["saved_basis"], torch.tensor(1)
    return ro.make_projector("randomized", tuple(g.shape), rank, state=st)


def _capture(grads: list[list[torch.Tensor]], warm: list[dict], rank_of) -> dict[str, float]:
    """Mean captured energy fraction of each projector's subspace (see `_refresh_times`)."""
    def frac(g, proj):
        s = torch.linalg.svdvals(g)
        return float(proj.down(g).square().sum() / s[: proj.rank].square().sum())

    out: dict[str, list[float]] = {}
    for kind, opts, label in (("svd", {}, "svd"), ("randomized", {}, "randomized"),
                              ("randomized", {"power_iters": 1}, "randomized (power_iters=1)"),
                              ("randomized", {"method": "hmt"},
                               "randomized (hmt, rankwise.linalg)"),
                              ("dct", {}, "dct")):  # (capture needs an orthonormal basis:
        # APOLLO's Gaussian N(0, 1/r) projector is left out)
        for g in grads[0]:
            p = ro.make_projector(kind, tuple(g.shape), rank_of(g), **opts)
            p.update(g, 0)
            out.setdefault(label, []).append(frac(g, p))
    for g, st in zip(grads[1], warm, strict=True):
        p = _warm_projector(st, g, rank_of(g))
        p.update(g, 0)
        out.setdefault("randomized (warm)", []).append(frac(g, p))
    for g0, g1 in zip(grads[0], grads[1], strict=True):  # no refresh: batch 0's exact subspace
        p = ro.make_projector("svd", tuple(g0.shape), rank_of(g0))
        p.update(g0, 0)
        out.setdefault("stale svd (batch-0 subspace on batch 1)", []).append(frac(g1, p))
    return {k: statistics.fmean(v) for k, v in out.items()}


def _galore_torch_projector_bytes(opt: Any, params: list[nn.Parameter]) -> int:
    """Bytes galore-torch's projector objects keep alive: ``ortho_matrix`` is a *view* of the
    full SVD factor (Vh[:r] of a min(m, n)-row Vh, or U[:, :r]), so its whole storage counts."""
    seen, total = set(), 0
    for p in params:
        proj = opt.state.get(p, {}).get("projector")
        mat = getattr(proj, "ortho_matrix", None)
        if isinstance(mat, torch.Tensor):
            storage = mat.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def bench_smollm(steps: int, seq_len: int, batch_size: int, repeat: int,
                 rounds: int) -> dict[str, Any]:
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
    refresh_res = _refresh_times(model, batches, repeat)
    refresh = refresh_res["seconds"]
    log.info("refresh: %s", refresh)
    results: dict[str, Any] = {}
    factories = make_optimizers(lr_scale=0.01)  # fine-tuning: 1/100 of the from-scratch lrs
    for label, make in factories.items():
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
        results[label] = {
            "state_bytes": profiling.optimizer_state_bytes(opt),
            "state_bytes_projected": _state_bytes(opt, projected),
            "peak_rss_first_step": losses[0][1],
            "losses": [loss for loss, _ in losses],
            "loss_after": final,
        }
        if label == "galore-torch GaLoreAdamW":
            hidden = _galore_torch_projector_bytes(opt, projected)
            results[label]["hidden_projector_bytes"] = hidden
            results[label]["state_bytes_projected_with_projector"] = (
                results[label]["state_bytes_projected"] + hidden)
        del opt
    _step_times(model, init, batches[0], factories, results, rounds)
    return _summarise(results, refresh, refresh_res, model, numel_proj, steps, seq_len,
                      batch_size)


def _step_times(model: nn.Module, init: dict, batch: torch.Tensor, factories: dict,
                results: dict, rounds: int, per_batch: int = 3) -> None:
    """Optimizer-step seconds, interleaved: optimizers are built in batches of `per_batch`
    (memory), each batch with galore-torch in it; within a batch every optimizer steps once per
    round on the same held gradients (no refresh falls in them: the gap is 200), `rounds`
    rounds; the ratio to galore-torch is taken within the batch, so load hits both alike."""
    log = logging.getLogger(__name__)
    peer = "galore-torch GaLoreAdamW"
    others = [k for k in factories if k != peer]
    for start in range(0, len(others), per_batch - 1):
        labels = [peer, *others[start:start + per_batch - 1]]
        model.load_state_dict(init)
        model.zero_grad(set_to_none=True)
        _trim()
        model(input_ids=batch, labels=batch).loss.backward()
        opts = {k: factories[k](model) for k in labels}
        for opt in opts.values():  # first step: state creation and the refresh, untimed
            opt.step()
        times = _interleaved({k: opt.step for k, opt in opts.items()}, rounds)
        ref = _median(times[peer])
        for k in labels:
            r = results[k]
            r.setdefault("step_times", []).extend(times[k])
            if k != peer or "step_ratio_vs_galore_torch" not in r:
                r["step_s"] = _median(times[k])
                r["step_ratio_vs_galore_torch"] = _median(times[k]) / ref
        log.info("step times: %s", {k: round(_median(v), 3) for k, v in times.items()})
        del opts
        model.zero_grad(set_to_none=True)
    results[peer]["step_s"] = _median(results[peer]["step_times"])


def _summarise(results, refresh, refresh_res, model, numel_proj, steps, seq_len, batch_size):
    adamw = results["torch AdamW"]
    peer_refresh = refresh["galore-torch svd"]
    which_refresh = {"galore-torch GaLoreAdamW": "galore-torch svd", "galore_adamw (svd)": "svd",
                     "galore_adamw (randomized)": "randomized", "galore_adafactor": "svd",
                     "galore_adamw8bit": "svd", "q_galore_adamw8bit": "svd int4 (q_galore)",
                     "galore_adamw (svd, int8 projector)": "svd int8",
                     "galore_adamw (svd, int4 projector)": "svd int4 (q_galore)",
                     "galore_adamw (svd, bf16 projector)": "svd",
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
        if "state_bytes_projected_with_projector" in r:
            r["state_ratio_projected_with_projector_vs_adamw"] = (
                r["state_bytes_projected_with_projector"] / adamw["state_bytes_projected"])
    for r in results.values():
        # amortised (step + refresh / T) ratio, the step part from the interleaved ratio
        step_peer = r["step_s"] / r["step_ratio_vs_galore_torch"]
        r["amortised_ratio_vs_galore_torch"] = (
            (r["step_s"] + r["refresh_s"] / T_AMORTISE)
            / (step_peer + peer["refresh_s"] / T_AMORTISE))
    return {
        "model": "smollm2-135m", "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
        "projected_params": numel_proj, "total_params": sum(p.numel() for p in model.parameters()),
        "rounds": len(results["torch AdamW"]["step_times"]),
        "refresh_s": refresh, "refresh_layer_scale": refresh_res["scale"],
        "refresh_capture": refresh_res["capture"],
        "refresh_ratio_vs_galore_torch": {k: v / peer_refresh for k, v in refresh.items()},
        "optimizers": results,
    }


# ----------------------------------------------------------------------------- bf16 state

BF16_LABELS = ("torch AdamW", "galore-torch GaLoreAdamW", "galore_adamw (svd)",
               "galore_adamw (svd, int8 projector)", "galore_adamw (svd, int4 projector)",
               "q_galore_adamw8bit", "galore_adamw8bit",
               "fira", "apollo", "apollo_mini", "dct_adamw", "galore_adamw (fp32 state)")


def bench_state_dtypes(seq_len: int = 16) -> dict[str, Any]:
    """Optimizer-state bytes after one step on SmolLM2-135M in bf16 and in fp32, whole model
    and over the projected matrices alone, each vs torch AdamW on the same model (whose state
    follows the parameter dtype). The state follows the parameter dtype by default; the
    "fp32 state" row is the explicit ``state_dtype=torch.float32`` option."""
    from rankwise.models import load_model

    factories = make_optimizers(lr_scale=0.01)
    factories["galore_adamw (fp32 state)"] = lambda model: ro.create(
        "galore_adamw", model, rank_fraction=RANK_FRACTION, update_proj_gap=T_AMORTISE,
        target_modules=TARGETS, lr=1e-4, state_dtype=torch.float32)
    out: dict[str, Any] = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = load_model("smollm2-135m").to(dtype)
        model.train()
        ids = torch.randint(0, 49152, (1, seq_len), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        projected = _projected(model)
        rows: dict[str, Any] = {}
        for label in [k for k in BF16_LABELS if k in factories]:
            _trim()
            opt = factories[label](model)
            opt.step()
            rows[label] = {"state_bytes": profiling.optimizer_state_bytes(opt),
                           "state_bytes_projected": _state_bytes(opt, projected)}
            if label == "galore-torch GaLoreAdamW":
                rows[label]["hidden_projector_bytes"] = _galore_torch_projector_bytes(
                    opt, projected)
            del opt
        ref = rows["torch AdamW"]
        for r in rows.values():
            r["ratio_vs_adamw"] = r["state_bytes"] / ref["state_bytes"]
            r["projected_ratio_vs_adamw"] = r["state_bytes_projected"] / ref[
                "state_bytes_projected"]
        out[str(dtype).removeprefix("torch.")] = rows
        del model
        _trim()
    return out


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
        for label in ("galore_adamw (svd, int8 projector)", "galore_adamw (svd, bf16 projector)"):
            factories.pop(label)  # state-bytes rows: SmolLM2 only
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
    """Own blockwise int8 moments (qstate.py; fused by torch.compile, qstate_fused.py, and the
    eager codec) vs torchao's
    AdamW8bit (dynamic-tree int8, the bitsandbytes map) vs fp32 AdamW on one matrix the size
    of a low-rank moment, with heavy-tailed gradients: update error and step time."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * torch.randn(shape, generator=gen).exp()
             for _ in range(steps)]

    from rankwise.optim import qstate_fused

    def run(make, eager=False):
        w = nn.Parameter(w0.clone())
        opt = make(w)
        times = []
        was, qstate_fused._disabled = qstate_fused._disabled, eager or qstate_fused._disabled
        try:
            for g in grads:
                w.grad = g
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
        finally:
            qstate_fused._disabled = was
        return w.detach(), times, profiling.optimizer_state_bytes(opt)

    makers = {
        "fp32 AdamW (torch)": lambda w: torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0),
        "rankwise int8 (state_bits=8)": lambda w: ro.LowRankOptimizer(
            [w], lr=1e-3, state_bits=8, min_8bit_size=0, block_size=256),
        "rankwise int8, eager codec": lambda w: ro.LowRankOptimizer(
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
        w, times, nbytes = run(make, eager="eager" in label)
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
    peer = s["optimizers"]["galore-torch GaLoreAdamW"]
    lines = [
        "# rankwise.optim benchmark", "",
        f"Machine: {res['machine']}. Rank d/4 per matrix (rank_fraction 0.25); "
        f"amortised step = step + refresh / {T_AMORTISE}. Step times are medians of "
        f"{s['rounds']} interleaved rounds (optimizers take turns on the same held gradients, "
        "in batches that each include galore-torch; ratios are taken within a batch).", "",
        f"## SmolLM2-135M ({s['steps']} steps, batch {s['batch_size']} x {s['seq_len']} "
        f"tokens; {s['projected_params'] / 1e6:.1f}M of {s['total_params'] / 1e6:.1f}M "
        "params projected)", "",
        "| optimizer | state MiB | x AdamW | projected-only x AdamW | peak RSS 1st step MiB "
        "| step s | step x galore-torch | refresh s | amortised x galore-torch | loss after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in s["optimizers"].items():
        lines.append(
            f"| {label} | {_mib(r['state_bytes'])} | {r['state_ratio_vs_adamw']:.3f} | "
            f"{r['state_ratio_projected_vs_adamw']:.3f} | {_mib(r['peak_rss_first_step'])} | "
            f"{r['step_s']:.3f} | {r['step_ratio_vs_galore_torch']:.2f} | "
            f"{r['refresh_s']:.2f} | {r['amortised_ratio_vs_galore_torch']:.2f} | "
            f"{r['loss_after']:.4f} |")
    hidden = peer["hidden_projector_bytes"]
    lines += ["", "galore-torch keeps its projector as a Python object in the state (not a "
              "tensor entry, so `state_bytes` above misses it), and that projector is a *view* "
              "of the full SVD factor (Vh[:r] of the whole min(m, n)-row Vh, or U[:, :r]), so "
              f"the full factor stays alive: {_mib(hidden)} MiB. Counted, galore-torch's state "
              "over the projected matrices is "
              f"{peer['state_ratio_projected_with_projector_vs_adamw']:.3f}x AdamW "
              f"(vs {peer['state_ratio_projected_vs_adamw']:.3f}x without).", ""]
    lines += ["Refresh of every projected matrix (one subspace computation each; capture = "
              "mean ||G Pᵀ||² / sum of the top-r σ² of the gradient the subspace is computed "
              "from, 1 = exact SVD; the warm refresh starts from batch 0's subspace and is "
              "computed and scored on batch 1's gradients):", "",
              "| projector | seconds | x galore-torch SVD | capture |", "|---|---|---|---|"]
    cap = s["refresh_capture"]
    for k, v in s["refresh_s"].items():
        c = cap.get(k)
        lines.append(f"| {k} | {v:.3f} | {s['refresh_ratio_vs_galore_torch'][k]:.3f} | "
                     f"{'-' if c is None else f'{c:.4f}'} |")
    for k, c in cap.items():
        if k not in s["refresh_s"]:
            lines.append(f"| {k} | - | - | {c:.4f} |")
    t = res["tiny_llama"]
    lines += ["", f"## Tiny Llama from scratch ({t['params'] / 1e6:.1f}M params, vocab "
              f"{t['vocab']}, {t['steps']} steps, batch {t['batch_size']} x {t['seq_len']}, "
              f"refresh gap {t['update_proj_gap']}; s/step is the median over the run, "
              "optimizers run one after another)", "",
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
    if "state_dtypes" in res:
        lines += ["", "## State bytes on a bf16 and an fp32 SmolLM2 (one step, vs torch AdamW "
                  "on the same model; state follows the parameter dtype unless the row says)",
                  "", "| optimizer | bf16: x AdamW | bf16: projected x AdamW | fp32: x AdamW | "
                  "fp32: projected x AdamW |", "|---|---|---|---|---|"]
        bf, fp = res["state_dtypes"]["bfloat16"], res["state_dtypes"]["float32"]
        for label in bf:
            lines.append(f"| {label} | {bf[label]['ratio_vs_adamw']:.3f} | "
                         f"{bf[label]['projected_ratio_vs_adamw']:.3f} | "
                         f"{fp[label]['ratio_vs_adamw']:.3f} | "
                         f"{fp[label]['projected_ratio_vs_adamw']:.3f} |")
        lines += ["", "galore-torch's rows leave out its projector objects (not tensors in the "
                  "state; see above)."]
    if "quantized_weights" in res:
        q = res["quantized_weights"]
        lines += ["", "## Q-GaLore quantised weights (rankwise.optim.quantize_weights_): weight "
                  f"bytes of SmolLM2-135M's {q['projected_params'] / 1e6:.1f}M projected "
                  "entries (codes + fp32 group scales; computed, not trained)", "",
                  "| store | projected x bf16 | projected x fp32 | whole model x bf16 | "
                  "whole model x fp32 |", "|---|---|---|---|---|"]
        for label, r in q["rows"].items():
            lines.append(f"| {label} | {r['projected_vs_bf16']:.4f} | "
                         f"{r['projected_vs_fp32']:.4f} | {r['model_vs_bf16']:.4f} | "
                         f"{r['model_vs_fp32']:.4f} |")
    if "step_before_after" in res:
        ab = res["step_before_after"]
        lines += ["", f"## Step before / after the 8-bit and back-projection work ({ab['date']}; "
                  f"medians of {ab['rounds']} interleaved rounds, one process, shared machine)",
                  "", "before: eager 8-bit codec (qstate.py) and addmm_ accumulation; after: the "
                  "compiled 8-bit pass (qstate_fused.py) and GEMM + add.", "",
                  "| optimizer | before x galore-torch | after x galore-torch | "
                  "galore-torch step s |", "|---|---|---|---|"]
        for label, r in ab["rows"].items():
            lines.append(f"| {label} | {r['before']:.2f} | {r['after']:.2f} | "
                         f"{r['galore_torch_step_s']:.3f} |")
    for m in s.get("remeasured", []):
        lines += ["", f"Rows re-measured on {m['date']} (the rest are from the full run; each "
                  "row's ratios are against the baselines of its own run, the machine shared: "
                  f"galore-torch's step took {m['galore_torch_step_s']:.2f} s in it, so load was "
                  "heavy and ratios of one run vary by ~0.2; the before/after table above is "
                  "the controlled comparison): " + ", ".join(m["labels"]) + "."]
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
        n_drawn = len(ax.get_lines())  # past 10 lines tab10 repeats: dash the rest
        ax.plot(range(k - 1, len(curve)), smooth.tolist(), label=label, lw=1.3,
                ls="-" if n_drawn < 10 else "--")
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
    for label, r in opts.items():
        if label == "torch AdamW":
            continue
        x = r["state_ratio_projected_vs_adamw"]
        extra = ""
        if label == "galore-torch GaLoreAdamW":
            x = r["state_ratio_projected_with_projector_vs_adamw"]
            extra = " (its projector objects counted)"
        lines.append(f"state over projected matrices, projectors counted, {label}: {x:.3f}x "
                     f"AdamW{extra} ({'meets' if x <= 0.30 else 'misses'} <= 0.30)")
    for k in ("randomized", "randomized (warm)", "randomized (power_iters=1)",
              "randomized (hmt, rankwise.linalg)", "dct"):
        r = s["refresh_ratio_vs_galore_torch"][k]
        lines.append(f"refresh, {k}: {r:.3f}x galore-torch's SVD "
                     f"({'meets' if r <= 0.2 else 'misses'} <= 0.2)")
    if "state_dtypes" in res:
        bf = res["state_dtypes"]["bfloat16"]
        for label, goal in (("apollo", 0.25), ("dct_adamw", 0.25), ("galore_adamw (svd)", 0.27),
                            ("galore_adamw (svd, int8 projector)", 0.27),
                            ("galore_adamw (svd, int4 projector)", 0.27),
                            ("q_galore_adamw8bit", 0.27)):
            if label not in bf:
                continue
            x = bf[label]["projected_ratio_vs_adamw"]
            lines.append(f"bf16 state over projected matrices, {label}: {x:.3f}x AdamW on the "
                         f"same bf16 model ({'meets' if x <= goal + 5e-4 else 'misses'} "
                         f"<= {goal})")
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
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    ap.add_argument("--smollm-only", action="store_true",
                    help="rerun the SmolLM2 part and the bf16/fp32 state bytes only, keeping "
                         "OUT/optim.json's tiny-Llama and 8-bit-moment parts")
    ap.add_argument("--steps", type=int, default=4, help="SmolLM2 steps per optimizer")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved refresh-timing rounds")
    ap.add_argument("--labels", nargs="+", default=None,
                    help="only these optimizers (torch AdamW and galore-torch always run)")
    ap.add_argument("--skip-state-dtypes", action="store_true",
                    help="with --smollm-only --labels: keep the earlier bf16/fp32 state bytes")
    ap.add_argument("--step-ab", action="store_true",
                    help="only the same-run before/after step ratios of --labels (kept in "
                         "OUT/optim.json next to the earlier results)")
    ap.add_argument("--from-json", action="store_true",
                    help="rebuild optim.md/png and the goals from OUT/optim.json (no runs)")
    args = ap.parse_args(argv)
    if args.from_json:
        import json

        res = json.loads((args.out / "optim.json").read_text())
        order = list(make_optimizers())  # the JSON's keys are sorted: back to run order
        for part in ("smollm2", "tiny_llama"):
            opts = res[part]["optimizers"]
            keys = [k for k in order if k in opts] + [k for k in opts if k not in order]
            res[part]["optimizers"] = {k: opts[k] for k in keys}
        return _write_outputs(res, args.out)
    global TARGETS, LABELS
    LABELS = args.labels
    if args.step_ab:
        import json

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        torch.set_num_threads(args.threads)
        res = json.loads((args.out / "optim.json").read_text())
        res["step_before_after"] = bench_step_before_after(args.labels or [], args.rounds)
        write_json(args.out / "optim.json", res)
        return _write_outputs(res, args.out)
    if args.quick:
        TARGETS = r"model\.layers\.[01]\.(self_attn|mlp)\.\w+_proj"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.smollm_only:
        import json

        res = json.loads((args.out / "optim.json").read_text())
        smol = bench_smollm(steps=args.steps, seq_len=64, batch_size=2,
                            repeat=args.repeat, rounds=args.rounds)
        dtypes = {} if args.skip_state_dtypes else bench_state_dtypes()
        if LABELS is None:
            res["smollm2"], res["state_dtypes"] = smol, dtypes
        else:  # only the named rows are replaced; every other row keeps its earlier run
            _merge_rows(res, smol, dtypes, LABELS)
            res["state_8bit"] = bench_8bit(steps=100)
        res["quantized_weights"] = bench_qweight_bytes()
        res["machine"] = (f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
                          "shared with ~8 concurrent jobs (load average ~20 on 2 cores): "
                          "only ratios measured interleaved in one process mean anything")
        res["runtime_s_smollm"] = time.perf_counter() - t0
        write_json(args.out / "optim.json", res)
        return _write_outputs(res, args.out)
    if args.quick:
        smol = bench_smollm(steps=2, seq_len=16, batch_size=1, repeat=1, rounds=2)
        tiny = bench_tiny(steps=20, seq_len=32, batch_size=4, gap=10)
        q8 = bench_8bit(steps=10)
    else:
        smol = bench_smollm(steps=4, seq_len=64, batch_size=2, repeat=3,
                            rounds=args.rounds)
        tiny = bench_tiny(steps=150, seq_len=64, batch_size=8, gap=50)
        q8 = bench_8bit(steps=100)
    res = {"machine": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "smollm2": smol, "tiny_llama": tiny, "state_8bit": q8,
           "state_dtypes": bench_state_dtypes()}
    res["runtime_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "optim.json", res)  # raw numbers first: --from-json rebuilds the rest
    return _write_outputs(res, args.out)


def bench_step_before_after(labels: list[str], rounds: int) -> dict[str, Any]:
    """Optimizer-step time of each label vs galore-torch, "before" (the eager 8-bit codec,
    qstate.py, and back-projection accumulated by addmm_) and "after" (the compiled 8-bit pass,
    qstate_fused.py, and GEMM + add), the three interleaved in one process on the same held
    SmolLM2 gradients, so load hits them alike."""
    from rankwise.models import load_model
    from rankwise.optim import projector, qstate_fused

    model = load_model("smollm2-135m")
    model.train()
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    factories = make_optimizers(lr_scale=0.01)

    def stepper(opt: Any, before: bool) -> Callable[[], None]:
        def run() -> None:
            saved = qstate_fused._disabled, projector.ADD_UP_TEMP_MAX
            if before:
                qstate_fused._disabled, projector.ADD_UP_TEMP_MAX = True, 0
            try:
                opt.step()
            finally:
                qstate_fused._disabled, projector.ADD_UP_TEMP_MAX = saved
        return run

    rows = {}
    for label in labels:
        _trim()
        peer = factories["galore-torch GaLoreAdamW"](model)
        fns = {"galore-torch": peer.step, "before": stepper(factories[label](model), True),
               "after": stepper(factories[label](model), False)}
        for fn in fns.values():  # state creation, refresh (and the compile): untimed
            fn()
        times = _interleaved(fns, rounds)
        ref = _median(times["galore-torch"])
        rows[label] = {"galore_torch_step_s": ref,
                       "before": _median(times["before"]) / ref,
                       "after": _median(times["after"]) / ref}
        logging.getLogger(__name__).info("%s: %s", label, rows[label])
        del fns, peer
    return {"rounds": rounds, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def _merge_rows(res: dict[str, Any], smol: dict[str, Any], dtypes: dict[str, Any],
                labels: list[str]) -> None:
    """Put the re-measured rows `labels` of a ``--labels`` run into the earlier results (each
    row's ratios were taken against the baselines of its own run, so rows stay comparable)."""
    for label in labels:
        res["smollm2"]["optimizers"][label] = smol["optimizers"][label]
        for dt, rows in dtypes.items():
            if label in rows:
                res["state_dtypes"][dt][label] = rows[label]
    earlier = [m for m in res["smollm2"].get("remeasured", []) if m["labels"] != list(labels)]
    res["smollm2"]["remeasured"] = earlier
    res["smollm2"]["remeasured"].append(
        {"labels": list(labels), "date": time.strftime("%Y-%m-%d"),
         "galore_torch_step_s": smol["optimizers"]["galore-torch GaLoreAdamW"]["step_s"]})


def bench_qweight_bytes() -> dict[str, Any]:
    """Q-GaLore's quantised weights on SmolLM2-135M's projected matrices: bytes of the codes +
    group scales (`rankwise.optim.qweight.quantized_weight_bytes`) vs the same matrices in
    bf16 / fp32, and for the whole model (embedding and norms kept in bf16 / fp32)."""
    from rankwise.models import load_model
    from rankwise.optim.qweight import quantized_weight_bytes

    model = load_model("smollm2-135m")
    shapes = [tuple(p.shape) for p in _projected(model)]
    n = sum(math.prod(s) for s in shapes)
    total = sum(p.numel() for p in model.parameters())
    rows = {}
    for bits in (8, 4):
        for group in (256, 64):
            q = sum(quantized_weight_bytes(s, bits, group) for s in shapes)
            rows[f"int{bits}, group {group}"] = {
                "bytes": q, "projected_vs_bf16": q / (2 * n), "projected_vs_fp32": q / (4 * n),
                "model_vs_bf16": (q + 2 * (total - n)) / (2 * total),
                "model_vs_fp32": (q + 4 * (total - n)) / (4 * total)}
    return {"projected_params": n, "total_params": total, "rows": rows}


def _write_outputs(res: dict[str, Any], out: Path) -> int:
    res["goals"] = goals(res)
    write_json(out / "optim.json", res)
    write_text(out / "optim.md", report(res))
    plot(res, out / "optim.png")
    print(report(res))
    print(f"runtime {res['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
