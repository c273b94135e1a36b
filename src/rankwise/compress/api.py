"""`compress_`: calibrate, allocate ranks, replace layers, report.

    report = rankwise.compress.compress_(model, method="svd_llm", ratio=0.2, tokenizer=tok)
    print(report.summary())            # ratios of the targeted layers and of the whole model
    rankwise.compress.save_compressed(model, "out/", tokenizer=tok, report=report)

Steps of `compress_` (design: calibrate-then-solve, allocation outside the compressor):
1. targets: `find_targets(model, target_modules)` (default: every nn.Linear except the output
   head, PEFT's "all-linear");
2. calibration: statistics of the targets' inputs through rankwise.calibrate
   (rankwise.compress.calibration);
3. allocation: `{fqn: rank}` from rankwise.compress.allocate (never a non-saving rank);
4. replacement by FactorizedLinear, optionally block by block with SVD-LLM's update
   (rankwise.compress.sequential, svd_llm), optionally with an EoRA path inside the budget.

Every option lives in one frozen `CompressConfig` (rankwise.compress.config); `compress_(model,
method, ratio, **options)` builds it from keywords. `compensate_` is in
rankwise.compress.compensate; a model that does not fit in memory is compressed block by block
from its files by rankwise.compress.streaming.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from rankwise.compress.allocate import LayerSpec, allocate_ranks
from rankwise.compress.calibration import (
    MIN_TOKENS,
    calibration_ids,
    capture,
    check_tokens,
    find_targets,
)
from rankwise.compress.compensate import compensate_
from rankwise.compress.config import CompressConfig, config_from
from rankwise.compress.presets import MethodPreset, get_preset
from rankwise.compress.report import CompressionReport, LayerRecord
from rankwise.stages import guarded

logger = logging.getLogger(__name__)

__all__ = ["MIN_TOKENS", "build_compressor", "calibration_ids", "compensate_", "compress_",
           "find_targets", "resolve_preset"]


def build_compressor(method: str, *, damping: float | None = None):
    """The compressor behind a method preset (a WhitenedSVD or FeatureCompressor), unfitted.

    Fit it once (`observe` / `observe_stats`) and pass it to `compress_(..., compressor=c)` to
    sweep ratios and allocations on cached SVDs.
    """
    preset = get_preset(method)
    damping = preset.damping if damping is None else damping
    if preset.whitener == "afm":
        from rankwise.compress.features import FeatureCompressor

        return FeatureCompressor()
    from rankwise.compress.svd import SVDConfig, WhitenedSVD

    return WhitenedSVD(SVDConfig(whitener=preset.whitener, alpha=preset.alpha,
                                 fisher_axis=preset.fisher_axis, damping=damping))


def resolve_preset(config: CompressConfig) -> MethodPreset:
    """The method preset with the config's overrides applied (validated)."""
    preset = get_preset(config.method)
    if preset.kind != "factorize":
        raise ValueError(f"method {config.method!r} is a compensation: call compensate_(...) "
                         "(CLI: --method eora --base int4 --rank R)")
    preset = preset.with_options(allocation=config.allocation, update=config.update,
                                 update_target=config.update_target, damping=config.damping)
    preset = MethodPreset(**preset.to_dict())  # re-validate overrides
    if preset.update == "joint" and preset.whitener not in ("cholesky", "eigh"):
        raise ValueError(f"update='joint' needs a Gram whitener; {preset.name} uses "
                         f"{preset.whitener!r}: use update='lstsq'")
    return preset


def _scoped_ratio(ratio: float, scope: str, model: nn.Module, targets: Mapping[str, nn.Module]) -> float:
    if scope == "targets":
        return ratio
    if scope != "model":
        raise ValueError(f"scope must be 'targets' or 'model', got {scope!r}")
    from rankwise.surgery import count_parameters

    total = count_parameters(model)
    targeted = sum(p.numel() for m in targets.values() for p in m.parameters())
    inner = ratio * total / targeted
    if inner >= 1:
        raise ValueError(
            f"removing {ratio:.0%} of the model needs {inner:.0%} of the targeted layers "
            f"({targeted:,} of {total:,} parameters): lower the ratio or target more layers"
        )
    return inner


