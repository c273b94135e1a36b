"""Rank rules and rank allocation over many matrices.

Words (used the same way across rankwise): `ratio` is the fraction of PARAMETERS removed (not of rank), `keep` = 1 -
ratio. A rank-r factorisation B (m, r) @ A (r, n) of an (m, n) matrix stores r (m + n) numbers
(biases are not counted) against m n dense, so it saves parameters only when r (m + n) < m n
(the break-even rank r* = floor((m n - 1) / (m + n))). A square matrix must lose more than half its rank
before factorising saves anything; every allocator here therefore returns None ("keep dense") for
a matrix whose rank would not save parameters, never a rank above break-even.

Policies of `allocate` (all meet a total parameter budget (1 - ratio) * sum m n):
- "uniform": the same ratio for every matrix, r = floor((1 - ratio) m n / (m + n)) (SVD-LLM,
  Wang et al. 2024; LoRD, Kaushal et al. 2023).
- "energy": one common spectral-energy level e for every matrix, r_i = the smallest rank keeping
  a fraction e of sum sigma^2, with e the largest level that fits the budget.
- "welore": WeLore's heavy-tail rule (Jaiswal et al. 2024, arXiv 2407.11239): singular values are min-max
  normalised per matrix, s~ = (s - min s) / (max s - min s), one global threshold tau drops
  every s~ < tau, k = min(m, n) - #dropped. The paper looks tau up from a rank-reduction table;
  here tau is bisected to the parameter budget (the smallest tau that fits). Matrices whose k is
  above break-even stay dense (WeLore's N-LRC), the others are factorised (LRC).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Literal

import torch

from rankwise.linalg._checks import validate_fraction, validate_int, validate_shape

__all__ = [
    "allocate",
    "break_even_rank",
    "factorized_params",
    "heavy_tail_rank",
    "welore_normalised",
    "rank_for_budget",
    "rank_for_energy",
    "rank_for_ratio",
]

logger = logging.getLogger(__name__)

Policy = Literal["uniform", "energy", "welore"]


def break_even_rank(m: int, n: int) -> int:
    """Largest r with r (m + n) < m n: the highest rank whose factors are smaller than the matrix.

    Returns 0 when no rank saves parameters (e.g. a 1 x n matrix).
    """
    m, n = validate_shape((m, n))
    return (m * n - 1) // (m + n)


def factorized_params(m: int, n: int, rank: int | None) -> int:
    """Parameters stored for an (m, n) matrix at `rank` (None = dense): r (m + n) or m n."""
    m, n = validate_shape((m, n))
    return m * n if rank is None else validate_int(rank, "rank", minimum=0) * (m + n)


def _exact(x: float) -> Fraction:
    """The decimal a user typed (0.2 -> 1/5), so closed forms are not off by one ulp."""
    return Fraction(repr(float(x)))


def _uniform_rank(m: int, n: int, keep: Fraction) -> int:
    return math.floor(keep * m * n / (m + n))


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """r = floor((1 - ratio) m n / (m + n)): the rank that removes `ratio` of an (m, n) matrix's
    parameters (r (m + n) <= (1 - ratio) m n; LLaMA 4096 x 4096 at ratio 0.2 -> 1638).

    Raises:
        ValueError: ratio outside [0, 1), or so high that the rank would be 0.
    """
    m, n = validate_shape((m, n))
    ratio = validate_fraction(ratio, "ratio", low=0.0, high=1.0, high_open=True)
    r = _uniform_rank(m, n, 1 - _exact(ratio))
    if r < 1:
        raise ValueError(
            f"ratio {ratio} leaves rank 0 for a ({m}, {n}) matrix (rank 1 already keeps "
            f"{(m + n) / (m * n):.3f} of it): lower the ratio or keep this matrix dense"
        )
    return r


def _sorted_spectrum(S: torch.Tensor, name: str = "S") -> torch.Tensor:
    if not isinstance(S, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D tensor of singular values, got {type(S).__name__}")
    if S.ndim != 1 or S.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of singular values, got shape {tuple(S.shape)}")
    S = S.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"{name} contains NaN or Inf: check the input / upstream loss")
    if bool((S < 0).any()):
        raise ValueError(f"{name} has negative entries: pass singular values (>= 0), not eigenvalues")
    return torch.sort(S, descending=True).values


def _energy_fractions(S: torch.Tensor) -> torch.Tensor:
    """cumsum(s^2) / sum(s^2) (the last entry is exactly 1); all ones for a zero spectrum."""
    cum = torch.cumsum(S * S, 0)
    if float(cum[-1]) == 0.0:
        return torch.ones_like(cum)
    return cum / cum[-1]


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold a fraction `energy` of sum s^2 (fp64).

    Args:
        S: (k,) singular values in any order; pass the full spectrum, or the total is too small.
        energy: in (0, 1].
    """
    energy = validate_fraction(energy, "energy", low=0.0, high=1.0, high_open=False)
    if energy == 0.0:
        raise ValueError("energy must be > 0 (e.g. 0.9 keeps 90 % of sum s^2)")
    frac = _energy_fractions(_sorted_spectrum(S))
    target = torch.tensor([energy], dtype=torch.float64)
    return int(torch.searchsorted(frac, target)) + 1


