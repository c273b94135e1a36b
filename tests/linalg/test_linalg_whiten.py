"""Cholesky / eigh whiteners and SVD-LLM's truncation-aware property (SVD-LLM, Wang et al. 2024:
the loss of truncating the whitened SVD equals the discarded singular values)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import (
    cholesky,
    cholesky_whitener,
    eigh,
    eigh_whitener,
    inverse_lower,
    solve_lower_right,
    svd,
    symmetrize_,
    truncated_svd,
)

PROPS = settings(max_examples=25, deadline=None)


def _gram(n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(n, tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X, X @ X.mT


@PROPS
@given(n=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_cholesky_reconstructs_gram(n: int, seed: int) -> None:
    _, G = _gram(n, 3 * n + 2, seed)
    L = cholesky_whitener(G.float())  # fp32 input is factored in fp64
    assert L.dtype == torch.float64
    assert torch.equal(L, L.tril())
    torch.testing.assert_close(L @ L.mT, G.float().double(), rtol=1e-10, atol=1e-10 * G.diagonal().mean())
    torch.testing.assert_close(inverse_lower(L) @ L, torch.eye(n, dtype=torch.float64), atol=1e-8, rtol=0)


def test_jitter_fallback_on_singular_psd_gram() -> None:
    X, G = _gram(16, 5, 0)  # rank 5 < 16: positive semi-definite, singular
    assert bool(torch.linalg.cholesky_ex(G).info != 0)
    L = cholesky(G)
    residual = (L @ L.mT - G).abs().max()
    assert residual <= 1e-3 * G.diagonal().mean()  # only a small relative jitter was added
    # the whitened inputs L^{-1} X are still (nearly) orthonormal where X has energy
    assert torch.isfinite(inverse_lower(L)).all()


def test_not_psd_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not positive semi-definite"):
        cholesky(-torch.eye(4), max_tries=3)


@PROPS
@given(n=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_eigh_and_symmetric_whitener(n: int, seed: int) -> None:
    _, G = _gram(n, 2 * n + 1, seed)
    lam, V = eigh(G)
    assert bool((lam[1:] >= lam[:-1]).all())
    torch.testing.assert_close((V * lam) @ V.mT, G)
    W, W_inv = eigh_whitener(G, eps=0.0)
    torch.testing.assert_close(W @ W.mT, G)
    torch.testing.assert_close(W, W.mT)
    torch.testing.assert_close(W @ W_inv, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)


def test_eigh_whitener_clamps_a_singular_gram() -> None:
    _, G = _gram(12, 4, 1)
    W, W_inv = eigh_whitener(G, eps=1e-6)
    assert torch.isfinite(W_inv).all()
    lam = torch.linalg.eigvalsh(W @ W.mT)
    assert lam.min() >= 1e-6 * lam.max() * (1 - 1e-6)
    torch.testing.assert_close(W @ W.mT, G, atol=2e-6 * float(lam.max()), rtol=0)


def _svd_llm(W: torch.Tensor, G: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented SVD-LLM usage: SVD of W L, truncate, W' = U_r S_r V_r^T L^{-1}."""
    L = cholesky_whitener(G)
    U, S, Vh = svd(W @ L)
    W_r = (U[:, :r] * S[:r]) @ Vh[:r] @ inverse_lower(L)
    return W_r, S


@PROPS
@given(m=st.integers(2, 12), n=st.integers(2, 12), seed=st.integers(0, 2**16), data=st.data())
def test_svd_llm_truncation_identity(m: int, n: int, seed: int, data: st.DataObject) -> None:
    """Card test 1: ||(W - W')X||_F^2 = sum_{i>r} sigma_i(W L)^2 (fp64, rel. 1e-8), N > n."""
    r = data.draw(st.integers(1, min(m, n)))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, 3 * n, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    W_r, S = _svd_llm(W, X @ X.mT, r)
    loss = torch.linalg.matrix_norm((W - W_r) @ X) ** 2
    torch.testing.assert_close(loss, (S[r:] ** 2).sum(), rtol=1e-8, atol=1e-10 * float((S**2).sum()))


def test_svd_llm_beats_plain_svd_and_is_scale_free() -> None:
    """Card tests 2-3: lower calibration loss than the plain truncated SVD of W; G -> c G leaves W'
    unchanged."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 16, generator=g, dtype=torch.float64)
    X = torch.randn(16, 64, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 16, dtype=torch.float64)[:, None]
    G = X @ X.mT
    W_r, _ = _svd_llm(W, G, 5)
    U, S, Vh = truncated_svd(W, 5)
    plain = torch.linalg.matrix_norm((W - (U * S) @ Vh) @ X)
    ours = torch.linalg.matrix_norm((W - W_r) @ X)
    assert ours < plain
    torch.testing.assert_close(_svd_llm(W, 7.5 * G, 5)[0], W_r)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: cholesky_whitener(torch.randn(4, 5)), "must be square"),
        (lambda: eigh(torch.randn(4, 5)), "must be square"),
        (lambda: cholesky(torch.full((3, 3), float("nan"))), "NaN"),
        (lambda: eigh_whitener(torch.eye(3), eps=2.0), "eps"),
        (lambda: inverse_lower(torch.zeros(3, 3)), "zero on its diagonal"),
    ],
)
def test_whiten_errors(call, match: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("n,block", [(1, 1), (7, 3), (16, 16), (33, 4)])
def test_symmetrize_in_place_equals_the_average_with_the_transpose(n: int, block: int) -> None:
    """Blockwise in place gives exactly (S + S^T) / 2, in the same storage."""
    S = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = (S + S.mT) / 2
    ptr = S.data_ptr()
    out = symmetrize_(S, block=block)
    assert out.data_ptr() == ptr
    assert torch.equal(out, expected)
    assert torch.equal(out, out.mT)


def test_symmetrize_refuses_what_it_cannot_do_in_place() -> None:
    with pytest.raises(ValueError, match="fp64"):
        symmetrize_(torch.eye(3))


@pytest.mark.parametrize("transpose", [False, True])
def test_solve_lower_right_equals_the_product_with_the_inverse(transpose: bool) -> None:
    """X L^-1 (X L^-T) by triangular solve equals X times the explicit inverse."""
    _, G = _gram(12, 40, seed=3)
    L = cholesky(G)
    X = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inv = inverse_lower(L)
    expected = X @ (inv.mT if transpose else inv)
    torch.testing.assert_close(solve_lower_right(X, L, transpose=transpose), expected, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="columns"):
        solve_lower_right(X[:, :4], L)


def test_cholesky_without_symmetrize_reads_the_lower_triangle_only() -> None:
    """symmetrize=False factors S as given (no copy): an upper triangle of garbage is ignored."""
    _, G = _gram(9, 30, seed=5)
    messy = G.clone()
    upper = torch.triu(torch.ones_like(G), 1).bool()
    messy[upper] = 123.0
    torch.testing.assert_close(cholesky(messy, symmetrize=False), cholesky(G), atol=1e-12, rtol=0)
