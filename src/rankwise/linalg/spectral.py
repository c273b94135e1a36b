"""Spectral diagnostics: pure metric functions over singular values, eigenvalues and matrices.

Every function takes either a 1-D tensor of singular values (any order) or a 2-D matrix, whose
singular values are then computed here in fp32 (fp64 when the matrix is fp64). Metrics are
returned as Python floats/ints, computed in fp64.

Definitions (method cards 5 and 18-22 in the project notes):
- effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / sum s ("sigma" form) or
  s_i^2 / sum s^2 ("energy" form, D-Rank's information density).
- stable rank: sum s^2 / s_1^2 (WeightWatcher's sum(lambda) / lambda_max). Not ASVD's square root.
- energy rank: smallest k whose top-k singular values hold a fraction `energy` of sum s^2.
- power-law alpha of the ESD lambda = s^2 (Martin & Mahoney; WeightWatcher's WWFit): continuous
  Pareto MLE alpha = 1 + n / sum ln(lambda_i / lambda_min) over the tail, lambda_min chosen by the
  Kolmogorov-Smirnov scan (or the "mid" / "peak" rules).
- FARMS (Hu et al., arXiv 2506.06280): the same fit on the pooled ESD of fixed-shape submatrices,
  which removes the bias of alpha on the matrix aspect ratio.
- WeLore (Jaiswal et al., arXiv 2407.11239): min-max normalised singular values, one global
  threshold tau, low-rank component (LRC) vs non-low-rank component (N-LRC).
- RankMe (Garrido et al., ICML 2023): exp(H(s / ||s||_1 + eps)) of an embedding matrix.
- Matrix Nuclear-Norm (Li et al., arXiv 2410.10672): the L_{1,2} norm (sum of the top min(L, d)
  column norms) of centred, row-normalised representations, an SVD-free surrogate of ||R||_*.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from rankwise.linalg._checks import compute_dtype
from rankwise.linalg.rank import break_even_rank, welore_normalised

__all__ = [
    "PowerLawFit",
    "effective_rank",
    "energy_rank",
    "esd",
    "farms_alpha",
    "farms_esd",
    "matrix_nuclear_norm",
    "normalize_representations",
    "nuclear_norm",
    "numerical_rank",
    "powerlaw_alpha",
    "rankme",
    "singular_values",
    "stable_rank",
    "welore_class",
    "welore_drop",
    "welore_threshold",
]

# WeightWatcher drops eigenvalues at or below this (EVALS_THRESH) before fitting.
EVALS_THRESH = 1e-5


# --------------------------------------------------------------------------- singular values


def _svdvals(A: torch.Tensor) -> torch.Tensor:
    """Singular values of A (m, n), descending, through rankwise.linalg.svd when it is there."""
    try:
        from rankwise.linalg.svd import svdvals
    except ImportError:  # the shared SVD module is optional for these metrics
        return torch.linalg.svdvals(A)
    return svdvals(A)


def singular_values(
    A: torch.Tensor,
    *,
    method: Literal["auto", "svd", "gram", "randomized"] = "auto",
    max_exact: int = 4096,
    rank: int = 512,
    seed: int = 0,
) -> tuple[torch.Tensor, bool]:
    """Singular values of a matrix (m, n): exact below a size threshold, randomized above.

    method="svd": svdvals in fp32 (fp64 for fp64 input). method="gram": sqrt of the eigenvalues
    of the fp64 Gram matrix of the short side, 2-5x faster on CPU than an fp32 SVD; the absolute
    error of every value is ~sqrt(eps64) s_1 = 1.5e-8 s_1, below the fp32 SVD's eps32 s_1 =
    1.2e-7 s_1, so nothing is lost for these diagnostics. method="randomized": the top `rank`
    values from a randomized SVD (Halko et al. 2011, 4 power iterations). "auto": "gram" when
    min(m, n) <= max_exact, else "randomized".

    Returns (S, exact): S (k,) descending (fp32, fp64 for fp64 input); exact is False when S
    holds only the top `rank` values.
    """
    _check_matrix(A, "A")
    if method == "auto":
        method = "gram" if min(A.shape) <= max_exact else "randomized"
    A = A.detach()
    out_dtype = compute_dtype(A.dtype)
    if method == "svd":
        return _svdvals(A.to(out_dtype)), True
    if method == "gram":
        return _gram_eigvals(A).flip(-1).sqrt().to(out_dtype), True
    if method == "randomized":
        from rankwise.linalg.svd import randomized_svd

        _, S, _ = randomized_svd(A.to(out_dtype), min(rank, min(A.shape)), power_iters=4, seed=seed)
        return S, False
    raise ValueError(f"method must be 'auto', 'svd', 'gram' or 'randomized', got {method!r}")


def _gram_eigvals(A: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, >= 0, fp64) of the Gram matrix of the short side of A (..., m, n).

    These are the squared singular values of A; batched over leading dimensions.
    """
    X = A.to(torch.float64)
    G = X @ X.mT if X.shape[-2] <= X.shape[-1] else X.mT @ X
    return torch.linalg.eigvalsh(G).clamp_min(0.0)


def _check_matrix(A: torch.Tensor, what: str) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {tuple(A.shape)}: reshape it")
    if A.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(A.shape)}): pass a non-empty matrix")
    if not torch.isfinite(A).all():
        raise ValueError(f"{what} contains NaN or inf: fix the weights/activations before analysis")


