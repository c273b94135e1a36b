"""EoRA: error identity, exactness at full rank, beats plain SVD of the error, PEFT export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.compress.eora import CompensatedLinear, compensate, compressed_weight, eora_factors


def _problem(m=24, n=40, N=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    X = torch.randn(N, n, generator=g, dtype=torch.float64) @ mix
    X[:, :3] *= 30.0
    return W, X


def test_error_identity_with_mean_covariance():
    W, X = _problem()
    Wc = compressed_weight(W, "int4", block_size=8).to(torch.float64)
    delta = W - Wc
    N = X.shape[0]
    cov = X.T @ X / N
    B, A = eora_factors(delta, cov, 6)
    err = ((delta - B @ A) @ X.T).pow(2).sum()
    lam, Q = torch.linalg.eigh(cov)
    S = torch.linalg.svdvals(delta @ (Q * lam.sqrt()))
    torch.testing.assert_close(err, N * S[6:].pow(2).sum(), rtol=1e-8, atol=0)
    B2, A2 = eora_factors(delta, 50.0 * cov, 6)  # any scale of the covariance
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["int8", "int4", "2:4"])
def test_full_rank_restores_the_weight(kind):
    W, X = _problem()
    Wc = compressed_weight(W, kind, gram=X.T @ X, block_size=8).to(torch.float64)
    assert not torch.equal(Wc, W)
    B, A = eora_factors(W - Wc, X.T @ X, min(W.shape))
    torch.testing.assert_close(Wc + B @ A, W, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kind", ["int4", "2:4"])
def test_eora_beats_plain_svd_of_the_error_at_equal_rank(kind):
    for seed in range(5):
        W, X = _problem(seed=seed)
        X_cal = X[:200]
        Wc = compressed_weight(W, kind, gram=X_cal.T @ X_cal, block_size=8).to(torch.float64)
        delta = W - Wc
        B, A = eora_factors(delta, X_cal.T @ X_cal, 5)
        U, S, Vh = torch.linalg.svd(delta)
        plain = (U[:, :5] * S[:5]) @ Vh[:5]
        err = lambda D, Xs, delta=delta: float(((delta - D) @ Xs.T).pow(2).sum())  # noqa: E731
        assert err(B @ A, X_cal) < err(plain, X_cal)
        assert err(B @ A, X_cal) < err(torch.zeros_like(delta), X_cal)


def test_two_four_pattern_and_quantised_grid():
    W, X = _problem(m=8, n=16)
    pruned = compressed_weight(W, "2:4", gram=X.T @ X)
    assert ((pruned.reshape(8, 4, 4) != 0).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        compressed_weight(torch.randn(4, 6), "2:4")
    with pytest.raises(ValueError, match="unknown compression"):
        compressed_weight(W, "int3")


def test_compensated_layer_forward_and_compensate():
    W, X = _problem(m=12, n=16)
    dense = nn.Linear(16, 12, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(W)
    base = nn.Linear(16, 12, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(compressed_weight(W, "int4", block_size=8))
        base.bias.copy_(dense.bias)
    comp = compensate(dense, base, X.T @ X, 12)  # full rank: exact
    assert isinstance(comp, CompensatedLinear) and comp.rank == 12
    torch.testing.assert_close(comp(X), dense(X), rtol=1e-7, atol=1e-7)


def test_eora_on_a_whitened_svd_residual_equals_whitened_svd_at_the_summed_rank():
    """Why the shrink pipeline never keeps EoRA after SVD-LLM at a fixed budget: a rank-(r-k)
    whitened SVD (Cholesky whitening, SVD-LLM) plus rank-k EoRA on its error (eigen whitening of
    the same Gram) is the rank-r whitened SVD itself, with the same r (m + n) parameters: both
    stages are Eckart-Young in the same norm ||(W - W') X||_F."""
    from rankwise.compress.base import InputStats
    from rankwise.compress.svd import SVDConfig, build_whitening, whitened_factors

    W, X = _problem()
    gram = X.T @ X
    chol = build_whitening(SVDConfig(whitener="cholesky"), InputStats(gram=gram, n_tokens=X.shape[0]), W)
    r, k = 10, 4
    B1, A1 = whitened_factors(W, r - k, chol)
    B2, A2 = eora_factors(W - B1 @ A1, gram, k)
    Br, Ar = whitened_factors(W, r, chol)
    torch.testing.assert_close(B1 @ A1 + B2 @ A2, Br @ Ar, rtol=1e-7, atol=1e-8)
    assert (B1.shape[1] + B2.shape[1]) * sum(W.shape) == Br.shape[1] * sum(W.shape)
