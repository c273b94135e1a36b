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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.pipeline.config import AUTO_CANDIDATES, AUTO_UPDATES, ShrinkConfig
from rankwise.pipeline.measure import heldout_perplexity, test_perplexity
from rankwise.pipeline.structure import fold_compensation, layer_table, target_params

logger = logging.getLogger(__name__)

__all__ = ["RunContext", "compensate_stage", "compress_stage", "heal_stage"]


@dataclass
class RunContext:
    """What every stage may need, computed once and only when first asked for."""

    config: ShrinkConfig
    dense: nn.Module
    tokenizer: Any
    status: Callable[..., None] = lambda _msg, quiet=False: None
    _cache: dict[str, Any] = field(default_factory=dict)
    shared_cache: bool = False

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        if "targets" not in self._cache:
            from rankwise.compress import find_targets

            found = find_targets(self.dense, self.config.target_modules)
            self._cache["targets"] = {f: (m.out_features, m.in_features) for f, m in found.items()}
        return self._cache["targets"]

    @property
    def streams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, held-out) token streams (healing text and decision data)."""
        if "streams" not in self._cache:
            from rankwise.pipeline.measure import split_text

            self._cache["streams"] = split_text(self.tokenizer, self.config.text)
        return self._cache["streams"]

    @property
    def heldout(self) -> torch.Tensor:
        return self.streams[1][: self.config.select_tokens]

    def calibration(self) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        """(ids, info, stats): calibration input_ids and their Grams on the dense model."""
        if "calib" not in self._cache:
            from rankwise.calibrate import capture_input_stats
            from rankwise.compress import calibration_ids

            c = self.config
            self.status("calibration statistics")
            source = self._calibration_source()
            ids, info = calibration_ids(self.dense, source, self.tokenizer, n_samples=c.n_samples,
                                        seq_len=c.seq_len, seed=c.seed)
            if c.calibration in ("mixture", "teacher"):  # config.CALIBRATION_SOURCES
                info = info | {"source": c.calibration}
            stats = capture_input_stats(self.dense, ids, dict(self._dense_targets()), stats=("gram",),
                                        share_inputs=True, progress=False)
            self._cache["calib"] = (ids, info, stats)
        return self._cache["calib"]

    def _calibration_source(self) -> Any:
        """`config.calibration`, with "mixture" and "teacher" turned into input_ids."""
        c = self.config
        if c.calibration == "mixture":
            from rankwise.data.domains import mixture_windows
            from rankwise.pipeline.distill import MIXTURE

            return mixture_windows(MIXTURE, self.tokenizer, c.n_samples, c.seq_len, seed=c.seed)
        if c.calibration == "teacher":
            ids = self.teacher_text()
            if ids.shape[0] < c.n_samples or ids.shape[1] < c.seq_len:
                raise ValueError(f"calibration='teacher' needs {c.n_samples} x {c.seq_len} tokens but "
                                 f"teacher_samples={c.teacher_samples} x 256 were sampled: raise teacher_samples")
            return ids[: c.n_samples, : c.seq_len]
        return c.calibration

    def teacher_text(self) -> torch.Tensor:
        """(teacher_samples, max(256, heal_seq_len)) ids sampled from the dense model (LLM-QAT's
        recipe; cached on disk by rankwise.data.teacher)."""
        c = self.config
        key = f"teacher:{c.teacher_samples}:{c.seed}:{max(256, c.heal_seq_len)}"
        if key not in self._cache:
            from rankwise.data.teacher import teacher_sequences

            self.status("sampling teacher text")
            self._cache[key] = teacher_sequences(
                self.dense, c.teacher_samples, max(256, c.heal_seq_len), seed=c.seed,
                vocab_size=len(self.tokenizer) if self.tokenizer is not None else None,
                progress=lambda done, n: self.status(f"sampling teacher text {done}/{n}", quiet=True))
        return self._cache[key]

    def domains_used(self) -> dict[str, list[str]]:
        """Which embedded LM domains calibration and healing read (the others are held out)."""
        from rankwise.data.domains import DOMAINS
        from rankwise.pipeline.distill import MIXTURE, domains_of

        c = self.config
        calib = c.calibration
        if calib == "mixture":
            cal = list(MIXTURE)
        elif calib is None:
            cal = ["python-docs"]
        else:
            cal = [calib] if isinstance(calib, str) and calib in DOMAINS else []
        heal = domains_of(c.healing_source, c.text) if c.heals else []
        return {"calibration": cal, "healing": heal}

    def heldout_grams(self) -> dict[str, Any]:
        """Input Grams of the dense model's targets on held-out tokens (per-layer decisions)."""
        if "heldout_grams" not in self._cache:
            from rankwise.calibrate import capture_input_stats

            ids = self.heldout[: (self.heldout.numel() // 256) * 256].view(-1, 256)
            self._cache["heldout_grams"] = capture_input_stats(
                self.dense, ids, dict(self._dense_targets()), stats=("gram",), share_inputs=True, progress=False)
        return self._cache["heldout_grams"]

    def use_cache(self, cache: dict[str, Any] | None) -> None:
        """Share calibration statistics and held-out Grams with other runs on the same dense
        model and data settings (a benchmark sweeping ratios); reset on a mismatch."""
        if cache is None:
            return
        c = self.config
        key = repr((id(self.dense), c.model, c.calibration, c.n_samples, c.seq_len, c.seed, c.target_modules,
                    c.text, c.select_tokens))
        if cache.get("_key") != key:
            cache.clear()
            cache["_key"] = key
        self._cache = cache
        self.shared_cache = True

    def fitted_compressor(self, method: str) -> Any:
        """A compressor of `method` fitted to the calibration statistics (SVDs cached inside)."""
        from rankwise.compress import build_compressor

        key = f"compressor:{method}"
        if key not in self._cache:
            _, _, stats = self.calibration()
            comp = build_compressor(method)
            for f in self.targets:
                comp.observe_stats(f, stats[f])
            self._cache[key] = comp
        return self._cache[key]

    def release_compressors(self) -> None:
        for key in [k for k in self._cache if k.startswith("compressor:")]:
            del self._cache[key]

    def _dense_targets(self) -> dict[str, nn.Module]:
        return {f: self.dense.get_submodule(f) for f in self.targets}

    def domain_perplexities(self, model: nn.Module, python_docs_ppl: float) -> dict[str, float]:
        """Test perplexity on every embedded LM domain (python-docs: the test_ppl just measured)."""
        from rankwise.data.domains import DOMAINS
        from rankwise.pipeline.measure import domain_perplexities

        self.status("per-domain perplexity")
        others = [d for d in DOMAINS if d != "python-docs"]
        return {"python-docs": python_docs_ppl} | domain_perplexities(model, self.tokenizer, self.config.eval_tokens,
                                                                       others)

    def working_copy(self) -> nn.Module:
        return copy.deepcopy(self.dense)

    def measure(self, model: nn.Module, record: dict[str, Any], *, test: bool = True) -> dict[str, Any]:
        """Add held-out / test perplexity and exact parameter counts of `model` to `record`."""
        from rankwise.surgery import count_parameters

        self.status("held-out perplexity")
        record["heldout_ppl"] = heldout_perplexity(model, self.heldout)
        if test:
            self.status("test perplexity")
            record["test_ppl"] = test_perplexity(model, self.tokenizer, self.config.eval_tokens)
            record["domains"] = self.domain_perplexities(model, record["test_ppl"])
        before = target_params(self.dense, self.targets)
        after = target_params(model, self.targets)
        total_before, total_after = count_parameters(self.dense), count_parameters(model)
        record |= {"params_targets_before": before, "params_targets": after,
                   "ratio_targets": 1 - after / before, "params_model_before": total_before,
                   "params_model": total_after, "ratio_model": 1 - total_after / total_before}
        return record


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

    def on_step(step: int, seconds: float, loss: float) -> None:
        left = f"{seconds / 60:.1f}/{c.heal_minutes:g} min" if budget else f"{step}/{c.heal_steps}"
        ctx.status(f"heal ({c.heal_method}): step {step}, loss {loss:.3f}, {left}", quiet=step % 10 != 0)

    batches, loss_fn = _healing_inputs(ctx)
    ctx.status(f"heal ({c.heal_method}, {c.healing_source})")
    result = heal_(model, ctx.streams[0], method=c.heal_method, minutes=c.heal_minutes, max_steps=c.heal_steps,
                   teacher=ctx.dense if c.heal_method == "distill" else None, lr=c.heal_lr,
                   batch_size=c.heal_batch_size, seq_len=c.heal_seq_len, lora_rank=c.lora_rank,
                   distill_alpha=c.distill_alpha, seed=c.seed, on_step=on_step, batches=batches, loss_fn=loss_fn)
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
