"""Singular value decompositions: exact, truncated and randomized (Halko, Martinsson, Tropp 2011).

Dtype policy (`rankwise.linalg.compute_dtype`): every function here computes in fp32 at least. float16/bfloat16
inputs are upcast to fp32, fp32 stays fp32, fp64 stays fp64, and the results are returned in that
*compute* dtype; callers cast factors back to the model dtype themselves (so that a bf16 weight
is never factorised in bf16 by accident).

Shapes: A (..., m, n) -> U (..., m, r), S (..., r), Vh (..., r, n); leading dims are a batch.

Randomized SVD (HMT Algorithm 4.4 + 5.1, "randomized subspace iteration"), with l = rank + p:
    Y = A Omega, Q = orth(Y)                        Omega (n, l) Gaussian
    repeat q times: Z = orth(A^T Q); Q = orth(A Z)  QR after every product (HMT §4.5)
    B = Q^T A;  B = U_B S V^T;  U = Q U_B           keep the top `rank` triplets
It runs on the tall orientation (A^T when m < n), so the final small SVD is over min(m, n)
columns. Two implementation choices make it faster than torch.svd_lowrank at the same sketch
(measured on CPU, fp32; see benchmarks/linalg.py):
- every product is formed as (skinny)^T @ A or (skinny)^T @ A^T, which BLAS runs 10-35 % faster
  than A @ Z / A^T @ Q, and whose output already has the column-major layout QR wants;
- the SVD of the wide l x n matrix B goes through a QR of B^T (n, l) and an SVD of the l x l
  factor, 2-3.5x cheaper than LAPACK's SVD of B itself at l >= 64.

Defaults (chosen with the defaults study of benchmarks/linalg.py, 2048 x 2048, fp32):
- power_iters = 2 (HMT's recommendation for slowly decaying spectra): q = 1 leaves 3.5-8x more excess error
  over the optimal rank-r error; q = 3 cuts it 2-6x more but costs 25-35 % more time.
- oversample = max(10, ceil(rank / 8)): with a fixed p = 10 the excess error grows with the rank
  (the HMT bound scales with rank / (p - 1)) and passes 1 % near rank 128-256; p = rank / 8 keeps
  it under 1 % (0.8 % worst) up to rank 256 on 1/j and 1/j^2 spectra, for 8-11 % more time at
  rank 256 and none at rank <= 80 (where p = 10 anyway). Net of the two speed-ups above it is
  still 1.0-1.6x faster than torch.svd_lowrank(q = r + 10, niter = 2) at equal or lower error.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from rankwise.linalg._checks import (
    compute_dtype,
    raise_if_nonfinite,
    validate_int,
    validate_matrix,
    validate_rank,
)
from rankwise.linalg.random import Seed, make_generator

__all__ = [
    "default_oversample",
    "low_rank_approx",
    "make_generator",
    "orthonormalize",
    "randomized_svd",
    "split_factors",
    "svd",
    "svdvals",
    "truncated_svd",
]


def svd(A: torch.Tensor, full_matrices: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD A = U diag(S) Vh in the compute dtype (fp32, or fp64 for fp64 input).

    Args:
        A: (..., m, n) real floating tensor, finite.
        full_matrices: as torch.linalg.svd (False: k = min(m, n) columns).

    Returns:
        U (..., m, k), S (..., k) descending, Vh (..., k, n).
    """
    validate_matrix(A, "A")
    X = A.to(compute_dtype(A.dtype))
    return torch.linalg.svd(X, full_matrices=full_matrices)


def svdvals(A: torch.Tensor) -> torch.Tensor:
    """Singular values of A (..., m, n), descending, shape (..., min(m, n)), compute dtype."""
    validate_matrix(A, "A")
    return torch.linalg.svdvals(A.to(compute_dtype(A.dtype)))


