"""Performer positive random features (FAVOR+), the low-rank half of Scatterbrain.

Choromanski et al., "Rethinking Attention with Performers" (ICLR'21), as used by Scatterbrain
(Chen, Dao et al. 2021): for x, y in R^d and omega ~ N(0, I_d),
    E[exp(omega^T x - |x|^2/2) exp(omega^T y - |y|^2/2)] = exp(x^T y),
so phi(x) = exp(Omega x - |x|^2/2) / sqrt(M) with M rows omega gives an unbiased, positive
estimate phi(q)^T phi(k) of exp(q^T k). Attention logits tau q^T k use q, k scaled by sqrt(tau).

Orthogonal random features: the rows of Omega are drawn in blocks of d mutually orthogonal
directions (a QR of a Gaussian block, through rankwise.linalg.orthonormalize), each row rescaled
by the norm of an independent N(0, I_d) vector, so that every single row is still exactly
N(0, I_d) (the estimator stays unbiased) while rows within a block are orthogonal (lower
variance; Performer's default `ortho_scaling=0`).

Features are returned in log scale; callers stabilise them (subtract a max) before exp.
"""

from __future__ import annotations

import torch

from rankwise.linalg import orthonormalize
from rankwise.linalg.svd import Seed, make_generator

__all__ = ["log_features", "orthogonal_gaussian"]


def orthogonal_gaussian(
    n_features: int,
    dim: int,
    *,
    heads: int | None = None,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float32,
    orthogonal: bool = True,
) -> torch.Tensor:
    """Random feature matrix Omega (M, d), or (heads, M, d) with an independent draw per head.

    Each row is marginally N(0, I_d); with `orthogonal=True` rows within blocks of d are
    orthogonal (see module docstring).
    """
    if n_features < 1 or dim < 1:
        raise ValueError(f"n_features and dim must be >= 1, got {n_features} and {dim}")
    gen = make_generator(seed)
    lead = () if heads is None else (heads,)
    if not orthogonal:
        return torch.randn(*lead, n_features, dim, generator=gen, dtype=torch.float64).to(dtype)
    blocks = []
    for start in range(0, n_features, dim):
        rows = min(dim, n_features - start)
        G = torch.randn(*lead, dim, dim, generator=gen, dtype=torch.float64)
        Q = orthonormalize(G).mT[..., :rows, :]  # (…, rows, d) orthonormal rows, Haar-distributed
        norms = torch.randn(*lead, rows, dim, generator=gen, dtype=torch.float64).norm(dim=-1)
        blocks.append(Q * norms.unsqueeze(-1))
    return torch.cat(blocks, dim=-2).to(dtype)


def log_features(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """log phi(x) + log sqrt(M) = x Omega^T - |x|^2 / 2, shape (..., n, M).

    Args:
        x: (B, H, n, d) already scaled by sqrt(tau).
        omega: (M, d) shared, or (H, M, d) per head.
    """
    proj = torch.einsum("bhnd,hmd->bhnm", x, omega) if omega.dim() == 3 else x @ omega.mT
    return proj - x.square().sum(-1, keepdim=True) / 2
