"""Heavy-tail power-law fits of an empirical spectral density (ESD), plain and FARMS.

The ESD of W (m, n) is lambda_i = s_i^2, the eigenvalues of W^T W. Heavy-Tailed Self-
Regularisation (Martin & Mahoney 2021, "Implicit self-regularization in deep neural networks",
JMLR 22) fits its tail with a continuous power law p(lambda) ~ lambda^-alpha on lambda >= xmin,
by the continuous Pareto maximum-likelihood estimate (Clauset, Shalizi & Newman 2009, "Power-law
distributions in empirical data", eq. 3.1)

    alpha = 1 + n_tail / sum_{lambda_i >= xmin} ln(lambda_i / xmin),

with standard error (alpha - 1) / sqrt(n_tail) (their eq. 3.2) and xmin chosen to minimise the
Kolmogorov-Smirnov distance D = max |S(x) - P(x)| between the empirical and fitted CDFs of the
tail (their eq. 3.9), as WeightWatcher's WWFit; the "mid" / "peak" rules are its alternatives.

FARMS (Hu et al. 2025, arXiv 2506.06280, "Eigenspectrum analysis of neural networks without aspect
ratio bias") fits the same law to the ESD pooled over fixed-shape submatrices of W, which removes
the dependence of alpha on the aspect ratio m / n.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from rankwise.linalg.spectral_ranks import _check_matrix, _gram_eigvals, _spectrum

__all__ = ["EVALS_THRESH", "PowerLawFit", "esd", "farms_alpha", "farms_esd", "powerlaw_alpha"]

# WeightWatcher drops eigenvalues at or below this (EVALS_THRESH) before fitting.
EVALS_THRESH = 1e-5


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power-law fit p(lambda) ~ lambda^-alpha on lambda >= xmin of one ESD.

    alpha_weighted = alpha * log10(lambda_max); log_alpha_norm = log10(sum lambda^alpha);
    sigma = (alpha - 1) / sqrt(n_tail) is the MLE's standard error; ks_distance is D.
    """

    alpha: float
    xmin: float
    xmax: float
    ks_distance: float
    n_tail: int
    n: int
    sigma: float
    alpha_weighted: float
    log_alpha_norm: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def esd(x: torch.Tensor, *, thresh: float | None = EVALS_THRESH) -> torch.Tensor:
    """Empirical spectral density support: eigenvalues lambda = s^2 of W^T W, ascending (fp64).

    Eigenvalues <= thresh are dropped as WeightWatcher does (thresh=None keeps all > 0).
    """
    s, _ = _spectrum(x)
    lam = torch.flip(s * s, (0,))
    return lam[lam > (thresh if thresh is not None else 0.0)]


