"""`shrink`: compress -> compensate -> heal -> export in one call, resumable per stage.

    from rankwise.pipeline import shrink
    result = shrink("smollm2-135m", ratio=0.2, out="out/smol-20", heal_minutes=15)
    print(result.summary())
    model = rankwise.load_model("out/smol-20")      # factorised, reduced, generates

Under ``torchrun`` (docs/distributed.md) every rank runs every stage on its own copy (they are
deterministic: no rank waits minutes at a collective), and rank 0 alone writes: the stage
models, state.json, the export and the report, between barriers. After each stage every rank
takes rank 0's record, and the ranks other than 0 load the model rank 0 saved, so the replicas
that heal (data-parallel, `heal_`) and the model every rank returns are rank 0's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.pipeline.config import STAGES, ShrinkConfig
from rankwise.pipeline.state import PipelineInterrupted, PipelineState
from rankwise.train import dist

logger = logging.getLogger(__name__)

__all__ = ["ShrinkResult", "shrink"]

REPORT = "report.md"
RECORD = "pipeline.json"


@dataclass
class ShrinkResult:
    """The exported directory, every stage's record, and the final model (in memory)."""

    out: Path
    stages: dict[str, dict[str, Any]]
    config: dict[str, Any]
    reused: list[str] = field(default_factory=list)
    model: nn.Module | None = None

    def summary(self) -> str:
        from rankwise.pipeline.report import summary_table

        return summary_table(self.stages)


def _load(model_or_name: Any, tokenizer: Any) -> tuple[nn.Module, Any, str]:
    import rankwise

    if isinstance(model_or_name, nn.Module):
        name = str(getattr(getattr(model_or_name, "config", None), "_name_or_path", "") or type(model_or_name).__name__)
        if tokenizer is None:
            if not getattr(getattr(model_or_name, "config", None), "_name_or_path", ""):
                raise ValueError("shrink needs a tokenizer for a model object without a name: pass tokenizer=")
            tokenizer = rankwise.load_tokenizer(name)
        return model_or_name.eval(), tokenizer, name
    if not isinstance(model_or_name, str | Path):
        raise TypeError(f"model_or_name must be a model name, a directory or an nn.Module, got "
                        f"{type(model_or_name).__name__}")
    name = str(model_or_name)
    model = rankwise.load_model(name)
    return model, tokenizer if tokenizer is not None else rankwise.load_tokenizer(name), name


def _load_stage(directory: Path) -> nn.Module:
    from rankwise.compress import load_compressed

    return load_compressed(directory)


