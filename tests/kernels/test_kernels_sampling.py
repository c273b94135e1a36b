"""Leverage scores, l_p Lewis weights, row sampling and sampled regression (Lewis weights by the
Cohen-Peng iteration, 2015)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rankwise.linalg.sampling import (
    inclusion_probabilities,
    leverage_scores,
    lewis_weights,
    lp_regression,
    sample_rows,
    sampled_regression,
    select_calibration_tokens,
    weighted_gram,
)


def _student(n: int, d: int, seed: int, df: float = 2.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample((n, d)).double()


def test_leverage_qr_svd_agree_and_sum_to_rank():
    A = _student(500, 8, 0)
    tau = leverage_scores(A)
    assert torch.allclose(tau, leverage_scores(A, method="svd"), atol=1e-10)
    assert math.isclose(float(tau.sum()), 8, rel_tol=1e-10)
    deficient = torch.cat([A[:, :5], A[:, :3] @ torch.randn(3, 3, dtype=torch.float64)], 1)  # rank 5
    assert math.isclose(float(leverage_scores(deficient).sum()), 5, rel_tol=1e-8)


def test_leverage_closed_forms():
    c = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)[:, None]
    assert torch.allclose(leverage_scores(c), c[:, 0] ** 2 / (c**2).sum())  # one column: c_i^2 / sum c^2
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(leverage_scores(torch.cat([eye, eye, eye])), torch.full((12,), 1 / 3, dtype=torch.float64))
    A = _student(50, 4, 1)
    lam = 0.3 * float(A.square().sum()) / 4
    closed = torch.einsum("ij,jk,ik->i", A, torch.linalg.inv(A.T @ A + lam * torch.eye(4, dtype=torch.float64)), A)
    assert torch.allclose(leverage_scores(A, ridge=0.3), closed, atol=1e-12)


def test_sketched_leverage_is_close():
    A = _student(20000, 20, 2)
    tau = leverage_scores(A)
    rel = ((leverage_scores(A, method="sketch", seed=3) - tau) / tau).abs()
    assert float(rel.quantile(0.95)) < 0.2
    assert math.isclose(float(leverage_scores(A, method="sketch").sum()), 20, rel_tol=0.1)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_lewis_weights_closed_form_one_column(p):
    # One column c: the fixed point is w_i = |c_i|^p / sum_j |c_j|^p (also the l_p sensitivity).
    c = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0], dtype=torch.float64)[:, None]
    w = lewis_weights(c, p)
    assert torch.allclose(w, c[:, 0].abs() ** p / (c.abs() ** p).sum(), atol=1e-9)


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_lewis_weights_satisfy_their_fixed_point(p):
    A = _student(300, 5, 4)
    w = lewis_weights(A, p)
    inv = torch.linalg.inv(A.T @ (w.pow(1 - 2 / p)[:, None] * A))
    rhs = torch.einsum("ij,jk,ik->i", A, inv, A).pow(p / 2)
    assert torch.allclose(w, rhs, rtol=1e-7)
    assert math.isclose(float(w.sum()), 5, rel_tol=1e-7)
    assert torch.allclose(lewis_weights(A, 2.0), leverage_scores(A), atol=1e-12)


def _l1_sensitivities(A: torch.Tensor) -> torch.Tensor:
    """Exact l1 sensitivities for d = 3: min ||Ax||_1 s.t. a_i^T x = 1 is attained at a vertex where
    two other rows vanish (A full rank makes the objective coercive), so enumerate all pairs."""
    n, d = A.shape
    assert d == 3
    out = torch.empty(n, dtype=A.dtype)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        pairs = torch.tensor(list(itertools.combinations(others, 2)))
        systems = torch.stack([A[i].expand(len(pairs), 3), A[pairs[:, 0]], A[pairs[:, 1]]], 1)
        ok = torch.linalg.det(systems).abs() > 1e-9
        rhs = torch.tensor([1.0, 0.0, 0.0], dtype=A.dtype).expand(int(ok.sum()), 3)
        x = torch.linalg.solve(systems[ok], rhs)
        out[i] = 1.0 / (x @ A.T).abs().sum(1).min()
    return out


def test_l1_sensitivities_bounded_by_lewis_weights():
    # Card test 3: n = 60, d = 3: sum s <= d and s_i <= w_i (l1 Lewis weights upper-bound sensitivities).
    A = _student(60, 3, 5)
    s, w = _l1_sensitivities(A), lewis_weights(A, 1.0)
    assert float(s.sum()) <= 3 + 1e-9
    assert bool((s <= w * (1 + 1e-6)).all())
    assert float(s.max()) > 0.1  # the heavy-tailed rows are genuinely sensitive


def test_leverage_sampling_is_a_subspace_embedding():
    # Card test 2: n = 20000, d = 20, Student-t(2) rows, m = 2000 expected samples: sigma(S Q) in 1 +- 0.1.
    A = _student(20000, 20, 6)
    Q = torch.linalg.qr(A).Q
    tau = leverage_scores(A)
    for seed in range(5):
        idx, w = sample_rows(tau, 2000, seed=seed)
        S = torch.linalg.svdvals(Q[idx] * w[:, None])
        assert float((S - 1).abs().max()) < 0.1


def test_sampled_least_squares_is_one_plus_eps_optimal():
    A = _student(20000, 20, 7)
    torch.manual_seed(8)
    b = A @ torch.randn(20, dtype=torch.float64) + torch.distributions.StudentT(1.5).sample((20000,)).double()
    best = float((A @ lp_regression(A, b) - b).square().sum())
    ratios = {sc: [float((A @ sampled_regression(A, b, 400, scores=sc, seed=s)[0] - b).square().sum()) / best
                   for s in range(10)] for sc in ("leverage", "uniform")}
    assert sum(r <= 1.1 for r in ratios["leverage"]) >= 9  # (1 + eps)-optimal w.h.p.
    assert max(ratios["uniform"]) > 1.1  # uniform sampling at the same size is not (the coherent case)


def test_sampled_l1_regression_with_lewis_weights():
    # Card test 4: l1 regression on heavy-tailed data, m ~ 20 d log d samples.
    A = _student(5000, 10, 9)
    torch.manual_seed(10)
    b = A @ torch.randn(10, dtype=torch.float64) + torch.distributions.Cauchy(0.0, 1.0).sample((5000,)).double()
    best = float((A @ lp_regression(A, b, p=1) - b).abs().sum())
    m = int(20 * 10 * math.log(10))
    ratios = [float((A @ sampled_regression(A, b, m, p=1, seed=s)[0] - b).abs().sum()) / best for s in range(10)]
    assert min(ratios) >= 1 - 1e-6  # nothing beats the optimum: the full IRLS solve is accurate
    assert sum(r <= 1.1 for r in ratios) >= 9


def test_inclusion_probabilities_water_fill_and_systematic_sampling():
    q = inclusion_probabilities(torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0]), 3)
    assert torch.allclose(q, torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    scores = torch.tensor([5.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.0, 2.0])
    q = inclusion_probabilities(scores, 4)
    assert math.isclose(float(q.sum()), 4) and float(q.max()) <= 1
    hits = torch.zeros(8, dtype=torch.float64)
    for seed in range(3000):
        idx, w = sample_rows(scores, 4, mode="systematic", seed=seed)
        assert idx.numel() == 4 and idx.unique().numel() == 4
        assert torch.allclose(w, q[idx].rsqrt())
        hits[idx] += 1
    assert torch.allclose(hits / 3000, q, atol=0.03)  # exact inclusion probabilities


def test_weighted_gram_is_unbiased():
    X = _student(200, 4, 11)
    scores = leverage_scores(X)
    mean = sum(weighted_gram(X, *sample_rows(scores, 40, seed=s)) for s in range(2000)) / 2000
    G = X.T @ X
    assert float((mean - G).norm() / G.norm()) < 0.05


def test_select_calibration_tokens_keeps_outlier_tokens():
    # Massive-activation tokens (a few rows with a huge private direction) have leverage ~ 1:
    # leverage sampling keeps them surely, uniform sampling mostly misses them and its Gram is off.
    torch.manual_seed(12)
    X = torch.randn(4000, 16, dtype=torch.float64)
    X[:6, 0] = 200.0
    G = X.T @ X
    Linv = torch.linalg.inv(torch.linalg.cholesky(G))
    errs = {"leverage": [], "uniform": []}
    for method in errs:
        for seed in range(10):
            idx, w = select_calibration_tokens(X, 120, method=method, seed=seed)
            assert idx.numel() == 120 and bool((idx[1:] > idx[:-1]).all())
            if method == "leverage":
                assert set(range(6)) <= set(idx.tolist())
            else:
                assert torch.allclose(w, w[0].expand_as(w))
            Gs = weighted_gram(X, idx, w)
            errs[method].append(float(torch.linalg.matrix_norm(Linv @ Gs @ Linv.T - torch.eye(16), ord=2)))
    assert max(errs["leverage"]) < 0.9 < min(errs["uniform"])  # uniform: outlier direction lost (~1) or blown up
    idx, _ = select_calibration_tokens([X, X[:, :8]], 50, method="lewis", p=1.0, seed=0)
    assert idx.numel() == 50


def test_sampling_errors_are_clear():
    with pytest.raises(ValueError, match="exceeds the"):
        select_calibration_tokens(torch.randn(10, 3), 11)
    with pytest.raises(ValueError, match="method must be"):
        select_calibration_tokens(torch.randn(10, 3), 5, method="random")
    with pytest.raises(ValueError, match="p must lie in"):
        lewis_weights(torch.randn(10, 3), 5.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        inclusion_probabilities(torch.tensor([1.0, -1.0]), 1)
    with pytest.raises(ValueError, match="NaN"):
        leverage_scores(torch.tensor([[1.0], [float("nan")]]))
