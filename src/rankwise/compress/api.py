"""`compress_` and `compensate_`: calibrate, allocate ranks, replace layers, report.

    report = rankwise.compress.compress_(model, method="svd-llm", ratio=0.2, tokenizer=tok)
    print(report.summary())            # ratios of the targeted layers and of the whole model
    rankwise.compress.save_compressed(model, "out/", tokenizer=tok, report=report)

Steps of `compress_` (design: calibrate-then-solve, allocation outside the compressor):
1. targets: `surgery.find_modules(model, target_modules)` (default: every nn.Linear except the
   output head, PEFT's "all-linear");
2. calibration: `n_samples x seq_len` tokens of the embedded python-docs corpus by default
   (rankwise.data.calibration_batch), statistics through rankwise.calibrate (running sums only);
3. allocation: `{fqn: rank}` from rankwise.compress.allocate (never a non-saving rank);
4. replacement by FactorizedLinear, optionally block by block with SVD-LLM's update
   (rankwise.compress.sequential, svd_llm), optionally with an EoRA path inside the budget.

Fallbacks (documented): fewer calibration tokens than a layer's input width make its Gram
singular; Cholesky then retries with jitter (rankwise.linalg) and `damping` defaults to 1e-4 for
that run (logged). Fewer than `MIN_TOKENS` tokens raise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankwise.compress.allocate import LayerSpec, allocate_ranks
from rankwise.compress.base import check_ratio
from rankwise.compress.presets import MethodPreset, get_preset
from rankwise.compress.report import CompressionReport, LayerRecord

logger = logging.getLogger(__name__)

__all__ = ["MIN_TOKENS", "build_compressor", "calibration_ids", "compensate_", "compress_", "find_targets"]

MIN_TOKENS = 128  # below this a Gram is hopelessly rank-deficient for any real layer


def find_targets(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """`{fqn: nn.Linear}` to compress (surgery vocabulary; default all linears but the head)."""
    from rankwise import surgery

    if target_modules is None and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers: rankwise.compress factorises linear "
            "weights only (convolutions and embeddings are left alone); nothing to compress"
        )
    found = surgery.find_modules(model, target_modules)
    bad = [n for n, m in found.items() if not isinstance(m, nn.Linear)]
    if bad:
        raise TypeError(
            f"rankwise.compress factorises nn.Linear layers; {bad[0]!r} is a "
            f"{type(found[bad[0]]).__name__}: leave it out of target_modules"
        )
    return dict(found)


def calibration_ids(
    model: nn.Module,
    calibration: Any = None,
    tokenizer: Any = None,
    *,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration input_ids (n, seq_len) and a description of where they came from.

    `calibration`: None (the embedded python-docs corpus), a corpus name / text source accepted
    by `rankwise.data.load_texts`, or a LongTensor (n, seq_len) of input_ids.
    """
    if isinstance(calibration, torch.Tensor):
        ids = calibration
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration ids must be an integer tensor (n, seq_len), got {tuple(ids.shape)} {ids.dtype}")
        info = {"source": "tensor", "n_samples": ids.shape[0], "seq_len": ids.shape[1]}
    else:
        from rankwise.data import calibration_batch

        if tokenizer is None:
            from rankwise.models import load_tokenizer

            path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
            if not path:
                raise ValueError("calibration needs a tokenizer: pass tokenizer=... or calibration=<input_ids>")
            tokenizer = load_tokenizer(path)
        source = calibration if calibration is not None else "python-docs"
        if getattr(tokenizer, "eos_token_id", None) is None and getattr(tokenizer, "sep_token_id", None) is not None:
            ids = _calibration_with_separator(tokenizer, n_samples, seq_len, source, seed)
        else:
            ids = calibration_batch(tokenizer, n_samples, seq_len, source=source, seed=seed)
        info = {"source": f"{source} (train)" if isinstance(source, str) else "texts",
                "n_samples": n_samples, "seq_len": seq_len, "seed": seed}
    info["tokens"] = int(ids.numel())
    if ids.numel() < MIN_TOKENS:
        raise ValueError(
            f"calibration has {ids.numel()} tokens; at least {MIN_TOKENS} are needed (SVD-LLM uses "
            "256 x 2048): raise n_samples or seq_len"
        )
    return ids.long(), info