def shrink(
    model_or_name: Any,
    ratio: float = 0.2,
    *,
    out: str | Path,
    heal_minutes: float = 15.0,
    heal_method: str = "lowrank",
    heal_data: str = "auto",
    calibration: Any = "mixture",
    text: Any = None,
    tokenizer: Any = None,
    method: str = "auto",
    allocation: str | None = None,
    compensation: bool = True,
    compensation_ranks: Sequence[int] = (16, 32),
    resume: bool = False,
    progress: bool = True,
    stop_after: str | None = None,
    keep_stages: bool = False,
    cache: dict[str, Any] | None = None,
    **options: Any,
) -> ShrinkResult:
    """Compress `model_or_name` by `ratio`, compensate, heal, and export it to `out`.

    Args:
        model_or_name: a bundled name ("smollm2-135m"), a model directory, or a loaded model.
        ratio: fraction of the targeted layers' parameters to remove, in (0, 1).
        out: output directory; `rankwise.load_model(out)` reloads the result in one call.
        heal_minutes: wall-clock budget of the healing fine-tune (0 skips healing).
        heal_method: "lowrank" (the factors on the causal-LM loss, WeLore-style; the default:
            measured best both in domain and, on the mixture, on the held-out domain), "distill" (the factors trained against the dense model: logit KL
            + PELA block-feature MSE), "lora" (LoRA on the factors, merged into them) or "none".
        heal_data: what healing reads: "auto" (default: `text` when given, else "mixture"),
            "text" (`text`, or python-docs), "mixture" (python-docs + fortunes windows: at equal
            compute it kept the held-out domain best, benchmarks/results/pipeline_generalise.md)
            or "teacher" (text sampled from the dense model, LLM-QAT's data-free recipe).
        calibration: calibration text for compression: "mixture" (default: python-docs and
            fortunes windows in equal shares, measured best on held-out domains), "teacher", a
            corpus name, a text source or input_ids; None = python-docs.
        text: healing text (default: the embedded python-docs train split); a file, glob or list
            of documents is cut 90/10 into training and held-out tokens.
        tokenizer: needed when `model_or_name` is a model object without a name.
        method, allocation: "auto" measures the candidates in `config.AUTO_CANDIDATES`; or a
            rankwise.compress method (and allocation) to use as is.
        compensation: try EoRA inside the budget (kept only where held-out error/perplexity improve).
        compensation_ranks: EoRA ranks k to try (k of each layer's rank moves to the EoRA path).
        resume: continue the run in `out` from its last finished stage (settings of finished
            stages must match; changed later settings rerun only the later stages).
        progress: one progress bar over the stages.
        stop_after: raise PipelineInterrupted once this stage is recorded (tests a killed run).
        keep_stages: keep each stage's model under OUT/.rankwise-pipeline after export.
        cache: a dict shared by several calls on the same loaded model and data settings (e.g.
            a sweep over ratios): calibration statistics and held-out Grams are computed once.
            Not part of any stage's settings.
        **options: further ShrinkConfig fields (n_samples, seq_len, seed, target_modules,
            select_tokens, heal_steps, heal_lr, heal_batch_size, heal_seq_len, lora_rank,
            distill_alpha, teacher_samples, eval_tokens, latency).

    Returns:
        ShrinkResult (records of every stage; `.summary()` is the table the CLI prints).
    """
    config = ShrinkConfig(model=str(model_or_name) if isinstance(model_or_name, str | Path) else "",
                          ratio=ratio, method=method, allocation=allocation, calibration=calibration,
                          text=text, compensation=compensation, compensation_ranks=tuple(compensation_ranks),
                          heal_method=heal_method, heal_data=heal_data, heal_minutes=heal_minutes, **options)
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {list(STAGES)}, got {stop_after!r}")
    _check_processes(config)
    out, t_start = Path(out), time.perf_counter()
    dense, tokenizer, name = _load(model_or_name, tokenizer)
    config = config if config.model else config.replace(model=name)  # named after the loaded model
    run = _Run(config, dense, tokenizer, out, progress, cache, t_start)
    try:
        stages, model, state = run.stages(resume, stop_after)
    except _Restart:
        logger.warning("earlier stage models are gone: recomputing every stage")
        stages, model, state = run.stages(False, stop_after)
    if not keep_stages:
        state.clean_models()
    return ShrinkResult(out, stages, config.to_dict(), list(state.reused),
                        model if model is not None else _load_stage(out))


def _check_processes(config: ShrinkConfig) -> None:
    """Join the launcher's process group; refuse a healing batch that does not split over it."""
    n = dist.world_size() if dist.init() else 1
    if config.heals and config.heal_batch_size % n:
        raise ValueError(f"heal_batch_size={config.heal_batch_size} does not split evenly over {n} processes "
                         f"(the healing batch is global): choose a multiple of {n}")


