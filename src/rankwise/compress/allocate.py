"""Rank allocation across layers for a parameter budget.

Every allocator takes the layers' shapes and spectra (singular values in the compressor's own
metric, descending; with a Gram whitener sigma_i^2 is the calibration loss of direction i) and
`ratio` = fraction of the targeted weights to remove (biases are not counted, as in
rankwise.linalg.rank; the CompressionReport counts them exactly). It returns `{fqn: rank or
None}`; None keeps the layer dense. No allocator returns a rank above
`rankwise.linalg.break_even_rank` (a factorisation that would not save parameters).

Policies:
* "uniform", "energy", "welore": rankwise.linalg.rank.allocate (uniform ratio per layer as in
  SVD-LLM/ASVD; one common kept-energy level; WeLore's global heavy-tail threshold tau on
  min-max normalised spectra, bisected to the budget, non-saving layers dense = N-LRC).
* "budget": greedy global allocation: keep the components with the largest share of their
  layer's energy `sigma_i^2 / sum_j sigma_j^2` per parameter `(m + n)` until the budget is spent
  (water-filling of the normalised truncation error; a rankwise policy).
* "dynamic": D-Rank (effective-rank allocation with Lagrange multipliers) without basis sharing (groups of one layer): per projection type,
  `k_l = sqrt(s_l / w_l) P / sum_j sqrt(s_j w_j)` with information density s_l = effective rank
  of the energy distribution `p_i = sigma_i^2 / sum sigma^2` and cost `w_l = m + n`; integer
  repair towards P; a type whose dynamic ranks discard more energy than uniform ones falls back
  to uniform (the reference's fallback; its "gate always uniform" and Q/K->V rebalancing quirks
  are left out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rankwise.compress.base import check_ratio

__all__ = ["ALLOCATIONS", "LayerSpec", "allocate_ranks", "allocation_parameters"]

ALLOCATIONS = ("uniform", "energy", "welore", "budget", "dynamic")


@dataclass(frozen=True)
class LayerSpec:
    """Shape and spectrum of one targeted layer.

    Attributes:
        out_features, in_features: m, n.
        spectrum: singular values (min(m, n),) descending; not needed by "uniform".
        kind: projection type used by "dynamic" (default: last part of the fqn, e.g. "q_proj").
    """

    out_features: int
    in_features: int
    spectrum: torch.Tensor | None = None
    kind: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features


def allocation_parameters(layers: Mapping[str, LayerSpec], ranks: Mapping[str, int | None]) -> int:
    """Weights stored under `ranks` (None or a non-saving rank = dense), biases excluded."""
    from rankwise.linalg import break_even_rank

    total = 0
    for f, s in layers.items():
        m, n = s.shape
        r = ranks.get(f)
        total += m * n if r is None or r > break_even_rank(m, n) else r * (m + n)
    return total


def allocate_ranks(
    layers: Mapping[str, LayerSpec], ratio: float, policy: str = "uniform"
) -> dict[str, int | None]:
    """`{fqn: rank or None}` removing at least `ratio` of the targeted weights (module doc)."""
    from rankwise import linalg

    check_ratio(ratio)
    if policy not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {policy!r}: choose one of {list(ALLOCATIONS)}")
    if not layers:
        raise ValueError("no layers to allocate ranks to: the model has no matching target layers")
    if ratio == 0.0:
        return dict.fromkeys(layers)
    if policy != "uniform":
        missing = [f for f, s in layers.items() if s.spectrum is None]
        if missing:
            raise ValueError(f"allocation {policy!r} needs the spectrum of {missing[0]!r}")
    shapes = {f: s.shape for f, s in layers.items()}
    if policy in ("uniform", "energy", "welore"):
        spectra = None if policy == "uniform" else {f: s.spectrum for f, s in layers.items()}
        return linalg.allocate(spectra, shapes, ratio, policy)
    budget = math.floor((1.0 - ratio) * sum(m * n for m, n in shapes.values()))
    if policy == "budget":
        return _greedy_energy(layers, budget)
    return _dynamic(layers, ratio)


def _energy(s: LayerSpec) -> torch.Tensor:
    sig = s.spectrum.detach().to(torch.float64).clamp_min(0)
    e = sig * sig
    total = e.sum()
    return e / total if total > 0 else torch.full_like(e, 1.0 / max(e.numel(), 1))


def _usable(s: LayerSpec, rank: int) -> int | None:
    from rankwise.linalg import break_even_rank

    return rank if 1 <= rank <= break_even_rank(*s.shape) else None


def _greedy_energy(layers: Mapping[str, LayerSpec], budget: int) -> dict[str, int | None]:
    """Start every layer at rank 1, then add components by energy share per parameter."""
    from rankwise.linalg import break_even_rank

    names = list(layers)
    specs = [layers[f] for f in names]
    ranks = [1] * len(specs)
    used = sum(s.out_features + s.in_features for s in specs)
    if used > budget:
        raise ValueError(f"rank 1 in every layer already exceeds the budget ({used} > {budget}): lower the ratio")
    scores, owners = [], []
    for li, s in enumerate(specs):
        e = _energy(s)[1:break_even_rank(*s.shape)]  # candidates for ranks 2 .. break-even
        scores.append(e / (s.out_features + s.in_features))
        owners.append(torch.full((e.numel(),), li, dtype=torch.long))
    order = torch.cat(scores).argsort(descending=True, stable=True)
    for li in torch.cat(owners)[order].tolist():
        cost = specs[li].out_features + specs[li].in_features
        if used + cost <= budget:  # a cheaper layer's component may still fit after a miss
            ranks[li] += 1
            used += cost
    return {f: _usable(s, r) for f, s, r in zip(names, specs, ranks, strict=True)}


def _density(s: LayerSpec) -> float:
    """Effective rank of the energy distribution (D-Rank's information density)."""
    from rankwise.linalg.spectral import effective_rank

    return max(effective_rank(s.spectrum.detach().to(torch.float64), form="energy"), 1e-12)


def _dynamic(layers: Mapping[str, LayerSpec], ratio: float) -> dict[str, int | None]:
    groups: dict[str, list[str]] = {}
    for f, s in layers.items():
        groups.setdefault(s.kind or f.rsplit(".", 1)[-1], []).append(f)
    out: dict[str, int | None] = {}
    for names in groups.values():
        out.update(_dynamic_group({f: layers[f] for f in names}, ratio))
    return {f: out[f] for f in layers}


def _dynamic_group(layers: Mapping[str, LayerSpec], ratio: float) -> dict[str, int | None]:
    from rankwise.linalg import break_even_rank, rank_for_ratio

    names = list(layers)
    specs = [layers[f] for f in names]
    P = round((1.0 - ratio) * sum(s.out_features * s.in_features for s in specs))
    s_l = [_density(s) for s in specs]
    w_l = [s.out_features + s.in_features for s in specs]
    cap = [max(1, break_even_rank(*s.shape)) for s in specs]
    denom = sum(math.sqrt(si * wi) for si, wi in zip(s_l, w_l, strict=True))
    k = [min(c, max(1, round(math.sqrt(si / wi) * P / denom)))
         for si, wi, c in zip(s_l, w_l, cap, strict=True)]
    # integer repair towards P: shrink the lowest s/w while over, grow the highest while under
    prio = sorted(range(len(k)), key=lambda i: s_l[i] / w_l[i])
    for _ in range(4 * len(k) + 1):
        used = sum(ki * wi for ki, wi in zip(k, w_l, strict=True))
        if used > P:
            i = next((i for i in prio if k[i] > 1), None)
            if i is None:
                break
            k[i] -= 1
        else:
            i = next((i for i in reversed(prio) if k[i] < cap[i] and used + w_l[i] <= P), None)
            if i is None:
                break
            k[i] += 1
    uniform = [rank_for_ratio(*s.shape, ratio) for s in specs]
    if _discarded(specs, k) >= _discarded(specs, uniform):
        k = uniform  # D-Rank's fallback: dynamic must beat uniform on discarded energy
    return {f: _usable(s, ki) for f, s, ki in zip(names, specs, k, strict=True)}


def _discarded(specs: list[LayerSpec], ranks: list[int]) -> float:
    total = 0.0
    for s, r in zip(specs, ranks, strict=True):
        sig = s.spectrum.detach().to(torch.float64)
        total += float((sig[r:] ** 2).sum())
    return total
