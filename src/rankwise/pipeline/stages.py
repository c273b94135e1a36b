"""The four stages of `shrink`: compress, compensate, heal, export.

Each stage takes the run context and the model the previous stage left, and returns the model
it leaves plus a JSON record (seconds, held-out and test perplexity, parameters, its choices).
Choices are measured, never assumed: the compression method and allocation, whether EoRA
compensation is used (per layer, and then as a whole), and whether healing is kept, are all
decided on held-out data (see rankwise.pipeline.measure).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn

from rankwise.pipeline.config import AUTO_CANDIDATES, AUTO_UPDATES, ShrinkConfig
from rankwise.pipeline.context import RunContext
from rankwise.pipeline.measure import heldout_perplexity
from rankwise.pipeline.structure import fold_compensation, layer_table

logger = logging.getLogger(__name__)

__all__ = ["RunContext", "compensate_stage", "compress_stage", "heal_stage"]


# ----------------------------------------------------------------------------- 1. compress
def _streaming_compress_stage(ctx: RunContext, start: float) -> tuple[nn.Module, dict[str, Any]]:
    """The compress stage block by block from the model's files (rankwise.compress.streaming):
    one method (no candidate search, which needs the model resident), written and reloaded."""
    import tempfile

    from rankwise.compress import compress_streaming, load_compressed

    c = ctx.config
    if c.method == "auto":
        raise ValueError("streaming compresses with one method: pass method= (e.g. svd_llm)")
    with tempfile.TemporaryDirectory() as tmp:
        report = compress_streaming(c.model, f"{tmp}/compressed", c.method, c.ratio, allocation=c.allocation,
                                    calibration=c.calibration, n_samples=c.n_samples, seq_len=c.seq_len,
                                    seed=c.seed, target_modules=list(ctx.targets), tokenizer=ctx.tokenizer,
                                    progress=False)
        model = load_compressed(f"{tmp}/compressed")
    record = {"candidates": [], "method": report.method, "allocation": report.allocation,
              "calibration": report.calibration, "report": report.to_dict(), "streaming": True}
    ctx.measure(model, record)
    record["layers"] = layer_table(model, ctx.targets)
    record["seconds"] = time.perf_counter() - start
    return model, record


def _candidates(config: ShrinkConfig) -> tuple[list[tuple[str, str]], list[str]]:
    if config.method != "auto":
        from rankwise.compress import get_preset

        return [(config.method, config.allocation or get_preset(config.method).allocation)], []
    if config.allocation is not None:
        return [("svd-llm", config.allocation)], list(AUTO_UPDATES)
    return list(AUTO_CANDIDATES), list(AUTO_UPDATES)


def compress_stage(ctx: RunContext) -> tuple[nn.Module, dict[str, Any]]:
    """Try the candidate (method, allocation) pairs at the target ratio; keep the best on held-out."""
    from rankwise import surgery
    from rankwise.compress import compress_

    c = ctx.config
    start = time.perf_counter()
    if getattr(c, "streaming", False):  # set by a config that has the field (issue 18)
        return _streaming_compress_stage(ctx, start)
    ids, info, stats = ctx.calibration()
    model = ctx.working_copy()
    originals = {f: model.get_submodule(f) for f in ctx.targets}
    tried: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_modules: dict[str, nn.Module] = {}

    def attempt(method: str, allocation: str, compressor: Any = None) -> None:
        nonlocal best, best_modules
        ctx.status(f"compress: {method} + {allocation}")
        t = time.perf_counter()
        kwargs: dict[str, Any] = {"compressor": compressor} if compressor is not None else {"stats": stats}
        report = compress_(model, method, c.ratio, allocation=allocation, calibration=ids, tokenizer=ctx.tokenizer,
                           target_modules=list(ctx.targets), progress=False, **kwargs)
        seconds = time.perf_counter() - t
        ppl = heldout_perplexity(model, ctx.heldout)
        row = {"method": method, "allocation": allocation, "heldout_ppl": ppl, "seconds": seconds,
               "ratio_targets": report.ratio_targets}
        tried.append(row)
        logger.info("%s + %s: held-out ppl %.3f", method, allocation, ppl)
        if best is None or ppl < best["heldout_ppl"]:
            best, best_modules = row | {"report": report.to_dict()}, {f: model.get_submodule(f) for f in ctx.targets}
        surgery.restore(model, originals)

    firsts, updates = _candidates(c)
    for method, allocation in firsts:
        # one set of SVDs for every allocation (and, with a shared cache, every ratio)
        attempt(method, allocation, ctx.fitted_compressor(method) if method == "svd-llm" else None)
    ctx.release_compressors()  # ~2 GB of fp64 SVDs for SmolLM2: refitting takes seconds
    for method in updates:
        attempt(method, best["allocation"])
    for f, m in best_modules.items():
        surgery.replace_module(model, f, m)
    record = {"candidates": tried, "method": best["method"], "allocation": best["allocation"],
              "calibration": info, "report": best["report"]}
    ctx.measure(model, record)
    record["layers"] = layer_table(model, ctx.targets)
    record["seconds"] = time.perf_counter() - start
    return model, record


# ----------------------------------------------------------------------------- 2. compensate
def _represented_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a (compressed) layer computes, fp64."""
    from rankwise.compress.eora import CompensatedLinear

    if isinstance(module, CompensatedLinear):
        w = module.base_weight().detach().double() + (module.lora_B.weight.detach().double()
                                                      @ module.lora_A.weight.detach().double())
    elif hasattr(module, "dense_weight"):
        w = module.dense_weight().detach().double()
    else:
        w = module.weight.detach().double()
    return w


