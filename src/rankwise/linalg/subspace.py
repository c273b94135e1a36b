"""Top-r right singular subspace by block subspace iteration on AᵀA, QR on the small side only.

A GaLore projector needs one side of the SVD only: the r leading right singular vectors of a
gradient A (m, n) (`rankwise.optim.projector` passes Gᵀ for a left projection). HMT's randomized SVD
(`rankwise.linalg.randomized_svd`) orthonormalises after *every* product, so half of its QRs
are of (m, l) blocks on the large side, plus a QR and SVD for the two-sided factors; on SmolLM2
shapes at rank d/4 those factorisations, not the products, are most of its time (profiled in
benchmarks/optim.py). Here each power step is the pair ``Z <- orth(Aᵀ (A Z))`` (two GEMMs and
one QR of an (n, l) block, as in PowerSGD and fbpca's every-other-product normalisation), and
the final Rayleigh-Ritz step diagonalises the l x l Gram ``(A Z)ᵀ(A Z)``:

    Z_0 = [start | Gaussian]          (n, l), l = r + oversample
    repeat q times: Z = orth(Aᵀ A Z)   (HMT Alg. 4.3 with the pair as one step)
    (A Z)ᵀ(A Z) = E diag(λ) Eᵀ;  V = Z E[:, top r]   (Ritz vectors, λ = σ² estimates)

A warm start (``start`` = the previous subspace) is subspace iteration continued across
refreshes: the gradient's leading subspace moves slowly between GaLore refreshes (GaLore §4.2),
so one step from the old basis already aligns as well as two from a Gaussian (tested in
tests/optim/test_optim_projector.py).

Squaring the spectrum per step costs accuracy only on directions with σ_i / σ_1 below about
sqrt(fp32 eps) ~ 3e-4, which are far outside the leading r of a gradient.
"""

from __future__ import annotations

import torch

from rankwise.linalg.random import make_generator
from rankwise.linalg.svd import default_oversample, orthonormalize
from rankwise.linalg.whiten import eigh


def _gaussian(n: int, k: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    gen = make_generator(int(seed))
    return torch.randn(k, n, generator=gen, dtype=torch.float32).to(like)


def top_right_subspace(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    power_iters: int = 2,
    start: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Orthonormal rows (rank, n) spanning A's leading right singular subspace, in fp32.

    Args:
        A: (m, n) matrix (fp32 is used for the computation).
        rank: r, 1 <= r <= n.
        oversample: extra columns p (None: `default_oversample`), l = r + p
            capped at n.
        power_iters: q >= 1 steps Z <- orth(AᵀAZ).
        start: optional (k, n) rows (k <= l) that seed the first k columns of Z_0, e.g. the
            previous refresh's basis; the rest are Gaussian (drawn from `seed`).
        seed: seed of the Gaussian columns.

    Returns:
        V (r, n): orthonormal rows, ordered by decreasing Ritz value (estimated σ²).
    """
    if A.ndim != 2:
        raise ValueError(f"top_right_subspace needs a 2-D matrix, got shape {tuple(A.shape)}")
    n = A.shape[1]
    if not 1 <= rank <= n:
        raise ValueError(f"rank {rank} must be in [1, {n}] for a matrix of shape {tuple(A.shape)}")
    if power_iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {power_iters}")
    p = default_oversample(rank) if oversample is None else int(oversample)
    width = min(rank + p, n)
    X = A.float()
    if start is not None and start.shape[0] < width:
        fresh = _gaussian(n, width - start.shape[0], seed, X)
        Zt = torch.cat([start.to(X), fresh])
    elif start is not None:
        Zt = start[:width].to(X)
    else:
        Zt = _gaussian(n, width, seed, X)  # (l, n): rows are the sketch vectors
    # Products are written skinny-first ((l, ·) @ X), the faster GEMM orientation on CPU
    # (rankwise.linalg.svd module doc), and their transposes are column-major for the QR.
    for _ in range(power_iters):
        St = (Zt @ X.mT) @ X  # (l, n) = (AᵀA Z)ᵀ
        Zt = orthonormalize(St.mT).mT  # (l, n), orthonormal rows
    Pt = Zt @ X.mT  # (l, m) = (A Z)ᵀ
    lam, E = eigh(Pt @ Pt.mT)  # ascending, fp64
    top = E[:, -rank:].flip(-1).to(Zt.dtype)  # (l, r), leading Ritz vectors first
    if not bool(torch.isfinite(lam[-1])):
        raise ValueError("top_right_subspace: non-finite Ritz values (NaN/inf in the matrix)")
    return (top.mT @ Zt).contiguous()  # (r, n)