class _Run:
    """One shrink run over the loaded models: a progress bar, the run context and the stage loop."""

    def __init__(self, config: ShrinkConfig, dense: nn.Module, tokenizer: Any, out: Path, progress: bool,
                 cache: dict[str, Any] | None, t_start: float) -> None:
        from rankwise.pipeline.context import RunContext

        self.config, self.out, self.progress, self.t_start = config, out, progress, t_start
        self.bar: Any = None
        self.ctx = RunContext(config, dense, tokenizer, status=self.status)
        self.ctx.use_cache(cache)

    def status(self, msg: str, quiet: bool = False) -> None:
        """Show `msg` on the progress bar (and log it when the bar is hidden)."""
        if self.bar is not None:
            self.bar.set_postfix_str(msg, refresh=True)
        if not self.progress and not quiet and dist.is_main():
            logger.info("shrink %s: %s", self.config.model, msg)

    def stages(self, resume: bool, stop_after: str | None
               ) -> tuple[dict[str, dict[str, Any]], nn.Module | None, PipelineState]:
        """Run (or reuse) every stage in order; raises _Restart when a resume cannot continue."""
        from tqdm.auto import tqdm

        state = PipelineState(self.out, self.config, resume=resume)
        self.bar = tqdm(total=len(STAGES), disable=not self.progress or not dist.is_main(), desc="shrink", dynamic_ncols=True,
                        bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| {elapsed} {postfix}")
        try:
            stages: dict[str, dict[str, Any]] = {"dense": _dense_record(self.ctx, state)}
            model: nn.Module | None = None
            for stage in STAGES:
                self.bar.set_description(f"shrink [{stage}]")
                if state.done(stage):
                    stages[stage] = state.stages[stage]
                    self.bar.update(1)
                    continue
                if model is None and stage != "compress":
                    model = _resume_model(state, stage)
                model, stages[stage] = _run_stage(stage, self.ctx, model, stages, state, self.out, self.t_start)
                self.bar.update(1)
                if stop_after == stage:
                    raise PipelineInterrupted(f"stopped after stage {stage!r} (stop_after): rerun with resume=True")
            return stages, model, state
        finally:
            self.bar.close()
            self.bar = None


def _resume_model(state: PipelineState, stage: str) -> nn.Module:
    """The model the last finished stage before `stage` saved (_Restart when it is gone)."""
    src = state.last_model_stage(stage)
    if src is None:  # the earlier models were cleaned up: start over
        raise _Restart()
    return _load_stage(state.model_dir(src))


class _Restart(Exception):
    pass


def _dense_record(ctx: Any, state: PipelineState) -> dict[str, Any]:
    """Dense reference numbers (kept in the state so a resumed run does not re-measure them)."""
    if "dense" in state.extra and "domains" in state.extra["dense"]:
        return state.extra["dense"]
    key = f"dense_record:{ctx.config.eval_tokens}"
    if key in ctx._cache:  # shared cache: measured by an earlier call
        state.set_extra("dense", ctx._cache[key])
        return ctx._cache[key]
    from rankwise.pipeline.measure import heldout_perplexity, test_perplexity
    from rankwise.pipeline.structure import target_params
    from rankwise.surgery import count_parameters

    ctx.status("dense perplexity")
    test_ppl = test_perplexity(ctx.dense, ctx.tokenizer, ctx.config.eval_tokens)
    rec = {"heldout_ppl": heldout_perplexity(ctx.dense, ctx.heldout), "test_ppl": test_ppl,
           "domains": ctx.domain_perplexities(ctx.dense, test_ppl),
           "params_targets": target_params(ctx.dense, ctx.targets), "ratio_targets": 0.0,
           "params_model": count_parameters(ctx.dense), "ratio_model": 0.0, "seconds": 0.0}
    rec = dist.from_rank0_json(rec)  # every rank reports rank 0's numbers
    state.set_extra("dense", rec)
    ctx._cache[key] = rec
    return rec


def _run_stage(stage: str, ctx: Any, model: nn.Module | None, stages: dict[str, Any], state: PipelineState,
               out: Path, t_start: float) -> tuple[nn.Module, dict[str, Any]]:
    from rankwise.compress import save_compressed
    from rankwise.pipeline import stages as st

    if stage == "compress":
        model, record = st.compress_stage(ctx)
    elif stage == "compensate":
        model, record = st.compensate_stage(ctx, model, stages["compress"])
    elif stage == "heal":
        model, record = st.heal_stage(ctx, model, stages["compensate"])
    else:
        model, record = _export_on_rank0(ctx, model, stages, out, t_start)
        state.record(stage, record, has_model=False)
        return model, record
    record = dist.from_rank0_json(record)  # rank 0's decisions and numbers on every rank
    if not record.get("changed", True):  # same weights as the previous stage: nothing to save
        state.record(stage, record, has_model=False)
        return _same_as_rank0(model, stage), record
    ctx.status(f"saving {stage}")
    dist.on_rank0(lambda: save_compressed(model, state.model_dir(stage)))
    state.record(stage, record, has_model=True)
    return (model if dist.is_main() else _load_stage(state.model_dir(stage))), record


def _same_as_rank0(model: nn.Module, stage: str) -> nn.Module:
    """An unchanged stage's model, made rank 0's on every rank (parameters broadcast).

    The ranks ran the same deterministic stage on the same model; a rank whose model now has
    another structure than rank 0's computed differently, which is refused rather than hidden.
    """
    if not dist.active():
        return model
    layout = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    if dist.any_across(dist.from_rank0_json(layout) != layout):
        raise RuntimeError(f"after stage {stage!r} the processes hold models of different structure (the stage "
                           "computed differently on some rank): rerun with --resume, or on one process")
    dist.broadcast_parameters(model)
    return model


def _export_on_rank0(ctx: Any, model: nn.Module, stages: dict[str, Any], out: Path,
                     t_start: float) -> tuple[nn.Module, dict[str, Any]]:
    """`_export` on rank 0 alone (the other ranks wait, then load what it published)."""
    if not dist.active():
        return _export(ctx, model, stages, out, t_start)
    done = dist.on_rank0(lambda: _export(ctx, model, stages, out, t_start))
    record = dist.from_rank0_json(done[1] if done is not None else None)
    return (done[0] if done is not None else _load_stage(out)), record


def _export(ctx: Any, model: nn.Module, stages: dict[str, Any], out: Path,
            t_start: float) -> tuple[nn.Module, dict[str, Any]]:
    """Fold EoRA paths, save model + tokenizer + report, check the reload, time it vs dense."""
    import rankwise
    from rankwise.compress import save_compressed
    from rankwise.io import write_json, write_text
    from rankwise.pipeline.measure import decode_latency_vs, generations, latency_vs
    from rankwise.pipeline.report import domain_summary, final_compression_report, render_markdown
    from rankwise.pipeline.structure import fold_compensation, layer_table
    from rankwise.surgery import count_parameters

    start = time.perf_counter()
    record: dict[str, Any] = {"folded": fold_compensation(model)}
    config = ctx.config.to_dict()
    report = final_compression_report(model, ctx.targets, stages, config, count_parameters(ctx.dense),
                                      time.perf_counter() - t_start)
    ctx.status("export: saving")
    save_compressed(model, out, tokenizer=ctx.tokenizer, report=report)
    ctx.status("export: reload check")
    via = "rankwise.load_model"
    try:
        reloaded = rankwise.load_model(out)
        if not any(type(m).__name__ == "FactorizedLinear" for m in reloaded.modules()):
            raise ValueError("it returned a model without factorised layers")
    except (ValueError, OSError, TypeError) as exc:  # rankwise.load_model without compressed-dir support
        from rankwise.compress import load_compressed

        logger.warning("rankwise.load_model(%s) failed (%s): checked with load_compressed", out, exc)
        via = f"rankwise.compress.load_compressed (rankwise.load_model failed: {exc})"
        reloaded = load_compressed(out)
    ids = ctx.heldout[:64].view(1, -1)
    with torch.no_grad():
        diff = (reloaded(ids).logits - model.eval()(ids).logits).abs().max().item()
    record["reload"] = {"max_abs_diff": diff, "via": via}
    del reloaded
    from rankwise.layers.fused import fuse_siblings_, unfuse_

    # horizontal fusion (q/k/v, gate/up share an input: one matmul for their A factors) is how the
    # model is meant to run; latency and generations are measured fused, then it is undone
    record["fused_groups"] = len(fuse_siblings_(model))
    if ctx.config.latency:
        ctx.status("export: latency vs dense")
        record["latency"] = latency_vs(model, ctx.dense)
        record["first_token_latency"] = latency_vs(model, ctx.dense, first_token=True)
        record["decode_latency"] = decode_latency_vs(model, ctx.dense)
    ctx.status("export: generations")
    record["generations"] = generations(model, ctx.dense, ctx.tokenizer)
    unfuse_(model)
    record["layers"] = layer_table(model, ctx.targets)
    record["params_model"] = count_parameters(model)
    record["domains_used"] = used = ctx.domains_used()
    record["seconds"] = time.perf_counter() - start
    all_stages = dict(stages, export=record)
    write_text(out / REPORT, render_markdown(all_stages, config))
    write_json(out / RECORD, {"config": config, "domains": domain_summary(all_stages, used), "stages": all_stages})
    return model, record