@guarded  # seams, NaN/inf and calibration ids checked first; rollback on failure
def compress_(
    model: nn.Module,
    method: str | None = None,
    ratio: float | None = None,
    *,
    config: CompressConfig | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    stats: Mapping[str, Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    compressor: Any = None,
    **options: Any,
) -> CompressionReport:
    """Factorise `model`'s linear layers in place to remove `ratio` of their parameters.

    Args:
        model: a Hugging Face (or any) model; modified in place.
        method, ratio, **options: fields of `CompressConfig` (method: a "compressor" registry
            name such as "svd_llm", "svd-llm-update", "welore", "drank", "afm"; ratio: the
            fraction of parameters removed, of the targets or, with scope="model", of the
            whole model; allocation, n_samples, seq_len, seed, target_modules, scope,
            compensation_rank, damping, update, update_target, batch_size, progress).
        config: a `CompressConfig`; keyword options override its fields.
        calibration: None (the config's source, default the embedded corpus), a text source,
            or input_ids (n, seq_len).
        tokenizer: needed to tokenise the calibration corpus (default: the model's own).
        stats: precomputed `{fqn: LayerStats}` (rankwise.calibrate) to skip the capture pass.
        loss_fn: loss for the Fisher statistics (FWSVD); default causal-LM loss.
        compressor: a fitted compressor from `build_compressor` to reuse (its statistics and
            cached SVDs), e.g. to sweep ratios and allocations without refitting; it must
            match the method's whitener. The model must hold the original layers.

    Returns:
        A CompressionReport with exact parameter counts and both ratios.
    """
    from rankwise import surgery

    start = time.perf_counter()
    if isinstance(calibration, str):
        options["calibration"], calibration = calibration, None
    cfg = config_from(CompressConfig, config, {"method": method, "ratio": ratio, **options})
    preset = resolve_preset(cfg)
    targets = find_targets(model, cfg.target_modules)
    params_before = surgery.count_parameters(model)
    inner_ratio = _scoped_ratio(cfg.ratio, cfg.scope, model, targets)
    owned = compressor is None
    if owned:
        compressor = build_compressor(preset.name, damping=preset.damping)
    ids, calib_info, stats = _fit(model, cfg, preset, compressor, targets, calibration, tokenizer,
                                  stats, loss_fn, owned)
    ranks = _allocate(compressor, targets, inner_ratio, preset.allocation, cfg)
    done: set[str] = set()
    if preset.update != "none":
        done = _sequential(model, preset, compressor, targets, ranks, ids, cfg.compensation_rank,
                           cfg.batch_size, cfg.progress)
    elif cfg.compensation_rank and cfg.compensation_sequential:
        done = _sequential_compensation(model, compressor, targets, ranks, ids, cfg)
    _replace(model, compressor, targets, ranks, done, stats, cfg, preset.name, owned)
    report = make_report(preset, cfg, targets, ranks, compressor, params_before,
                         surgery.count_parameters(model), calib_info, time.perf_counter() - start)
    logger.info("compressed %d layers: %.2f%% of targets, %.2f%% of the model removed",
                report.n_factorized, 100 * report.ratio_targets, 100 * report.ratio_model)
    return report


def _fit(model, cfg, preset, compressor, targets, calibration, tokenizer, stats, loss_fn, owned):
    """Calibrate (unless statistics are given or the compressor is fitted) and hand the
    statistics to the compressor; returns (ids or None, calibration info, stats)."""
    needs = tuple(compressor.needs) + (("gram",) if cfg.compensation_rank and "gram" not in compressor.needs else ())
    sequential = preset.update != "none" or bool(cfg.compensation_rank and cfg.compensation_sequential)
    calib_info: dict[str, Any] = {}
    ids = None
    fitted = not owned and all(f in getattr(compressor, "stats_", {}) for f in targets)
    if (needs and not fitted) or sequential:
        if (stats is None and not fitted) or sequential:
            ids, calib_info = calibration_ids(model, calibration if calibration is not None else cfg.calibration,
                                              tokenizer, n_samples=cfg.n_samples, seq_len=cfg.seq_len,
                                              seed=cfg.seed)
        if stats is None and not fitted:
            stats = capture(model, ids, targets, needs, batch_size=cfg.batch_size, progress=cfg.progress,
                            loss_fn=loss_fn)
        elif not calib_info:
            calib_info = {"source": "precomputed statistics"}
        if not fitted:
            missing = [f for f in targets if f not in stats]
            if missing:
                raise ValueError(f"no calibration statistics for {missing[:3]}: recapture them for these targets")
            check_tokens(stats, targets, compressor)
            for fqn in targets:
                compressor.observe_stats(fqn, stats[fqn])
    if cfg.compensation_rank and stats is None:
        stats = compressor.stats_
    return ids, calib_info, stats


def layer_specs(compressor: Any, targets: Mapping[str, nn.Linear], allocation: str,
                progress: bool = False) -> dict[str, LayerSpec]:
    """`{fqn: LayerSpec}` for the allocator (spectra only when the allocation reads them)."""
    from tqdm.auto import tqdm

    specs = {}
    for fqn, module in tqdm(targets.items(), desc="spectra", leave=False,
                            disable=not progress or allocation == "uniform"):
        spectrum = None if allocation == "uniform" else compressor.spectrum(fqn, module)
        specs[fqn] = LayerSpec(module.out_features, module.in_features, spectrum)
    return specs


def finish_ranks(ranks: Mapping[str, int | None], compensation_rank: int) -> dict[str, int | None]:
    """Layers whose rank cannot hold the EoRA path stay dense."""
    if not compensation_rank:
        return dict(ranks)
    return {f: (r if r is not None and r > compensation_rank else None) for f, r in ranks.items()}


def _allocate(compressor, targets, inner_ratio, allocation, cfg) -> dict[str, int | None]:
    specs = layer_specs(compressor, targets, allocation, cfg.progress)
    return finish_ranks(allocate_ranks(specs, inner_ratio, allocation), cfg.compensation_rank)


def build_layer(compressor: Any, fqn: str, module: nn.Linear, rank: int, compensation_rank: int,
                gram: torch.Tensor | None) -> nn.Module:
    """The compressed replacement of one layer (with its EoRA path inside the rank budget)."""
    new = compressor.compress(fqn, module, rank - compensation_rank)
    if compensation_rank:
        from rankwise.compress.eora import compensate

        new = compensate(module, new, gram, compensation_rank)
    return new


def _replace(model, compressor, targets, ranks, done, stats, cfg, name, owned) -> None:
    from tqdm.auto import tqdm

    from rankwise import surgery

    for fqn, module in tqdm(targets.items(), desc=f"compress ({name})", disable=not cfg.progress, leave=False):
        if fqn not in done and ranks[fqn] is not None:
            gram = stats[fqn].gram if cfg.compensation_rank else None
            surgery.replace_module(model, fqn, build_layer(compressor, fqn, module, ranks[fqn],
                                                           cfg.compensation_rank, gram))
        if owned and hasattr(compressor, "forget"):
            compressor.forget(fqn)  # free the cached SVD; a caller-owned compressor keeps it
    if owned and hasattr(compressor, "forget"):
        compressor.forget()


def layer_record(fqn: str, m: nn.Linear, rank: int | None, compensation_rank: int,
                 adds_bias: bool) -> LayerRecord:
    """Exact parameter counts of one target before and after."""
    bias = m.bias is not None
    before = m.out_features * m.in_features + (m.out_features if bias else 0)
    after = before if rank is None else (
        rank * (m.out_features + m.in_features) + (m.out_features if bias or adds_bias else 0))
    return LayerRecord(fqn, m.out_features, m.in_features, rank, before, after,
                       compensation_rank if rank is not None else 0,
                       "factorized" if rank is not None else "dense")


def make_report(preset: MethodPreset, cfg: CompressConfig, targets: Mapping[str, nn.Linear],
                ranks: Mapping[str, int | None], compressor: Any, params_before: int,
                params_after: int, calib_info: dict[str, Any], seconds: float) -> CompressionReport:
    """The CompressionReport of a `compress_` run."""
    adds_bias = bool(getattr(compressor, "adds_bias", False))
    records = [layer_record(f, m, ranks[f], cfg.compensation_rank, adds_bias) for f, m in targets.items()]
    return CompressionReport(
        method=preset.name, allocation=preset.allocation, ratio_requested=cfg.ratio, scope=cfg.scope,
        layers=records, params_model_before=params_before, params_model_after=params_after,
        calibration=calib_info,
        options={k: v for k, v in preset.to_dict().items() if k not in ("name", "description")}
        | {"compensation_rank": cfg.compensation_rank},
        seconds=seconds,
    )


def _sequential(model, preset, compressor, targets, ranks, ids, comp_rank, batch_size, progress) -> set[str]:
    """Block-by-block replacement with SVD-LLM's update; returns the fqns it replaced."""
    from rankwise.compress.sequential import run_blockwise

    done: set[str] = set()
    on_block = update_on_block(model, preset, compressor, targets, ranks, comp_rank, done)
    run_blockwise(model, list(ids.split(batch_size)), targets, on_block,
                  cross=preset.update_target == "original", progress=progress)
    return done


def _sequential_compensation(model, compressor, targets, ranks, ids, cfg) -> set[str]:
    """EoRA in its reference order inside the rank budget: the truncation (rank r - k) is
    fitted on the dense model's statistics as usual, the EoRA path (rank k) of block i on the
    Gram of inputs that went through the already compensated blocks < i."""
    from rankwise import surgery
    from rankwise.compress.sequential import run_blockwise

    done: set[str] = set()

    def on_block(_i: int, block_stats: dict[str, Any]) -> None:
        for fqn, st in block_stats.items():
            if ranks[fqn] is not None:
                new = build_layer(compressor, fqn, targets[fqn], ranks[fqn], cfg.compensation_rank, st.gram)
                surgery.replace_module(model, fqn, new)
                done.add(fqn)

    run_blockwise(model, list(ids.split(cfg.batch_size)), targets, on_block, share_inputs=True,
                  progress=cfg.progress)
    return done


def update_on_block(model: nn.Module, preset: MethodPreset, compressor: Any,
                    targets: Mapping[str, nn.Linear], ranks: Mapping[str, int | None],
                    comp_rank: int, done: set[str]) -> Callable[[int, dict[str, Any]], None]:
    """The block runner's callback for SVD-LLM's update: replace each target of the block by
    factors re-fitted to its propagated inputs (lstsq: B only; joint: both); adds to `done`."""
    from rankwise import surgery
    from rankwise.compress.svd import SVDConfig
    from rankwise.compress.svd_llm import joint_factors, update_left_factor
    from rankwise.layers.factorized import FactorizedLinear

    cross = preset.update_target == "original"
    config = SVDConfig(whitener=preset.whitener, damping=preset.damping) if preset.update == "joint" else None

    def on_block(_i: int, block_stats: dict[str, Any]) -> None:
        for fqn, st in block_stats.items():
            rank = ranks[fqn]
            if rank is None:
                continue
            module = targets[fqn]
            weight = module.weight.detach()
            inner = rank - comp_rank
            if preset.update == "lstsq":
                _, A = compressor.factors(fqn, module, inner)
                B = update_left_factor(weight, A, st.gram, cross=st.cross if cross else None)
            else:
                B, A = joint_factors(weight, inner, st.gram, cross=st.cross if cross else None, config=config)
            bias = module.bias.detach() if module.bias is not None else None
            new: nn.Module = FactorizedLinear.from_factors(B.to(weight.dtype), A.to(weight.dtype), bias)
            if comp_rank:
                from rankwise.compress.eora import compensate

                new = compensate(module, new, st.gram, comp_rank)
            surgery.replace_module(model, fqn, new)
            done.add(fqn)

    return on_block