def _spectrum(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(s, tol): singular values (fp64, descending) and the zero tolerance max(m,n)*eps*s_1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of singular values or a matrix, got {type(x).__name__}")
    if x.ndim == 2:
        _check_matrix(x, "matrix")
        work = compute_dtype(x.dtype)
        s = _svdvals(x.detach().to(work)).to(torch.float64)
        size, eps = max(x.shape), torch.finfo(work).eps
    elif x.ndim == 1:
        if x.numel() == 0:
            raise ValueError("the singular values are empty: pass at least one value")
        s = x.detach().to(torch.float64)
        if not torch.isfinite(s).all():
            raise ValueError("singular values contain NaN or inf: fix the input matrix first")
        if (s < 0).any():
            raise ValueError("singular values must be >= 0: pass svdvals(A), not eigenvalues of a non-PSD matrix")
        s = torch.sort(s, descending=True).values
        work = x.dtype if x.dtype.is_floating_point else torch.float64
        size, eps = s.numel(), torch.finfo(work).eps
    else:
        raise ValueError(f"expected singular values (1-D) or a matrix (2-D), got shape {tuple(x.shape)}")
    return s, size * eps * float(s[0])


def _entropy_exp(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def numerical_rank(x: torch.Tensor) -> int:
    """Number of singular values above max(m, n) * eps * s_1 (numpy.linalg.matrix_rank's rule)."""
    s, tol = _spectrum(x)
    return int((s > tol).sum())


def effective_rank(x: torch.Tensor, *, form: Literal["sigma", "energy"] = "sigma") -> float:
    """Effective rank exp(H(p)) of a matrix or its singular values (Roy & Vetterli 2007).

    form="sigma": p_i = s_i / sum s; form="energy": p_i = s_i^2 / sum s^2. Values at or below
    the numerical-zero tolerance are dropped. 1 <= erank <= rank; 0.0 for the zero matrix.
    """
    if form not in ("sigma", "energy"):
        raise ValueError(f"form must be 'sigma' or 'energy', got {form!r}")
    s, tol = _spectrum(x)
    s = s[s > tol]
    if s.numel() == 0:
        return 0.0
    w = s if form == "sigma" else s * s
    return _entropy_exp(w / w.sum())


def stable_rank(x: torch.Tensor) -> float:
    """Stable rank ||A||_F^2 / ||A||_2^2 = sum s^2 / s_1^2 (0.0 for the zero matrix)."""
    s, _ = _spectrum(x)
    if float(s[0]) == 0.0:
        return 0.0
    return float((s * s).sum() / (s[0] * s[0]))


def energy_rank(x: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k such that the top-k singular values hold `energy` of sum s^2 (0 for zero)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}: e.g. 0.9 for 90 %")
    s, _ = _spectrum(x)
    e = s * s
    total = float(e.sum())
    if total == 0.0:
        return 0
    frac = torch.cumsum(e, 0) / total
    # a relative slack of 1e-12 so that exact boundaries (e.g. energy=1.0) are not lost to rounding
    return min(int((frac < energy - 1e-12).sum()) + 1, s.numel())


# --------------------------------------------------------------------------- power-law alpha


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


# --------------------------------------------------------------------------- WeLore


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
    parameters (the card's fix for WeLore's min_ratio=0 default); N-LRC otherwise.
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


# --------------------------------------------------------------------------- representations


def rankme(x: torch.Tensor, *, eps: float = 1e-7) -> float:
    """RankMe of embeddings Z (N, K) or their singular values: exp(H(s / ||s||_1 + eps)).

    Garrido et al. 2023, eq. 1; no centring (as in the paper). Use N >> K (the paper: 25 600).
    """
    s, _ = _spectrum(x)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def normalize_representations(R: torch.Tensor) -> torch.Tensor:
    """Centre the columns of R (L tokens, d) and scale every row to unit l2 norm (MNN step 2)."""
    _check_matrix(R, "R")
    R = R.detach().to(torch.float64)
    R = R - R.mean(dim=0, keepdim=True)
    return R / R.norm(dim=1, keepdim=True).clamp_min(1e-12)


def matrix_nuclear_norm(R: torch.Tensor, *, normalize: bool = True) -> float:
    """Matrix Nuclear-Norm of representations R (L, d): sum of the top min(L, d) column norms.

    The L_{1,2} surrogate of ||R||_* (Li et al. 2024): O(L d) instead of an SVD. With
    normalize=True (the paper) R is first centred and row-normalised; the per-text score is
    MNN / L. For L >= d it upper-bounds ||R||_* (triangle inequality); for L < d it need not.
    """
    R = normalize_representations(R) if normalize else _as_fp64(R)
    norms = torch.sort(R.norm(dim=0), descending=True).values
    return float(norms[: min(R.shape)].sum())


def nuclear_norm(R: torch.Tensor, *, normalize: bool = False) -> float:
    """Exact nuclear norm ||R||_* = sum of singular values (fp64); normalize as in MNN."""
    R = normalize_representations(R) if normalize else _as_fp64(R)
    return float(_svdvals(R).sum())


def _as_fp64(R: torch.Tensor) -> torch.Tensor:
    _check_matrix(R, "R")
    return R.detach().to(torch.float64)