def heldout_error(module: nn.Module, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """Calibration-weighted error `||(W - W_hat) X||_F^2 = tr(D G D^T)` on held-out inputs."""
    d = weight.detach().double() - _represented_weight(module)
    return float(((d @ gram.double()) * d).sum())


def compensate_stage(ctx: RunContext, model: nn.Module, previous: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """EoRA inside the same budget: rank k of each layer's r moves to a compensation path.

    For each k in `compensation_ranks`, the chosen method is rerun with `compensation_rank=k`
    (identical parameter count per layer); each layer takes the variant with the lower held-out
    error `tr(D G_heldout D^T)`, and the mixed model is kept only if its held-out perplexity
    beats the uncompensated one.
    """
    from rankwise import surgery
    from rankwise.compress import compress_

    c = ctx.config
    start = time.perf_counter()
    record: dict[str, Any] = {"enabled": c.compensation, "variants": [], "used_rank": 0, "layers_compensated": 0}
    if not c.compensation:
        record |= {k: previous[k] for k in previous if k.endswith("_ppl") or k.startswith(("params", "ratio"))}
        record |= {"changed": False, "seconds": time.perf_counter() - start}
        return model, record
    ids, _, stats = ctx.calibration()
    grams = ctx.heldout_grams()
    base_ppl = previous["heldout_ppl"]
    best_ppl, best_variant = base_ppl, None
    for k in c.compensation_ranks:
        ctx.status(f"compensate: EoRA rank {k}")
        variant = ctx.working_copy()
        compress_(variant, previous["method"], c.ratio, allocation=previous["allocation"], calibration=ids,
                  tokenizer=ctx.tokenizer, stats=stats, compensation_rank=k, target_modules=list(ctx.targets),
                  progress=False)
        chosen = {}
        for f in ctx.targets:
            w = ctx.dense.get_submodule(f).weight
            mine, theirs = model.get_submodule(f), variant.get_submodule(f)
            if type(theirs).__name__ == "CompensatedLinear" and \
                    heldout_error(theirs, w, grams[f].gram) < heldout_error(mine, w, grams[f].gram):
                chosen[f] = theirs
        row: dict[str, Any] = {"rank": k, "layers": len(chosen), "heldout_ppl": None}
        if chosen:
            with surgery.replaced(model, chosen):
                row["heldout_ppl"] = heldout_perplexity(model, ctx.heldout)
            if row["heldout_ppl"] < best_ppl:
                best_ppl, best_variant = row["heldout_ppl"], (k, chosen)
        record["variants"].append(row)
        del variant
    if best_variant is not None:
        k, chosen = best_variant
        for f, m in chosen.items():
            surgery.replace_module(model, f, m)
        record |= {"used_rank": k, "layers_compensated": len(chosen), "compensated": sorted(chosen)}
        ctx.measure(model, record)
    else:
        record |= {k: previous[k] for k in previous if k.endswith("_ppl") or k.startswith(("params", "ratio"))}
    record["changed"] = best_variant is not None
    record["layers"] = layer_table(model, ctx.targets)
    record["seconds"] = time.perf_counter() - start
    return model, record


# ----------------------------------------------------------------------------- 3. heal
def _healing_inputs(ctx: RunContext) -> tuple[Any, Any]:
    """(batches, loss_fn) for heal_: None, None = the user's text with the method's own loss."""
    from rankwise.pipeline import distill

    c = ctx.config
    source = c.healing_source
    if source == "text":
        return None, None
    if source == "teacher":
        seqs = ctx.teacher_text()[:, : c.heal_seq_len]
        batches = distill.teacher_batches(seqs, c.heal_batch_size, seed=c.seed)
    else:
        from rankwise.data.domains import mixture_batches

        batches = mixture_batches(distill.MIXTURE, ctx.tokenizer, c.heal_batch_size, c.heal_seq_len, seed=c.seed)
    loss_fn = distill.distill_loss_fn(ctx.dense, c.distill_alpha) if c.heal_method == "distill" else None
    return batches, loss_fn


def heal_stage(ctx: RunContext, model: nn.Module, previous: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Fold EoRA paths into the factors, fine-tune within the budget, keep it if held-out improves."""
    from rankwise.pipeline.healing import heal_

    c = ctx.config
    start = time.perf_counter()
    record: dict[str, Any] = {"method": c.heal_method, "folded": fold_compensation(model)}
    if not c.heals:
        record |= {k: previous[k] for k in previous if k.endswith("_ppl") or k.startswith(("params", "ratio"))}
        record |= {"kept": False, "changed": False, "seconds": time.perf_counter() - start}
        return model, record
    before = copy.deepcopy(model.state_dict())
    budget = c.heal_minutes * 60
    clock = time.process_time if c.heal_clock == "cpu" else time.perf_counter
    unit = "CPU-min" if c.heal_clock == "cpu" else "min"

    def on_step(step: int, seconds: float, loss: float) -> None:
        left = f"{seconds / 60:.1f}/{c.heal_minutes:g} {unit}" if budget else f"{step}/{c.heal_steps}"
        ctx.status(f"heal ({c.heal_method}): step {step}, loss {loss:.3f}, {left}", quiet=step % 10 != 0)

    batches, loss_fn = _healing_inputs(ctx)
    ctx.status(f"heal ({c.heal_method}, {c.healing_source})")
    result = heal_(model, ctx.streams[0], method=c.heal_method, minutes=c.heal_minutes, max_steps=c.heal_steps,
                   teacher=ctx.dense if c.heal_method == "distill" else None, lr=c.heal_lr,
                   batch_size=c.heal_batch_size, seq_len=c.heal_seq_len, lora_rank=c.lora_rank,
                   distill_alpha=c.distill_alpha, seed=c.seed, on_step=on_step, batches=batches, loss_fn=loss_fn,
                   clock=clock)
    record["training"] = result.to_dict()
    record["data"] = c.healing_source
    ppl = heldout_perplexity(model, ctx.heldout)
    record["heldout_ppl_trained"] = ppl
    record["kept"] = ppl < previous["heldout_ppl"]
    if record["kept"]:
        ctx.measure(model, record)
    else:
        logger.warning("healing raised held-out perplexity (%.3f -> %.3f): keeping the unhealed model",
                       previous["heldout_ppl"], ppl)
        model.load_state_dict(before)
        record |= {k: previous[k] for k in previous if k.endswith("_ppl") or k.startswith(("params", "ratio"))}
    record["changed"] = record["kept"]
    record["seconds"] = time.perf_counter() - start
    return model, record