def _calibration_with_separator(tokenizer: Any, n: int, seq_len: int, source: Any, seed: int) -> torch.Tensor:
    """calibration_batch for tokenizers without EOS (BERT): documents separated by [SEP].

    TODO(rankwise.data): calibration_batch could take eos_id / fall back to sep_token_id itself.
    """
    from rankwise.data import token_stream
    from rankwise.data.loaders import load_texts

    stream = token_stream(load_texts(source, "train"), tokenizer, eos_id=tokenizer.sep_token_id,
                          max_tokens=max(4 * n * seq_len, 200_000))
    windows = stream.numel() // seq_len
    if windows < n:
        raise ValueError(f"{source!r} has only {stream.numel()} tokens; n * seq_len = {n * seq_len} needed: "
                         "lower n_samples or seq_len")
    gen = torch.Generator().manual_seed(seed)
    blocks = stream[: windows * seq_len].view(windows, seq_len)
    return blocks[torch.randperm(windows, generator=gen)[:n]].clone()


def _capture(model, ids, targets, needs, *, batch_size, progress, loss_fn) -> dict[str, Any]:
    from rankwise.calibrate import capture_input_stats

    stats: dict[str, Any] = {}
    inputs = [s for s in needs if s != "sq_grad"]
    if inputs:
        stats = capture_input_stats(model, ids, targets, stats=inputs, batch_size=batch_size,
                                    share_inputs=True, progress=progress)
    if "sq_grad" in needs:
        grads = capture_input_stats(model, ids, targets, stats=("sq_grad",), batch_size=batch_size,
                                    progress=progress, loss_fn=loss_fn)
        for fqn, g in grads.items():
            if fqn in stats:
                stats[fqn].sq_grad, stats[fqn].n_batches = g.sq_grad, g.n_batches
            else:
                stats[fqn] = g
    return stats


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


