"""Compare two models matrix by matrix: spectrum and rank of the update dW = W1 - W0.

Fine-tuning (LoRA or full), compression and merging all leave a trace in dW; its rank says how
low-rank the change really was (a merged rank-r LoRA gives rank r exactly). The difference is
taken in fp64, where subtracting two fp32 (or bf16) weights is exact, and its singular values
come from an fp64 SVD (not the Gram shortcut, whose sqrt(eps) floor would count as rank).
The second model's weights were rounded to their dtype when stored, which adds a full-rank
error E with ||E||_2 <= ||E||_F <= eps * ||W1||_F; the update rank counts only singular values
above that bound, so a merged rank-r update reads as rank r.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.inspect.weights import split_name, weight_matrices
from rankwise.linalg import spectral

logger = logging.getLogger(__name__)


@dataclass
class UpdateAnalysis:
    """Per-matrix metrics of W1 - W0, the update spectra, and what could not be matched."""

    rows: list[dict[str, Any]]
    spectra: dict[str, torch.Tensor] = field(repr=False)  # name -> singular values of dW (fp64)
    only_in_first: list[str] = field(default_factory=list)
    only_in_second: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)


def _dense_matrices(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight_matrices plus factorised layers seen through their `to_dense()` (compressed models)."""
    mats = weight_matrices(source)
    if isinstance(source, nn.Module):
        from rankwise import surgery

        for name, module in source.named_modules():
            to_dense = getattr(module, "to_dense", None)
            if name and name not in mats and callable(to_dense) and not isinstance(module, nn.Linear):
                dense = to_dense()
                if isinstance(dense, nn.Module):
                    mats[name] = surgery.weight_as_matrix(dense)
    return mats


def update_metrics(
    dW: torch.Tensor, W0: torch.Tensor, *, noise_floor: float = 0.0
) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of one update dW (m, n) relative to the original W0 (m, n); returns (row, S).

    update_rank counts singular values above max(noise_floor, max(m, n) * eps64 * s_1):
    `noise_floor` bounds what storing the weights rounded (see compare_weights).
    """
    S = spectral.singular_values(dW.to(torch.float64), method="svd")[0]
    norm0 = float(torch.linalg.vector_norm(W0.to(torch.float64)))
    norm_d = float(torch.linalg.vector_norm(S))
    tol = max(noise_floor, max(dW.shape) * torch.finfo(torch.float64).eps * float(S[0]))
    return {
        "shape": [int(dW.shape[0]), int(dW.shape[1])],
        "rank_full": int(min(dW.shape)),
        "update_rank": int((S > tol).sum()) if norm_d > 0 else 0,
        "update_erank": spectral.effective_rank(S),
        "update_stable_rank": spectral.stable_rank(S),
        "update_energy90": spectral.energy_rank(S, 0.9),
        "update_energy99": spectral.energy_rank(S, 0.99),
        "update_spectral_norm": float(S[0]),
        "relative_update": norm_d / norm0 if norm0 > 0 else None,
    }, S


def compare_weights(
    first: nn.Module | Mapping[str, torch.Tensor],
    second: nn.Module | Mapping[str, torch.Tensor],
    *,
    progress: bool = True,
) -> UpdateAnalysis:
    """Spectrum and rank of W1 - W0 for every matrix that both models hold under the same name.

    first/second: models (linear/Conv1D/embedding layers, plus modules with `to_dense()`) or
    {name: W (out, in)} mappings. Names present in only one side or with different shapes are
    listed in the result instead of failing.
    """
    from tqdm.auto import tqdm

    w0, w1 = _dense_matrices(first), _dense_matrices(second)
    common = [n for n in w0 if n in w1]
    if not common:
        raise ValueError(
            "the two models share no weight-matrix names: compare checkpoints of the same "
            f"architecture (first has e.g. {list(w0)[:3]}, second {list(w1)[:3]})"
        )
    result = UpdateAnalysis(
        rows=[],
        spectra={},
        only_in_first=[n for n in w0 if n not in w1],
        only_in_second=[n for n in w1 if n not in w0],
    )
    for name in tqdm(common, desc="updates", unit="matrix", disable=not progress):
        a, b = w0[name].detach(), w1[name].detach()
        if a.shape != b.shape:
            result.shape_mismatch.append(name)
            continue
        dW = b.to(torch.float64) - a.to(torch.float64)  # exact for fp32/bf16/fp16 inputs
        if not torch.isfinite(dW).all():
            raise ValueError(f"{name}: the weights contain NaN or inf; fix the checkpoint first")
        # W1 was stored rounded to its dtype: |rounding error|_2 <= |E|_F <= eps * |W1|_F, so
        # singular values below eps * max(|W0|_F, |W1|_F) may be rounding, not update.
        eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
        norms = float(torch.linalg.vector_norm(a.double())), float(torch.linalg.vector_norm(b.double()))
        row, S = update_metrics(dW, a, noise_floor=eps * max(norms))
        block, kind = split_name(name)
        result.rows.append({"name": name, "block": block, "kind": kind, **row})
        result.spectra[name] = S
    return result