def welore_normalised(S: torch.Tensor) -> torch.Tensor:
    """WeLore's min-max normalisation (s - min) / (max - min), descending; ones if flat."""
    lo, hi = float(S[-1]), float(S[0])
    return (S - lo) / (hi - lo) if hi > lo else torch.ones_like(S)


def heavy_tail_rank(S: torch.Tensor, tau: float) -> int:
    """WeLore's kept rank k = len(S) - #{i : (s_i - min s) / (max s - min s) < tau}.

    S must be the full spectrum (min(m, n) values, zeros included), as WeLore normalises by the
    smallest singular value. A flat spectrum keeps everything; tau <= 1 always keeps >= 1.
    """
    tau = validate_fraction(tau, "tau", low=0.0, high=1.0, high_open=False)
    s = _sorted_spectrum(S)
    return s.numel() - int((welore_normalised(s) < tau).sum())


def rank_for_budget(shapes: Mapping[str, tuple[int, int]], budget: int) -> dict[str, int | None]:
    """Uniform-ratio ranks so that the listed matrices store at most `budget` parameters in total.

    keep = budget / sum m n, r_i = floor(keep m_i n_i / (m_i + n_i)); None (dense) when the
    budget covers every matrix dense.
    """
    shapes = {k: validate_shape(v, f"shapes[{k!r}]") for k, v in shapes.items()}
    budget = validate_int(budget, "budget", minimum=1)
    total = sum(m * n for m, n in shapes.values())
    if budget >= total:
        return dict.fromkeys(shapes)
    return _uniform(shapes, Fraction(budget, total))


def _uniform(shapes: dict[str, tuple[int, int]], keep: Fraction) -> dict[str, int | None]:
    ranks: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        r = _uniform_rank(m, n, keep)
        if r < 1:
            raise ValueError(
                f"ratio {float(1 - keep):.4f} leaves rank 0 for {name!r} ({m}, {n}): lower the ratio "
                "or leave that matrix out of the allocation"
            )
        ranks[name] = r if r <= break_even_rank(m, n) else None
    return ranks


def _search(candidates: torch.Tensor, feasible: Callable[[float], bool], largest: bool) -> float | None:
    """Bisect sorted candidates for the largest (or smallest) feasible one, feasibility monotone."""
    lo, hi, best = 0, candidates.numel() - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        value = float(candidates[mid])
        if feasible(value):
            best = value
            lo, hi = (mid + 1, hi) if largest else (lo, mid - 1)
        else:
            lo, hi = (lo, mid - 1) if largest else (mid + 1, hi)
    return best