def _alpha_and_ks(lam: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLE alpha and KS distance D for candidate xmin = lam[idx] (lam ascending, fp64).

    alpha_i = 1 + n_i / sum_{j>=i} ln(lam_j / lam_i); D_i = max_j |F_fit - F_emp| over the tail,
    F_fit(x) = 1 - (x / xmin)^(1 - alpha), F_emp = rank / n_i (as WeightWatcher's WWFit).
    """
    n = lam.numel()
    log_lam = torch.log(lam)
    suffix = torch.flip(torch.cumsum(torch.flip(log_lam, (0,)), 0), (0,))  # sum_{j>=i} ln lam_j
    alphas = torch.empty(idx.numel(), dtype=torch.float64)
    ds = torch.ones(idx.numel(), dtype=torch.float64)
    pos = torch.arange(n, dtype=torch.float64)
    for start in range(0, idx.numel(), 512):  # chunks keep the (candidates, n) block small
        ii = idx[start : start + 512]
        n_tail = (n - ii).to(torch.float64)
        denom = suffix[ii] - n_tail * log_lam[ii]
        a = torch.where(denom > 0, 1 + n_tail / denom.clamp_min(1e-300), torch.inf)
        alphas[start : start + 512] = a
        # gap_ij = |1 - (lam_j / lam_i)^(1 - a_i) - (j - i) / n_i| for j >= i (0 before the tail)
        gap = torch.exp((log_lam[None, :] - log_lam[ii][:, None]) * (1 - a[:, None]))
        gap = (1 - gap - (pos[None, :] - ii[:, None]) / n_tail[:, None]).abs_()
        gap.masked_fill_(pos[None, :] < ii[:, None], 0.0)
        d = gap.max(dim=1).values
        ds[start : start + 512] = torch.where(torch.isfinite(a) & torch.isfinite(d), d, 1.0)
    return alphas, ds


def powerlaw_alpha(
    evals: torch.Tensor,
    *,
    xmin: Literal["scan", "mid", "peak"] | float = "scan",
    min_evals: int = 10,
) -> PowerLawFit:
    """Fit the power-law exponent alpha of an ESD (eigenvalues lambda = s^2, any order).

    xmin="scan": every eigenvalue but the largest is a candidate lambda_min; keep the one with the
    smallest KS distance (WeightWatcher's default fit, xmax = max lambda).
    xmin="mid": lambda_min = sorted ESD at index floor(n / 2) (FARMS' default 'xmin_mid').
    xmin="peak": scan only candidates in [0.95, 1.5] x the mode of a 100-bin log10 histogram
    (WeightWatcher's fix_fingers='xmin_peak'). A float uses the eigenvalue nearest to it.
    Status (WeightWatcher): alpha < 2 over-trained, 2-6 well-trained, > 6 random-like.
    """
    if not isinstance(evals, torch.Tensor) or evals.ndim != 1:
        raise TypeError("evals must be a 1-D tensor of eigenvalues: use esd(W) to get them from W")
    lam = torch.sort(evals.detach().to(torch.float64)).values
    if not torch.isfinite(lam).all():
        raise ValueError("eigenvalues contain NaN or inf: fix the input matrix first")
    lam = lam[lam > 0]
    n = lam.numel()
    if n < max(min_evals, 2):
        raise ValueError(
            f"a power-law fit needs at least {max(min_evals, 2)} positive eigenvalues, got {n}: "
            "skip this matrix or lower min_evals"
        )
    if xmin == "scan":
        idx = torch.arange(n - 1)
    elif xmin == "mid":
        idx = torch.tensor([n // 2])
    elif xmin == "peak":
        logs = torch.log10(lam)
        counts = torch.histc(logs, bins=100, min=float(logs[0]), max=float(logs[-1]))
        width = (float(logs[-1]) - float(logs[0])) / 100
        peak = 10 ** (float(logs[0]) + (int(torch.argmax(counts)) + 0.5) * width)
        idx = torch.nonzero((lam[:-1] >= 0.95 * peak) & (lam[:-1] <= 1.5 * peak)).flatten()
        if idx.numel() == 0:
            idx = torch.arange(n - 1)
    elif isinstance(xmin, int | float) and not isinstance(xmin, bool):
        idx = torch.argmin((lam[:-1] - float(xmin)).abs()).reshape(1)
    else:
        raise ValueError(f"xmin must be 'scan', 'mid', 'peak' or a number, got {xmin!r}")
    idx = idx.clamp_max(n - 2)
    alphas, ds = _alpha_and_ks(lam, idx)
    best = int(torch.argmin(ds))
    i = int(idx[best])
    alpha = float(alphas[best])
    n_tail = n - i
    xmax = float(lam[-1])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(lam[i]),
        xmax=xmax,
        ks_distance=float(ds[best]),
        n_tail=n_tail,
        n=n,
        sigma=(alpha - 1) / math.sqrt(n_tail),
        alpha_weighted=alpha * math.log10(xmax),
        log_alpha_norm=float(torch.log10((lam**alpha).sum())),
    )


def farms_esd(
    W: torch.Tensor,
    *,
    rows: int = 100,
    q_ratio: float = 2.0,
    ops_per_dim: int = 10,
    thresh: float | None = EVALS_THRESH,
) -> torch.Tensor:
    """Pooled ESD of fixed-shape submatrices of W (FARMS' fixed sampling), ascending fp64.

    W (m, n) is oriented with its short side first; windows of rows x (q_ratio * rows) are laid on
    a grid of `ops_per_dim` evenly spaced offsets per dimension (step floor((dim - window) /
    (ops_per_dim - 1)), the last window flush with the edge), and all their eigenvalues s^2 pooled.
    A side shorter than the window shrinks the window to fit (the only deviation from the paper).
    """
    _check_matrix(W, "W")
    if rows < 2 or q_ratio < 1 or ops_per_dim < 1:
        raise ValueError("need rows >= 2, q_ratio >= 1 and ops_per_dim >= 1 (defaults 100, 2.0, 10)")
    W = W.detach()
    if W.shape[0] > W.shape[1]:
        W = W.T
    m, n = W.shape
    r = min(rows, m)
    c = min(n, max(r, int(r * q_ratio)))

    def offsets(dim: int, window: int) -> list[int]:
        step = max(1, (dim - window) // max(ops_per_dim - 1, 1))
        count = min(ops_per_dim, max(1, (dim - window) // step + 1))
        return [min(k * step, dim - window) for k in range(count)]

    blocks = [W[i : i + r, j : j + c] for i in offsets(m, r) for j in offsets(n, c)]
    lam = torch.sort(_gram_eigvals(torch.stack(blocks)).flatten()).values  # s^2 of every block
    return lam[lam > (thresh if thresh is not None else 0.0)]


def farms_alpha(
    W: torch.Tensor,
    *,
    rows: int = 100,
    q_ratio: float = 2.0,
    ops_per_dim: int = 10,
    xmin: Literal["scan", "mid", "peak"] | float = "mid",
    thresh: float | None = EVALS_THRESH,
) -> PowerLawFit:
    """Aspect-ratio-free alpha (FARMS): powerlaw_alpha on farms_esd(W), xmin='mid' by default."""
    lam = farms_esd(W, rows=rows, q_ratio=q_ratio, ops_per_dim=ops_per_dim, thresh=thresh)
    return powerlaw_alpha(lam, xmin=xmin, min_evals=5)