def truncated_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of A (Eckart-Young) from the exact SVD.

    Returns:
        U (..., m, r), S (..., r), Vh (..., r, n) in the compute dtype, contiguous.
    """
    validate_matrix(A, "A")
    rank = validate_rank(rank, A.shape[-2], A.shape[-1])
    U, S, Vh = svd(A)
    return U[..., :rank].contiguous(), S[..., :rank].contiguous(), Vh[..., :rank, :].contiguous()


def default_oversample(rank: int) -> int:
    """The default oversampling p of randomized_svd: max(10, ceil(rank / 8)) (see module doc)."""
    return max(10, math.ceil(rank / 8))


def _randn(shape: tuple[int, ...], gen: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Gaussian (shape) in like's dtype/device, drawn on the generator's own device."""
    if gen is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    out = torch.randn(shape, generator=gen, dtype=like.dtype, device=gen.device)
    return out.to(like.device)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (..., m, l) of the columns of Y (Householder QR, no sign fix)."""
    return torch.linalg.qr(Y).Q


def randomized_svd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    power_iters: int = 2,
    seed: Seed = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of A by randomized subspace iteration (HMT 2011, Alg. 4.4 + 5.1).

    Args:
        A: (..., m, n) real floating tensor; leading dims are a batch (one sketch each).
        rank: r, 1 <= r <= min(m, n).
        oversample: extra sketch columns p; None -> max(10, ceil(r / 8)) (module doc). The
            sketch width l = min(r + p, min(m, n)); when it covers min(m, n) the exact SVD is
            used instead (it is then no more expensive and is exact).
        power_iters: q >= 0 subspace iterations, each re-orthonormalised by QR (HMT §4.5).
        seed: None draws from torch's global RNG; an int or a torch.Generator makes the output
            reproducible (same seed, same device -> bit-identical factors).

    Returns:
        U (..., m, r) orthonormal columns, S (..., r) descending, Vh (..., r, n) orthonormal rows,
        in the compute dtype (fp32; fp64 for fp64 input), contiguous.

    Raises:
        ValueError: bad rank/oversample/power_iters, or NaN/Inf in A.
    """
    validate_matrix(A, "A", check_finite=False)  # finiteness is checked on S below (cheaper)
    m, n = A.shape[-2], A.shape[-1]
    rank = validate_rank(rank, m, n)
    p = default_oversample(rank) if oversample is None else validate_int(oversample, "oversample")
    q = validate_int(power_iters, "power_iters")
    small = min(m, n)
    width = min(rank + p, small)
    if width >= small:
        return truncated_svd(A, rank)

    gen = make_generator(seed, A.device)
    X = A.to(compute_dtype(A.dtype))
    transposed = m < n
    if transposed:
        X = X.mT  # tall (M, N), M >= N: the small SVD below is over N = min(m, n) columns
    try:
        # Every product is written as (skinny)^T @ X or (skinny)^T @ X^T: GEMMs with the skinny
        # operand on the left run 20-35 % faster than X @ Z / X^T @ Q on CPU (measured), and their
        # (l, *) row-major outputs are the column-major (*, l) layout LAPACK's QR wants (no copy).
        omega = _randn((*X.shape[:-2], X.shape[-1], width), gen, X)  # (N, l), as torch.svd_lowrank
        Q = _orth((omega.mT @ X.mT).mT)  # orth(X Omega): (M, l)
        for _ in range(q):
            Z = _orth((Q.mT @ X).mT)  # orth(X^T Q): (N, l)
            Q = _orth((Z.mT @ X.mT).mT)  # orth(X Z): (M, l)
        Qb, R = torch.linalg.qr((Q.mT @ X).mT)  # B^T = (Q^T X)^T = Qb R: Qb (N, l), R (l, l)
        Ur, S, Vrh = torch.linalg.svd(R.mT)  # B = R^T Qb^T = Ur S Vrh Qb^T
    except torch.linalg.LinAlgError:
        raise_if_nonfinite(A, "A")
        raise
    if not bool(torch.isfinite(S).all()):
        raise_if_nonfinite(A, "A")
        raise ValueError(
            "randomized_svd overflowed (non-finite singular values from a finite input): "
            "rescale A (e.g. divide by its max abs entry) or pass it in float64"
        )
    U = Q @ Ur[..., :rank]  # (M, r)
    Vh = Vrh[..., :rank, :] @ Qb.mT  # (r, N)
    S = S[..., :rank]
    if transposed:
        U, Vh = Vh.mT, U.mT
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def split_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors B = U diag(sqrt S) (..., m, r) and A = diag(sqrt S) Vh (..., r, n).

    B @ A == U diag(S) Vh. This is the storage form of the SVD-LLM and ASVD reference code:
    A is applied first, B second, and both carry the same scale.
    """
    if U.ndim < 2 or Vh.ndim < 2 or S.ndim < 1:
        raise ValueError(
            f"split_factors needs U (..., m, r), S (..., r), Vh (..., r, n); got shapes "
            f"{tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)}"
        )
    r = S.shape[-1]
    if U.shape[-1] != r or Vh.shape[-2] != r:
        raise ValueError(
            f"rank mismatch: U has {U.shape[-1]} columns, S has {r} values, Vh has {Vh.shape[-2]} rows: "
            "slice all three to the same rank"
        )
    if bool((S < 0).any()):
        raise ValueError("S has negative entries: pass singular values (>= 0), not eigenvalues")
    root = S.sqrt()
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh


def low_rank_approx(
    A: torch.Tensor,
    rank: int,
    method: Literal["exact", "randomized"] = "exact",
    **randomized_kwargs: object,
) -> torch.Tensor:
    """The rank-`rank` approximation U_r diag(S_r) Vh_r of A, as a dense tensor in A's dtype.

    Args:
        A: (..., m, n).
        rank: r.
        method: "exact" (truncated SVD, optimal) or "randomized" (randomized_svd; extra keyword
            arguments such as seed, oversample, power_iters are passed on).
    """
    if method == "exact":
        if randomized_kwargs:
            raise TypeError(f"method='exact' takes no extra arguments, got {sorted(randomized_kwargs)}")
        U, S, Vh = truncated_svd(A, rank)
    elif method == "randomized":
        U, S, Vh = randomized_svd(A, rank, **randomized_kwargs)  # type: ignore[arg-type]
    else:
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    return ((U * S.unsqueeze(-2)) @ Vh).to(A.dtype)


def orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis Q (..., m, k) of the columns of Y (..., m, k), k <= m.

    Reduced Householder QR with a sign fix (diag(R) >= 0), so Q is unique for full-rank Y and a
    Gaussian Y gives a Haar-distributed Q. Compute dtype (fp32, or fp64 for fp64 input).
    """
    validate_matrix(Y, "Y")
    if Y.shape[-1] > Y.shape[-2]:
        raise ValueError(
            f"cannot orthonormalize {Y.shape[-1]} columns in dimension {Y.shape[-2]} "
            f"(shape {tuple(Y.shape)}): pass at most m columns"
        )
    Q, R = torch.linalg.qr(Y.to(compute_dtype(Y.dtype)))
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)
