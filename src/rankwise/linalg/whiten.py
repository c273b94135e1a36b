"""Symmetric factorisations for whitening: Cholesky with jitter, eigh, and the two whiteners.

All of it runs in fp64 (the dtype policy of rankwise.linalg) and returns fp64: Grams of activations are badly
conditioned and the triangular inverse amplifies fp32 rounding. Callers cast the final factors.

SVD-LLM usage (Wang et al. 2024, "SVD-LLM: Truncation-aware singular value decomposition for
large language model compression"): accumulate G = X X^T (n, n) over calibration
inputs X (n, N) of a linear W (m, n); factor G = L L^T (L = cholesky_whitener(G), lower); take the
SVD of W L = U S V^T; truncate to rank r; the compressed weight is W' = U_r S_r V_r^T L^{-1}, stored
as B = U_r S_r^{1/2} (m, r) and A = S_r^{1/2} V_r^T L^{-1} (r, n) (use inverse_lower(L)). Because
L^{-1} X has orthonormal rows (L^{-1} X X^T L^{-T} = I), the calibration loss is exactly
||(W - W') X||_F^2 = sum_{i>r} S_i^2: each dropped singular value costs its own square.
For a singular Gram (fewer tokens than features) either let `cholesky` add jitter, or use
`eigh_whitener(G, eps)`: W_half = G^{1/2} (symmetric square root, eigenvalues clamped at
eps * max eigenvalue) plays the role of L and W_half_inv that of L^{-1}.
"""

from __future__ import annotations

import logging

import torch

from rankwise.linalg._checks import validate_fraction, validate_int, validate_square

__all__ = [
    "cholesky",
    "cholesky_whitener",
    "eigh",
    "eigh_whitener",
    "inverse_lower",
    "solve_lower_right",
    "symmetrize_",
]

logger = logging.getLogger(__name__)


def _symmetric64(S: torch.Tensor, name: str) -> torch.Tensor:
    """S in fp64, symmetrised as (S + S^T) / 2 (accumulated Grams drift off symmetry)."""
    validate_square(S, name)
    S = S.to(torch.float64)
    return (S + S.mT) / 2


