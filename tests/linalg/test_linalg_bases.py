"""DCT basis, aligned-column selection (DCT-AdamW, Modoranu et al. 2025) and Haar-random orthonormal bases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import (
    dct_basis,
    project_down,
    project_up,
    projection_side,
    random_orthonormal,
    select_aligned_columns,
)

PROPS = settings(max_examples=25, deadline=None)


def _dct2_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II of the columns of x (n, t) via one FFT (Makhoul 1980): an independent
    reference for D @ x (scipy.fft.dct(x, axis=0, norm='ortho'))."""
    n = x.shape[0]
    v = torch.cat([x[0::2], x[1::2].flip(0)])
    V = torch.fft.fft(v, dim=0)
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    y = 2 * (V * torch.exp(-1j * math.pi * k / (2 * n))).real
    f = torch.full((n, 1), math.sqrt(1 / (2 * n)), dtype=torch.float64)
    f[0] = math.sqrt(1 / (4 * n))
    return y * f


@pytest.mark.parametrize("n", [1, 2, 3, 8, 17, 64])
def test_dct_basis_orthonormal_and_matches_formula(n: int) -> None:
    D = dct_basis(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(D.mT @ D, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(D @ D.mT, eye, atol=1e-12, rtol=0)
    direct = torch.tensor(
        [
            [math.sqrt(2 / n) * (math.sqrt(0.5) if k == 0 else 1.0) * math.cos(math.pi * k * (2 * j + 1) / (2 * n))
             for j in range(n)]
            for k in range(n)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(D, direct, atol=1e-13, rtol=0)
    x = torch.randn(n, 3, dtype=torch.float64)
    torch.testing.assert_close(D @ x, _dct2_fft(x), atol=1e-12, rtol=0)


def test_dct_basis_cached_per_size_dtype_device() -> None:
    assert dct_basis(16) is dct_basis(16)
    assert dct_basis(16) is dct_basis(16, torch.float32, "cpu")
    assert dct_basis(16, torch.float64) is not dct_basis(16)
    assert dct_basis(16, torch.float64).dtype == torch.float64
    torch.testing.assert_close(dct_basis(16), dct_basis(16, torch.float64).float())


@PROPS
@given(d=st.integers(2, 7), t=st.integers(1, 5), seed=st.integers(0, 2**16), norm=st.sampled_from([1.0, 2.0]),
       data=st.data())
def test_select_aligned_columns_is_brute_force_best(d: int, t: int, seed: int, norm: float,
                                                     data: st.DataObject) -> None:
    k = data.draw(st.integers(1, d))
    basis = dct_basis(d, dtype=torch.float64)
    M = torch.randn(d, t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    idx = select_aligned_columns(basis, M, k, norm=norm)
    assert idx.dtype == torch.int64 and idx.shape == (k,) and len(set(idx.tolist())) == k

    def score(j: int) -> float:
        return float(torch.linalg.vector_norm(basis[:, j] @ M, ord=norm))

    best = max(itertools.combinations(range(d), k), key=lambda c: sum(score(j) for j in c))
    assert sum(score(j) for j in idx.tolist()) >= sum(score(j) for j in best) - 1e-12
    scores = [score(j) for j in idx.tolist()]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (16, 16)])
def test_planted_dct_subspace_is_found(shape: tuple[int, int]) -> None:
    """Card test 2: G built from columns S of the basis on the projected side -> S is selected and
    back(proj(G)) = G."""
    m, n = shape
    side = projection_side(shape)
    d = m if side == "left" else n
    Q = dct_basis(d, dtype=torch.float64)
    S = torch.tensor([1, 4, 6])
    C = torch.randn(3, n if side == "left" else m, dtype=torch.float64)
    G = Q[:, S] @ C if side == "left" else (Q[:, S] @ C).mT  # (m, n)
    M = G if side == "left" else G.mT
    idx, R = select_aligned_columns(Q, M, 3, return_projection=True)
    assert set(idx.tolist()) == set(S.tolist())
    torch.testing.assert_close(R, Q[:, idx].mT @ M)
    P = Q[:, idx]
    torch.testing.assert_close(project_up(project_down(G, P, side), P, side), G)


def test_select_errors() -> None:
    D = dct_basis(8)
    with pytest.raises(ValueError, match="pass M = G.mT"):
        select_aligned_columns(D, torch.randn(5, 8), 2)
    with pytest.raises(ValueError, match="exceeds the 8 basis columns"):
        select_aligned_columns(D, torch.randn(8, 5), 9)
    with pytest.raises(ValueError, match="NaN"):
        select_aligned_columns(D, torch.full((8, 2), float("nan")), 2)


@PROPS
@given(n=st.integers(1, 40), seed=st.integers(0, 2**16), data=st.data())
def test_random_orthonormal(n: int, seed: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, n))
    Q = random_orthonormal(n, k, seed=seed, dtype=torch.float64)
    assert Q.shape == (n, k)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(Q, random_orthonormal(n, k, seed=seed, dtype=torch.float64))
    torch.testing.assert_close(random_orthonormal(n, k, seed=seed), Q.float())  # dtype-independent draw


def test_random_orthonormal_is_haar_like() -> None:
    """Sanity check of the Haar law: columns uniform on the sphere, so E[Q] = 0 and E[Q_ij^2] = 1/n."""
    n, draws = 6, 4000
    Qs = torch.stack([random_orthonormal(n, 2, seed=s, dtype=torch.float64) for s in range(draws)])
    assert Qs.mean(0).abs().max() < 4 / math.sqrt(draws * n)
    torch.testing.assert_close(Qs.pow(2).mean(0), torch.full((n, 2), 1 / n, dtype=torch.float64),
                               atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="k <= n"):
        random_orthonormal(3, 4)
