"""LU factorisation with partial pivoting, the permutation kept as an index vector.

    A = P L U = (L @ U)[perm]        (P[i, perm[i]] = 1)

A (m, n), k = min(m, n): L (m, k) unit lower trapezoidal, U (k, n) upper trapezoidal, perm (m,)
int64. LoLDU (Shi et al. 2024, arXiv 2410.13618) builds its adapter from L, diag(U) and the unit-diagonal rows of U;
storing P as perm costs m integers instead of an m×m matrix. Runs in fp32 (fp64 stays fp64).
Rank-deficient matrices factor too (LAPACK continues past a zero pivot, leaving U[i, i] = 0);
callers that divide by the pivots must handle that.
"""

from __future__ import annotations

import torch

from rankwise.linalg._checks import compute_dtype, validate_matrix

__all__ = ["lu"]


def lu(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LU with partial pivoting of a 2-D matrix.

    Args:
        A: (m, n) real floating, finite.

    Returns:
        perm (m,) int64, L (m, k) with unit diagonal, U (k, n), k = min(m, n), in the compute
        dtype, such that ``A == (L @ U)[perm]`` up to rounding.
    """
    validate_matrix(A, "A", batched=False)
    X = A.to(compute_dtype(A.dtype))
    LU, pivots, _ = torch.linalg.lu_factor_ex(X)  # info > 0 only flags an exact zero pivot
    _, L, U = torch.lu_unpack(LU, pivots, unpack_pivots=False)
    # LAPACK swaps row i with row pivots[i] (1-based) in turn: A[q] = L U
    q = list(range(X.shape[0]))
    for i, p in enumerate(pivots.tolist()):
        q[i], q[p - 1] = q[p - 1], q[i]
    perm = torch.argsort(torch.tensor(q, dtype=torch.int64))  # q⁻¹: A = (L U)[perm]
    return perm.to(X.device), L, U