def symmetrize_(S: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Replace a square fp64 S (n, n) by (S + S^T) / 2 in place, `block` rows at a time; returns S.

    Same numbers as `(S + S.mT) / 2` elementwise, but the scratch is (block, n) instead of a
    second (n, n) matrix (an n = 5632 Gram is 254 MB): a pair already averaged by an earlier
    block reads back equal halves and stays as it is.
    """
    validate_square(S, "S")
    if S.dtype != torch.float64 or S.dim() != 2:
        raise ValueError(f"symmetrize_ works on one fp64 (n, n) matrix in place, got {S.dtype} {tuple(S.shape)}")
    block = validate_int(block, "block", minimum=1)
    for i in range(0, S.shape[0], block):
        rows = slice(i, i + block)
        avg = S[rows, :].add(S[:, rows].mT).mul_(0.5)
        S[rows, :] = avg
        S[:, rows] = avg.mT
    return S


def cholesky(
    S: torch.Tensor,
    *,
    jitter: float = 1e-10,
    max_tries: int = 8,
    growth: float = 10.0,
    symmetrize: bool = True,
) -> torch.Tensor:
    """Lower Cholesky factor L (..., n, n) of a symmetric PSD S = L L^T, in fp64.

    If S is not numerically positive definite, retries with S + j * mean(diag S) * I for
    j = jitter, jitter * growth, ... (max_tries attempts after the plain one); the jitter is
    relative to the mean diagonal so it does not depend on the scale of the Gram. SVD-LLM instead
    adds (-lambda_min + 1e-6) I; both make a singular Gram factorable with a tiny bias.

    `symmetrize=False` factors an fp64 S as given (LAPACK reads its lower triangle) without the
    symmetrised copy: for a caller that already ran `symmetrize_` and counts (n, n) matrices.

    Raises:
        ValueError: S not square/finite, or still not factorable after the last jitter (then S
            is not PSD: check how it was accumulated, or use eigh_whitener).
    """
    jitter = validate_fraction(jitter, "jitter", low=0.0, high=1.0, high_open=False)
    max_tries = validate_int(max_tries, "max_tries", minimum=0)
    if symmetrize or S.dtype != torch.float64:
        S64 = _symmetric64(S, "S")
    else:
        validate_square(S, "S")
        S64 = S
    L, info = torch.linalg.cholesky_ex(S64)
    if not bool(info.any()):
        return L
    scale = torch.diagonal(S64, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    j = jitter
    for _ in range(max_tries):
        shifted = S64.clone()
        torch.diagonal(shifted, dim1=-2, dim2=-1).add_((j * scale)[..., None])
        L, info = torch.linalg.cholesky_ex(shifted)
        if not bool(info.any()):
            logger.info("cholesky: added jitter %.1e x mean(diag) to a singular matrix", j)
            return L
        j *= growth
    lam_min = float(torch.linalg.eigvalsh(S64).min())
    raise ValueError(
        f"Cholesky failed even with jitter {j / growth:.1e} x mean(diag): the matrix is not positive "
        f"semi-definite (smallest eigenvalue {lam_min:.3e}). Check that it is a Gram X X^T summed in "
        "fp32/fp64, raise max_tries, or use eigh_whitener"
    )


def eigh(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric S (..., n, n) in fp64: (eigenvalues ascending, vectors)."""
    return torch.linalg.eigh(_symmetric64(S, "S"))


def cholesky_whitener(gram: torch.Tensor, **cholesky_kwargs: float) -> torch.Tensor:
    """SVD-LLM's whitener: lower L (n, n) with gram = L L^T (fp64; jitter fallback of `cholesky`).

    Scaling the Gram by c > 0 scales L by sqrt(c) and leaves the compressed weight unchanged.
    """
    return cholesky(gram, **cholesky_kwargs)  # type: ignore[arg-type]


def eigh_whitener(gram: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root whitener for a possibly singular Gram, in fp64.

    gram = V diag(lam) V^T; lam is clamped at eps * max(lam) (relative, so it is scale-free);
    returns W_half = V diag(sqrt lam) V^T (with W_half W_half^T = clamped gram) and its inverse
    W_half_inv = V diag(1 / sqrt lam) V^T. Use W_half where SVD-LLM uses L, W_half_inv for L^{-1}.
    """
    eps = validate_fraction(eps, "eps", low=0.0, high=1.0, high_open=False)
    lam, V = eigh(gram)
    top = lam.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    lam = torch.maximum(lam, eps * top)
    root = lam.sqrt()
    W = (V * root.unsqueeze(-2)) @ V.mT
    W_inv = (V / root.unsqueeze(-2)) @ V.mT
    return W, W_inv


def _check_nonsingular_lower(L: torch.Tensor) -> None:
    """Refuse a triangular factor with a zero on its diagonal (singular)."""
    if bool((torch.diagonal(L, dim1=-2, dim2=-1) == 0).any()):
        raise ValueError("L has a zero on its diagonal (singular): factor the Gram with jitter (cholesky)")


def inverse_lower(L: torch.Tensor) -> torch.Tensor:
    """L^{-1} (..., n, n) of a lower-triangular L by triangular solve, in fp64.

    Raises:
        ValueError: L not square/finite, or singular (a zero on its diagonal).
    """
    validate_square(L, "L")
    L64 = L.to(torch.float64)
    _check_nonsingular_lower(L64)
    eye = torch.eye(L64.shape[-1], dtype=torch.float64, device=L64.device).expand_as(L64)
    return torch.linalg.solve_triangular(L64, eye, upper=False)


def solve_lower_right(X: torch.Tensor, L: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """X L^{-1} (or X L^{-T} with `transpose`) for a lower-triangular L (n, n), by triangular solve.

    What SVD-LLM's unwhitening A = S^{1/2} V^T L^{-1} needs, without forming L^{-1}: the solve
    costs what the product with the inverse would, needs no (n, n) inverse and identity (two
    254 MB matrices for n = 5632), and is more accurate. fp64 in, fp64 out.
    """
    validate_square(L, "L")
    if X.shape[-1] != L.shape[-1]:
        raise ValueError(f"X has {X.shape[-1]} columns but L is {tuple(L.shape)}")
    L64 = L.to(torch.float64)
    _check_nonsingular_lower(L64)
    X64 = X.to(torch.float64)
    if transpose:  # X L^-T = (L^-1 X^T)^T
        return torch.linalg.solve_triangular(L64, X64.mT, upper=False).mT
    return torch.linalg.solve_triangular(L64, X64, upper=False, left=False)
