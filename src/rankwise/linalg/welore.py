"""WeLore's low-rank / non-low-rank split of weight matrices by one global spectral threshold.

WeLore (Jaiswal et al. 2024, arXiv 2407.11239, "From GaLore to WeLore: how low-rank weights
non-uniformly emerge from low-rank gradients"): min-max normalise each matrix's singular values,
s'_i = (s_i - s_min) / (s_max - s_min), drop those below one global threshold tau (k_drop of
them), and pick tau so that the drops remove a target fraction of all ranks. A matrix is a
low-rank component (LRC) when it loses more than `min_ratio` of its rank at tau AND the kept rank
is below the break-even rank, keep (m + n) < m n, so that factorising saves parameters.
"""

from __future__ import annotations

from typing import Literal

import torch

from rankwise.linalg.rank import break_even_rank, welore_normalised
from rankwise.linalg.spectral_ranks import _spectrum

__all__ = ["welore_class", "welore_drop", "welore_threshold"]


def welore_drop(x: torch.Tensor, tau: float) -> int:
    """WeLore k_drop: how many min-max normalised singular values fall below tau.

    x is a matrix or its full spectrum (min(m, n) values, zeros included). A flat spectrum
    (max == min) drops nothing.
    """
    s, _ = _spectrum(x)
    if float(s[0]) == float(s[-1]):
        return 0
    return int((welore_normalised(s) < tau).sum())


def welore_threshold(spectra: list[torch.Tensor], reduction: float, *, iters: int = 60) -> float:
    """Bisect the global WeLore threshold tau so that sum k_drop / sum min(m, n) ~ reduction.

    Returns the smallest tau found whose rank reduction reaches `reduction` (WeLore's tables
    hand-pick tau per model; bisection hits any target instead).
    """
    if not 0.0 <= reduction < 1.0:
        raise ValueError(f"reduction must be in [0, 1), got {reduction}: e.g. 0.5 for 50 % of the rank")
    if not spectra:
        raise ValueError("no spectra given: pass one singular-value tensor per matrix")
    flat = torch.cat([welore_normalised(_spectrum(x)[0]) for x in spectra])
    total = flat.numel()
    lo_t, hi_t = 0.0, 1.0 + 1e-9
    for _ in range(iters):
        mid = (lo_t + hi_t) / 2
        if int((flat < mid).sum()) / total >= reduction:
            hi_t = mid
        else:
            lo_t = mid
    return hi_t


def welore_class(
    x: torch.Tensor,
    tau: float,
    *,
    shape: tuple[int, int] | None = None,
    min_ratio: float = 0.0,
) -> Literal["LRC", "N-LRC"]:
    """WeLore class of one matrix at the global threshold tau.

    LRC (low-rank component) when its own rank reduction k_drop / min(m, n) exceeds min_ratio
    AND the kept rank k is below the break-even rank m n / (m + n), so that factorising saves
    parameters (added to WeLore's min_ratio=0 rule, under which a matrix could be "factorised"
    into more parameters than it has); N-LRC otherwise.
    `shape` is required when x is a spectrum rather than the matrix.
    """
    if x.ndim == 2:
        shape = (int(x.shape[0]), int(x.shape[1]))
    elif shape is None:
        raise ValueError("welore_class needs shape=(m, n) when given singular values instead of W")
    m, n = shape
    full = min(m, n)
    k_drop = welore_drop(x, tau)
    keep = full - k_drop
    if k_drop / full > min_ratio and keep <= break_even_rank(m, n):  # keep (m + n) < m n
        return "LRC"
    return "N-LRC"
