"""`compensate_`: compress every target by a base compression and add a low-rank correction.

The correction is EoRA's (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed
LLM with Eigenspace Low-Rank Approximation"): the error ΔW = W - W_c projected into the
eigenspace of the layer's input Gram (rankwise.compress.eora, eq. (1)), or a plain SVD of ΔW
(EoRA's baseline).

Two calibration orders:

* parallel (``sequential=False``, the default): every layer's Gram comes from the *dense*
  model's activations, one whole-model pass;
* sequential (``sequential=True``, EoRA's reference order): blocks run in order through the
  block runner (rankwise.compress.sequential), so block i's Grams come from inputs that already
  went through the compensated blocks 0..i-1 (the correction of block i then also absorbs the
  drift left by earlier blocks, as GPTQ does for quantisation).

docs/compress.md reports both on SmolLM2-135M and says which is the default and why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rankwise.compress.calibration import calibration_ids, capture, find_targets
from rankwise.compress.config import CompensateConfig, config_from
from rankwise.compress.report import CompressionReport, LayerRecord
from rankwise.stages import guarded

__all__ = ["compensate_", "compensated_layer", "compensation_report"]


def compensated_layer(module: nn.Linear, gram: torch.Tensor | None, cfg: CompensateConfig,
                      whitening: Any = None) -> nn.Module:
    """`module` compressed by `cfg.base` plus its rank-`cfg.rank` correction (EoRA or SVD).

    `whitening` (from `eigen_whitening(gram)`) is reused by layers sharing one Gram.
    """
    from rankwise.compress.eora import CompensatedLinear, compensate, compressed_weight

    w_c = compressed_weight(module.weight, cfg.base, gram=gram, block_size=cfg.block_size)
    base_layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        base_layer.weight.copy_(w_c)
        if module.bias is not None:
            base_layer.bias.copy_(module.bias)
    k = min(cfg.rank, module.in_features, module.out_features)
    if not k:
        return base_layer
    if cfg.compensation == "eora":
        return compensate(module, base_layer, gram, k, whitening=whitening)
    from rankwise import linalg

    delta = module.weight.detach().float() - w_c.float()
    B, A = linalg.split_factors(*linalg.truncated_svd(delta, k))
    return CompensatedLinear.from_factors(base_layer, B, A)


def compensate_group(stats: Mapping[str, Any], modules: Mapping[str, nn.Linear],
                     cfg: CompensateConfig) -> dict[str, nn.Module]:
    """Compensated replacements of `modules`, one eigendecomposition per distinct Gram
    (q/k/v and gate/up share one when calibrated with ``share_inputs``)."""
    from rankwise.compress.eora import eigen_whitening

    shared: dict[int, Any] = {}
    out = {}
    for fqn, module in modules.items():
        gram = stats[fqn].gram
        wh = None
        if cfg.compensation == "eora" and min(cfg.rank, *module.weight.shape):
            if id(gram) not in shared:
                shared[id(gram)] = eigen_whitening(gram)
            wh = shared[id(gram)]
        out[fqn] = compensated_layer(module, gram, cfg, wh)
    return out


@guarded  # seams, NaN/inf and calibration ids checked first; rollback on failure
def compensate_(
    model: nn.Module,
    base: str | None = None,
    rank: int | None = None,
    *,
    config: CompensateConfig | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    stats: Mapping[str, Any] | None = None,
    **options: Any,
) -> CompressionReport:
    """Compress every target by `base` ("int8", "int4", "2:4") and add a rank-`rank` correction.

    Args:
        base, rank, **options: fields of `CompensateConfig` (compensation "eora" or "svd";
            rank=0 applies the base compression alone; block_size; sequential; and the
            calibration options of `compress_`).
        config: a `CompensateConfig`; keyword options override its fields.
        calibration, tokenizer, stats: as for `compress_` (stats: parallel form only).

    The quantised weights are stored dequantised (float): the report counts parameters, not
    bits; `options["weight_bits"]` says what the base would take with an int kernel.
    """
    from tqdm.auto import tqdm

    from rankwise import surgery

    start = time.perf_counter()
    if isinstance(calibration, str):
        options["calibration"], calibration = calibration, None
    cfg = config_from(CompensateConfig, config, {"base": base, "rank": rank, **options})
    if cfg.sequential and stats is not None:
        raise ValueError("sequential=True calibrates block by block on compensated inputs: "
                         "drop stats= (or use sequential=False)")
    targets = find_targets(model, cfg.target_modules)
    params_before = surgery.count_parameters(model)
    calib_info: dict[str, Any] = {}
    ids = None
    if stats is None:
        ids, calib_info = calibration_ids(model, calibration if calibration is not None else cfg.calibration,
                                          tokenizer, n_samples=cfg.n_samples, seq_len=cfg.seq_len,
                                          seed=cfg.seed)
    if cfg.sequential:
        _sequential_compensate(model, targets, ids, cfg)
    else:
        if stats is None:
            stats = capture(model, ids, targets, ("gram",), batch_size=cfg.batch_size,
                            progress=cfg.progress, loss_fn=None)
        desc = f"{cfg.base} + {cfg.compensation}"
        for fqn, new in tqdm(compensate_group(stats, targets, cfg).items(), desc=desc,
                             disable=not cfg.progress, leave=False):
            surgery.replace_module(model, fqn, new)
    return compensation_report(cfg, targets, params_before, surgery.count_parameters(model),
                               calib_info, time.perf_counter() - start)


def _sequential_compensate(model: nn.Module, targets: Mapping[str, nn.Linear], ids: torch.Tensor,
                           cfg: CompensateConfig) -> None:
    """EoRA's reference order: block i is fitted on inputs through compensated blocks < i."""
    from rankwise import surgery
    from rankwise.compress.sequential import run_blockwise

    done: set[str] = set()

    def on_block(_i: int, block_stats: dict[str, Any]) -> None:
        local = {f: targets[f] for f in block_stats}
        for fqn, new in compensate_group(block_stats, local, cfg).items():
            surgery.replace_module(model, fqn, new)
            done.add(fqn)

    run_blockwise(model, list(ids.split(cfg.batch_size)), targets, on_block, share_inputs=True,
                  progress=cfg.progress)
    left = [f for f in targets if f not in done]
    if left:
        raise ValueError(f"sequential=True compensates layers inside the repeated blocks only; "
                         f"{left[:3]} are outside: leave them out of target_modules or use "
                         "sequential=False")


def compensation_report(cfg: CompensateConfig, targets: Mapping[str, nn.Linear], params_before: int,
                        params_after: int, calib_info: dict[str, Any], seconds: float) -> CompressionReport:
    """The CompressionReport of a `compensate_` run (parameter counts, base and correction)."""
    records = []
    for fqn, module in targets.items():
        m, n = module.out_features, module.in_features
        k = min(cfg.rank, m, n)
        dense = m * n + (m if module.bias is not None else 0)
        records.append(LayerRecord(fqn, m, n, None, dense, dense + k * (m + n), k, cfg.base))
    bits = {"int8": 8, "int4": 4, "2:4": None}[cfg.base]
    return CompressionReport(
        method="eora" if cfg.compensation == "eora" else "svd-compensation", allocation="uniform",
        ratio_requested=0.0, scope="targets", layers=records, params_model_before=params_before,
        params_model_after=params_after, calibration=calib_info,
        options={"base": cfg.base, "rank": cfg.rank, "compensation": cfg.compensation,
                 "block_size": cfg.block_size, "weight_bits": bits,
                 "sparsity": 0.5 if cfg.base == "2:4" else 0.0, "sequential": cfg.sequential},
        seconds=seconds,
    )
