"""rankwise.linalg.lu: A = (L U)[perm] with unit-lower L, equal to torch.linalg.lu's P L U."""

from __future__ import annotations

import pytest
import torch

from rankwise.linalg.lu import lu


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (4, 9)])
def test_factors_reproduce_a_and_match_torch(shape):
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    perm, L, U = lu(A)
    k = min(shape)
    assert L.shape == (shape[0], k) and U.shape == (k, shape[1])
    torch.testing.assert_close((L @ U)[perm], A, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.sort(perm).values, torch.arange(shape[0]))  # a permutation
    torch.testing.assert_close(torch.diagonal(L), torch.ones(k, dtype=A.dtype))
    assert torch.all(torch.triu(L, 1) == 0) and torch.all(torch.tril(U, -1) == 0)
    P, L_ref, U_ref = torch.linalg.lu(A)
    torch.testing.assert_close(L, L_ref, rtol=0, atol=0)
    torch.testing.assert_close(U, U_ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.eye(shape[0], dtype=A.dtype)[perm], P, rtol=0, atol=0)


def test_rank_deficient_input_factors_and_fp32_is_the_compute_dtype():
    A = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    A[:, 0] = 0  # first pivot is exactly zero
    perm, L, U = lu(A.half())
    assert L.dtype == torch.float32 and U[0, 0] == 0
    torch.testing.assert_close((L @ U)[perm], A.half().float(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="NaN"):
        lu(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="2-D"):
        lu(torch.zeros(2, 2, 2))