def allocate(
    spectra: Mapping[str, torch.Tensor] | None,
    shapes: Mapping[str, tuple[int, int]],
    ratio: float,
    policy: Policy = "uniform",
) -> dict[str, int | None]:
    """Ranks {name: r} that remove at least `ratio` of the parameters of the listed matrices.

    Args:
        spectra: {name: full singular values (min(m, n),)}; unused (may be None) for "uniform".
        shapes: {name: (m, n)} = (out_features, in_features).
        ratio: fraction of the total parameters to remove, in [0, 1).
        policy: "uniform", "energy" or "welore" (module doc).

    Returns:
        {name: rank or None}; None means keep the matrix dense (no rank <= break-even was
        chosen for it), every int rank is in [1, break_even_rank(m, n)].

    Raises:
        ValueError: bad ratio/policy/shapes, spectra missing or of the wrong length, or a ratio
            that even rank 1 everywhere cannot reach.
    """
    shapes = {k: validate_shape(v, f"shapes[{k!r}]") for k, v in shapes.items()}
    if not shapes:
        raise ValueError("shapes is empty: pass {name: (out_features, in_features)} for each matrix")
    ratio = validate_fraction(ratio, "ratio", low=0.0, high=1.0, high_open=True)
    if policy not in ("uniform", "energy", "welore"):
        raise ValueError(f"policy must be 'uniform', 'energy' or 'welore', got {policy!r}")
    if ratio == 0.0:
        return dict.fromkeys(shapes)
    keep = 1 - _exact(ratio)
    if policy == "uniform":
        return _uniform(shapes, keep)

    spec = _check_spectra(spectra, shapes)
    budget = keep * sum(m * n for m, n in shapes.values())
    floor = sum(m + n for m, n in shapes.values())
    if floor > budget:
        raise ValueError(
            f"ratio {ratio} is out of reach: rank 1 for every matrix already keeps "
            f"{floor / sum(m * n for m, n in shapes.values()):.4f} of the parameters; lower the ratio"
        )

    def cost(ranks: dict[str, int]) -> int:
        return sum(_capped_cost(shapes[k], r) for k, r in ranks.items())

    if policy == "energy":
        fracs = {k: _energy_fractions(s) for k, s in spec.items()}

        def ranks_at(e: float) -> dict[str, int]:
            t = torch.tensor([e], dtype=torch.float64)
            return {k: int(torch.searchsorted(f, t)) + 1 for k, f in fracs.items()}

        candidates = torch.unique(torch.cat(list(fracs.values())))  # ascending
        level = _search(candidates, lambda e: cost(ranks_at(e)) <= budget, largest=True)
        ranks = ranks_at(level) if level is not None else None
        logger.debug("energy allocation: common energy level %s", level)
    else:
        normed = {k: welore_normalised(s) for k, s in spec.items()}

        def ranks_at(tau: float) -> dict[str, int]:
            return {k: v.numel() - int((v < tau).sum()) for k, v in normed.items()}

        values = torch.unique(torch.cat(list(normed.values())))
        above = torch.nextafter(values, torch.full_like(values, 2.0))  # tau just above each s~
        candidates = torch.cat([torch.zeros(1, dtype=torch.float64), above[above <= 1.0]])
        tau = _search(candidates, lambda t: cost(ranks_at(t)) <= budget, largest=False)
        ranks = ranks_at(tau) if tau is not None else None
        logger.debug("welore allocation: global threshold tau = %s", tau)
    if ranks is None:  # only when ties at the top singular value keep k > 1 everywhere
        raise ValueError(f"policy {policy!r} cannot reach ratio {ratio} on these spectra: lower the ratio")
    return {k: (r if r <= break_even_rank(*shapes[k]) else None) for k, r in ranks.items()}


def _capped_cost(shape: tuple[int, int], rank: int) -> int:
    """Stored parameters at `rank`, or dense when that rank would not save any."""
    m, n = shape
    return factorized_params(m, n, rank if rank <= break_even_rank(m, n) else None)


def _check_spectra(
    spectra: Mapping[str, torch.Tensor] | None, shapes: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    if spectra is None:
        raise ValueError("this policy needs spectra={name: singular values}; compute them with svdvals")
    missing = sorted(set(shapes) - set(spectra))
    extra = sorted(set(spectra) - set(shapes))
    if missing or extra:
        raise ValueError(f"spectra and shapes must name the same matrices; missing {missing}, extra {extra}")
    out = {}
    for k, (m, n) in shapes.items():
        s = _sorted_spectrum(spectra[k], f"spectra[{k!r}]")
        if s.numel() != min(m, n):
            raise ValueError(
                f"spectra[{k!r}] has {s.numel()} values but a ({m}, {n}) matrix has {min(m, n)}: "
                "pass the full spectrum (svdvals), not a truncated one"
            )
        out[k] = s
    return out
