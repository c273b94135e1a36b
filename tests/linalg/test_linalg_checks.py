"""rankwise.linalg.all_finite: the finiteness check every factorisation runs on its input."""

from __future__ import annotations

import pytest
import torch

from rankwise.linalg import all_finite


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_entry_anywhere(dtype: torch.dtype, bad: float) -> None:
    A = torch.randn(600, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(A)
    for index in [(0, 0), (299, 17), (599, 32)]:  # first, middle and last row chunks
        B = A.clone()
        B[index] = bad
        assert not all_finite(B)
        assert all_finite(B) == bool(torch.isfinite(B).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_all_finite_is_not_fooled_by_a_sum_that_overflows(dtype: torch.dtype) -> None:
    """Finite entries whose sum overflows are finite: the exact check decides."""
    A = torch.full((700, 4), torch.finfo(dtype).max, dtype=dtype)
    assert not torch.isfinite(A.sum(dtype=torch.float64)) or dtype != torch.float64
    assert all_finite(A)
    A[-1, -1] = float("nan")
    assert not all_finite(A)


def test_all_finite_accepts_empty_vectors_and_batches() -> None:
    assert all_finite(torch.empty(0, 5))
    assert all_finite(torch.ones(7))
    batch = torch.ones(3, 4, 5)
    batch[2, 3, 4] = float("inf")
    assert not all_finite(batch)
