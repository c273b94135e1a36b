"""Per-weight-matrix spectral metrics of a model (data-free).

For every linear / Conv1D / embedding matrix W (out, in): singular values (exact below a size
threshold, randomized above), effective rank (sigma and energy forms), stable rank, energy rank
at 90 % and 99 %, the WeightWatcher power-law alpha of the ESD (KS scan of xmin), the FARMS
alpha (pooled ESD of fixed-shape submatrices: no aspect-ratio bias) and the WeLore class
(low-rank component or not) at one global threshold chosen for a target rank reduction.
All the math lives in rankwise.linalg.spectral; this module walks the model and tabulates.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.linalg import spectral

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"(?:^|\.)(\d+)\.")


@dataclass
class WeightAnalysis:
    """Rows of metrics (one dict per matrix, model order) and the singular values behind them."""

    rows: list[dict[str, Any]]
    spectra: dict[str, torch.Tensor] = field(repr=False)  # name -> S (k,) fp32, descending
    welore_tau: float | None = None
    welore_reduction: float | None = None


def split_name(name: str) -> tuple[int | None, str]:
    """(block index, kind) of a matrix name: "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj").

    The block is the first integer path component; names without one (embeddings, heads) have
    block None and keep their full name as kind.
    """
    match = _BLOCK.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end() :]


def short_kinds(kinds: list[str]) -> list[str]:
    """Shortest dotted suffix of each kind that tells it apart from the others (table headers).

    ["self_attn.q_proj", "mlp.up_proj"] -> ["q_proj", "up_proj"]; BERT's three "...dense" kinds
    keep enough of their path: "attention.output.dense", "intermediate.dense", "output.dense".
    """
    parts = [k.split(".") for k in kinds]
    out = []
    for i, p in enumerate(parts):
        label = kinds[i]
        for depth in range(1, len(p) + 1):
            suffix = p[-depth:]
            if all(q[-depth:] != suffix for j, q in enumerate(parts) if j != i):
                label = ".".join(suffix)
                break
        out.append(label)
    return out


def weight_matrices(
    source: nn.Module | Mapping[str, torch.Tensor], *, include_embeddings: bool = True
) -> dict[str, torch.Tensor]:
    """{name: W (out, in)} of a model's linear-like (and embedding) layers, or a given mapping.

    Uses rankwise.surgery.find_modules (the output head is left out, as PEFT does: it is tied to
    the input embedding in the bundled models). Tied weights appear once.
    """
    if isinstance(source, Mapping):
        out = {}
        for name, W in source.items():
            if not isinstance(W, torch.Tensor) or W.ndim != 2:
                raise ValueError(f"{name}: expected a 2-D (out, in) tensor, got {type(W).__name__}")
            out[name] = W
        return out
    if not isinstance(source, nn.Module):
        raise TypeError(f"expected an nn.Module or a {{name: tensor}} mapping, got {type(source).__name__}")
    from rankwise import surgery

    types = (*surgery.linear_types(), nn.Embedding) if include_embeddings else surgery.linear_types()
    found = surgery.find_modules(source, None, types=types)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, W in surgery.iter_weight_matrices(found):
        if id(found[name].weight) in seen:
            continue
        seen.add(id(found[name].weight))
        out[name] = W
    return out


def spectrum_metrics(S: torch.Tensor, shape: tuple[int, int], *, exact: bool = True) -> dict[str, Any]:
    """Rank metrics of one matrix from its singular values S (descending)."""
    m, n = shape
    full = min(m, n)
    sigma_max = float(S[0]) if S.numel() else 0.0
    return {
        "shape": [m, n],
        "exact": exact,
        "rank_full": full,
        "spectral_norm": sigma_max,
        "frobenius": float(torch.linalg.vector_norm(S.double())) if exact else None,
        "erank": spectral.effective_rank(S),
        "erank_energy": spectral.effective_rank(S, form="energy"),
        "erank_ratio": spectral.effective_rank(S) / full,
        "stable_rank": spectral.stable_rank(S),
        "energy90": spectral.energy_rank(S, 0.9),
        "energy99": spectral.energy_rank(S, 0.99),
    }


def _heavy_tail(W: torch.Tensor, S: torch.Tensor) -> dict[str, Any]:
    """WeightWatcher alpha (KS scan) and FARMS alpha; None where the ESD is too small to fit."""
    row: dict[str, Any] = {"alpha": None, "alpha_ks": None, "alpha_weighted": None, "farms_alpha": None}
    try:
        fit = spectral.powerlaw_alpha(spectral.esd(S), xmin="scan")
        row.update(alpha=fit.alpha, alpha_ks=fit.ks_distance, alpha_weighted=fit.alpha_weighted)
    except ValueError as exc:
        logger.info("alpha skipped: %s", exc)
    try:
        row["farms_alpha"] = spectral.farms_alpha(W).alpha
    except ValueError as exc:
        logger.info("FARMS alpha skipped: %s", exc)
    return row


def analyze_weights(
    source: nn.Module | Mapping[str, torch.Tensor],
    *,
    quick: bool = False,
    welore_reduction: float = 0.5,
    max_exact: int = 4096,
    randomized_rank: int = 512,
    include_embeddings: bool = True,
    progress: bool = True,
) -> WeightAnalysis:
    """Spectral metrics of every weight matrix of `source` (a model or {name: W (out, in)}).

    quick=True computes only singular values and the rank metrics (no alpha, FARMS, WeLore).
    Matrices with min(m, n) > max_exact get only their top `randomized_rank` singular values
    (randomized SVD); their rows say exact=False and their rank metrics are over those values.
    The WeLore threshold tau is bisected over the block matrices (those with a layer index, as
    WeLore reduces only the transformer blocks) to reach `welore_reduction` of their total rank.
    """
    from tqdm.auto import tqdm

    mats = weight_matrices(source, include_embeddings=include_embeddings)
    if not mats:
        raise ValueError("no weight matrices found: the model has no Linear/Conv1D/Embedding layers")
    rows: list[dict[str, Any]] = []
    spectra: dict[str, torch.Tensor] = {}
    for name, W in tqdm(mats.items(), desc="spectra", unit="matrix", disable=not progress):
        W = W.detach()
        S, exact = spectral.singular_values(W, max_exact=max_exact, rank=randomized_rank)
        S = S.float().cpu()
        block, kind = split_name(name)
        row = {"name": name, "block": block, "kind": kind}
        row.update(spectrum_metrics(S, (int(W.shape[0]), int(W.shape[1])), exact=exact))
        if not exact:  # the top-k values only: metrics over them are lower bounds
            row["frobenius"] = float(torch.linalg.vector_norm(W.float()))
            row["stable_rank"] = row["frobenius"] ** 2 / float(S[0]) ** 2
        if not quick:
            row.update(_heavy_tail(W, S))
        rows.append(row)
        spectra[name] = S
    result = WeightAnalysis(rows=rows, spectra=spectra)
    if not quick:
        _add_welore(result, welore_reduction)
    return result


def _add_welore(result: WeightAnalysis, reduction: float) -> None:
    """Classify block matrices as WeLore LRC / N-LRC at the bisected global threshold."""
    pool = [r for r in result.rows if r["block"] is not None and r["exact"]]
    if not pool:
        pool = [r for r in result.rows if r["exact"]]
    if not pool:
        return
    tau = spectral.welore_threshold([result.spectra[r["name"]] for r in pool], reduction)
    result.welore_tau, result.welore_reduction = tau, reduction
    for r in pool:
        S = result.spectra[r["name"]]
        shape = (r["shape"][0], r["shape"][1])
        r["welore_keep"] = r["rank_full"] - spectral.welore_drop(S, tau)
        r["welore"] = spectral.welore_class(S, tau, shape=shape)


def quick_table_data(analysis: WeightAnalysis, metric: str = "erank") -> tuple[list[str], list[list[Any]]]:
    """(kinds, rows): a block x kind grid of one metric; non-block matrices get their own rows."""
    kinds: list[str] = []
    grid: dict[Any, dict[str, Any]] = {}
    for r in analysis.rows:
        if r["block"] is None:
            continue
        if r["kind"] not in kinds:
            kinds.append(r["kind"])
        grid.setdefault(r["block"], {})[r["kind"]] = r[metric]
    table = [[block] + [grid[block].get(k) for k in kinds] for block in sorted(grid)]
    return kinds, table