def compress_(
    model: nn.Module,
    method: str = "svd-llm",
    ratio: float = 0.2,
    *,
    allocation: str | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    target_modules: str | Sequence[str] | None = None,
    scope: str = "targets",
    compensation_rank: int = 0,
    damping: float | None = None,
    update: str | None = None,
    update_target: str | None = None,
    stats: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    compressor: Any = None,
    progress: bool = True,
) -> CompressionReport:
    """Factorise `model`'s linear layers in place to remove `ratio` of their parameters.

    Args:
        model: a Hugging Face (or any) model; modified in place.
        method: a preset name (rankwise.compress.presets.METHODS): "lord", "fwsvd", "asvd",
            "svd-llm", "svd-llm-update", "svd-llm-seq", "welore", "drank", "afm".
        ratio: fraction of parameters to remove, in [0, 1), of the targeted layers (`scope=
            "targets"`) or of the whole model (`scope="model"`).
        allocation: "uniform", "budget", "welore" or "dynamic" (default: the preset's).
        calibration: None (embedded corpus), a text source, or input_ids (n, seq_len).
        tokenizer: needed to tokenise the calibration corpus (default: the model's own).
        n_samples, seq_len, seed: calibration size and sampling seed.
        target_modules: which linears (surgery.find_modules vocabulary).
        scope: what `ratio` is a fraction of.
        compensation_rank: k > 0 spends k of each layer's rank on an EoRA path fitted to the
            truncation error (same parameter count as rank r alone).
        damping: relative Gram damping (default: the preset's).
        update, update_target: override the preset's SVD-LLM update ("none", "lstsq",
            "joint"; "current" or "original").
        stats: precomputed `{fqn: LayerStats}` (rankwise.calibrate) to skip the capture pass.
        batch_size: calibration micro-batch size.
        loss_fn: loss for the Fisher statistics (FWSVD); default causal-LM loss.
        compressor: a fitted compressor from `build_compressor` to reuse (its statistics and
            cached SVDs), e.g. to sweep ratios and allocations without refitting; it must
            match the method's whitener. The model must hold the original layers.
        progress: show progress bars.

    Returns:
        A CompressionReport with exact parameter counts and both ratios.
    """
    from tqdm.auto import tqdm

    from rankwise import surgery

    start = time.perf_counter()
    check_ratio(ratio)
    preset = get_preset(method)
    if preset.kind != "factorize":
        raise ValueError(f"method {method!r} is a compensation: call compensate_(...) (CLI: --base int4 --rank R)")
    preset = preset.with_options(allocation=allocation, update=update, update_target=update_target, damping=damping)
    preset = MethodPreset(**preset.to_dict())  # re-validate overrides
    if preset.update == "joint" and preset.whitener not in ("cholesky", "eigh"):
        raise ValueError(f"update='joint' needs a Gram whitener; {preset.name} uses {preset.whitener!r}: use update='lstsq'")
    if not isinstance(compensation_rank, int) or compensation_rank < 0:
        raise ValueError(f"compensation_rank must be an int >= 0, got {compensation_rank!r}")
    targets = find_targets(model, target_modules)
    params_before = surgery.count_parameters(model)
    inner_ratio = _scoped_ratio(ratio, scope, model, targets)

    owned = compressor is None
    if owned:
        compressor = build_compressor(preset.name, damping=preset.damping)
    needs = tuple(compressor.needs) + (("gram",) if compensation_rank and "gram" not in compressor.needs else ())
    sequential = preset.update != "none"
    calib_info: dict[str, Any] = {}
    ids = None
    fitted = not owned and all(f in getattr(compressor, "stats_", {}) for f in targets)
    if (needs and not fitted) or sequential:
        if (stats is None and not fitted) or sequential:
            ids, calib_info = calibration_ids(model, calibration, tokenizer, n_samples=n_samples,
                                              seq_len=seq_len, seed=seed)
        if stats is None and not fitted:
            stats = _capture(model, ids, targets, needs, batch_size=batch_size, progress=progress, loss_fn=loss_fn)
        elif not calib_info:
            calib_info = {"source": "precomputed statistics"}
        if not fitted:
            missing = [f for f in targets if f not in stats]
            if missing:
                raise ValueError(f"no calibration statistics for {missing[:3]}: recapture them for these targets")
            _check_tokens(stats, targets, compressor)
            for fqn in targets:
                compressor.observe_stats(fqn, stats[fqn])
    if compensation_rank and stats is None:
        stats = compressor.stats_

    adds_bias = bool(getattr(compressor, "adds_bias", False))
    specs = {}
    for fqn, module in tqdm(targets.items(), desc="spectra", disable=not progress or preset.allocation == "uniform", leave=False):
        spectrum = None if preset.allocation == "uniform" else compressor.spectrum(fqn, module)
        specs[fqn] = LayerSpec(module.out_features, module.in_features, spectrum)
    ranks = allocate_ranks(specs, inner_ratio, preset.allocation)
    if compensation_rank:
        ranks = {f: (r if r is not None and r > compensation_rank else None) for f, r in ranks.items()}

    def build(fqn: str, module: nn.Linear, rank: int) -> nn.Module:
        new = compressor.compress(fqn, module, rank - compensation_rank)
        if compensation_rank:
            from rankwise.compress.eora import compensate

            new = compensate(module, new, stats[fqn].gram, compensation_rank)
        return new

    done: set[str] = set()
    if sequential:
        done = _sequential(model, preset, compressor, targets, ranks, ids, compensation_rank,
                           batch_size, progress)
    for fqn, module in tqdm(targets.items(), desc=f"compress ({preset.name})", disable=not progress, leave=False):
        if fqn not in done and ranks[fqn] is not None:
            surgery.replace_module(model, fqn, build(fqn, module, ranks[fqn]))
        if owned and hasattr(compressor, "forget"):
            compressor.forget(fqn)  # free the cached SVD; a caller-owned compressor keeps it

    if owned and hasattr(compressor, "forget"):
        compressor.forget()
    records = []
    for fqn, m in targets.items():
        rank, bias = ranks[fqn], m.bias is not None
        before = m.out_features * m.in_features + (m.out_features if bias else 0)
        after = before if rank is None else (
            rank * (m.out_features + m.in_features) + (m.out_features if bias or adds_bias else 0))
        records.append(LayerRecord(fqn, m.out_features, m.in_features, rank, before, after,
                                   compensation_rank if rank is not None else 0,
                                   "factorized" if rank is not None else "dense"))
    report = CompressionReport(
        method=preset.name, allocation=preset.allocation, ratio_requested=ratio, scope=scope,
        layers=records, params_model_before=params_before,
        params_model_after=surgery.count_parameters(model), calibration=calib_info,
        options={k: v for k, v in preset.to_dict().items() if k not in ("name", "description")}
        | {"compensation_rank": compensation_rank},
        seconds=time.perf_counter() - start,
    )
    logger.info("compressed %d layers: %.2f%% of targets, %.2f%% of the model removed",
                report.n_factorized, 100 * report.ratio_targets, 100 * report.ratio_model)
    return report


def _check_tokens(stats: Mapping[str, Any], targets: Mapping[str, nn.Linear], compressor: Any) -> None:
    """Fewer tokens than a Gram's width: singular Gram; log the documented fallback."""
    from rankwise.compress.base import as_input_stats

    if "gram" not in getattr(compressor, "needs", ()):
        return
    narrow = [(f, m.in_features) for f, m in targets.items()
              if as_input_stats(stats[f]).n_tokens < m.in_features]
    if narrow and getattr(getattr(compressor, "config", None), "damping", 1) == 0:
        logger.warning(
            "%d layers saw fewer calibration tokens than their input width (e.g. %s, %d inputs): their "
            "Grams are singular; using damping 1e-4 (raise n_samples or seq_len to avoid it)",
            len(narrow), narrow[0][0], narrow[0][1])
        from dataclasses import replace

        compressor.config = replace(compressor.config, damping=1e-4)


def _sequential(model, preset, compressor, targets, ranks, ids, comp_rank, batch_size, progress) -> set[str]:
    """Block-by-block replacement with SVD-LLM's update; returns the fqns it replaced."""
    from rankwise import surgery
    from rankwise.compress.sequential import run_blockwise
    from rankwise.compress.svd import SVDConfig
    from rankwise.compress.svd_llm import joint_factors, update_left_factor
    from rankwise.layers.factorized import FactorizedLinear

    done: set[str] = set()
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

    batches = list(ids.split(batch_size))
    run_blockwise(model, batches, targets, on_block, cross=cross, progress=progress)
    return done


def compensate_(
    model: nn.Module,
    base: str = "int4",
    rank: int = 32,
    *,
    compensation: str = "eora",
    calibration: Any = None,
    tokenizer: Any = None,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    target_modules: str | Sequence[str] | None = None,
    block_size: int = 64,
    stats: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> CompressionReport:
    """Compress every target by `base` ("int8", "int4", "2:4") and add a rank-`rank` correction.

    Args:
        compensation: "eora" (eigenspace of the input Gram, eq. (1) of rankwise.compress.eora) or "svd" (plain SVD of the
            error, EoRA's baseline). `rank=0` applies the base compression alone.
        block_size: quantisation block size along the input dimension.
        Other arguments as for `compress_`.

    The quantised weights are stored dequantised (float): the report counts parameters, not
    bits; `options["weight_bits"]` says what the base would take with an int kernel.
    """
    from tqdm.auto import tqdm

    from rankwise import surgery
    from rankwise.compress.eora import (
        COMPRESSIONS,
        CompensatedLinear,
        compensate,
        compressed_weight,
        eigen_whitening,
    )

    start = time.perf_counter()
    if base not in COMPRESSIONS or base == "svd":
        raise ValueError(f"base must be one of {[c for c in COMPRESSIONS if c != 'svd']}; for truncation "
                         "use compress_(..., compensation_rank=k)")
    if compensation not in ("eora", "svd"):
        raise ValueError(f"compensation must be 'eora' or 'svd', got {compensation!r}")
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    targets = find_targets(model, target_modules)
    params_before = surgery.count_parameters(model)
    calib_info: dict[str, Any] = {}
    if stats is None:
        ids, calib_info = calibration_ids(model, calibration, tokenizer, n_samples=n_samples,
                                          seq_len=seq_len, seed=seed)
        stats = _capture(model, ids, targets, ("gram",), batch_size=batch_size, progress=progress, loss_fn=None)
    records = []
    shared: dict[int, Any] = {}  # id(gram) -> eigen-whitening: q/k/v and gate/up share one Gram
    for fqn, module in tqdm(targets.items(), desc=f"{base} + {compensation}", disable=not progress, leave=False):
        gram = stats[fqn].gram
        w_c = compressed_weight(module.weight, base, gram=gram, block_size=block_size)
        base_layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            base_layer.weight.copy_(w_c)
            if module.bias is not None:
                base_layer.bias.copy_(module.bias)
        new: nn.Module = base_layer
        k = min(rank, module.in_features, module.out_features)
        if k:
            if compensation == "eora":
                if id(gram) not in shared:
                    shared[id(gram)] = eigen_whitening(gram)
                new = compensate(module, base_layer, gram, k, whitening=shared[id(gram)])
            else:
                from rankwise import linalg

                delta = module.weight.detach().float() - w_c.float()
                B, A = linalg.split_factors(*linalg.truncated_svd(delta, k))
                new = CompensatedLinear.from_factors(base_layer, B, A)
        surgery.replace_module(model, fqn, new)
        m, n = module.out_features, module.in_features
        dense = m * n + (m if module.bias is not None else 0)
        records.append(LayerRecord(fqn, m, n, None, dense, dense + k * (m + n), k, base))
    bits = {"int8": 8, "int4": 4, "2:4": None}[base]
    return CompressionReport(
        method="eora" if compensation == "eora" else "svd-compensation", allocation="uniform",
        ratio_requested=0.0, scope="targets", layers=records, params_model_before=params_before,
        params_model_after=surgery.count_parameters(model), calibration=calib_info,
        options={"base": base, "rank": rank, "compensation": compensation, "block_size": block_size,
                 "weight_bits": bits, "sparsity": 0.5 if base == "2:4" else 0.0},
        seconds=time.perf_counter() - start,
    )
