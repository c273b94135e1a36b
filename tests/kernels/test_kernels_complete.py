"""Matrix completion by alternating minimisation (Jain, Netrapalli &
Sanghavi, STOC 2013): exact and robust solvers."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from rankwise.linalg.complete import (
    _Side,
    _solve_exact,
    _solve_pcg,
    complete,
    observed_values,
    sparse_top_singular_vectors,
)


def _problem(m: int, n: int, k: int, n_obs: int, seed: int = 0):
    """Rank-k M = U0 V0^T with Gaussian (hence incoherent) factors and a Bernoulli mask."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(n, k, generator=g, dtype=torch.float64).T
    mask = torch.rand(m, n, generator=g) < n_obs / (m * n)
    rows, cols = mask.nonzero().unbind(1)
    return M, rows, cols, M[rows, cols]


def _rel(U, V, M):
    return float((U @ V.T - M).norm() / M.norm())


@pytest.fixture(scope="module")
def jns_problem():
    # Card test 1: m = n = 500, k = 5, |Omega| = 2 n k ln n (~31k entries, p ~ 0.12).
    n, k = 500, 5
    return _problem(n, n, k, int(2 * n * k * math.log(n))), k


@pytest.mark.parametrize("method, preconditioner", [("exact", "sketch"), ("robust", "sketch"), ("robust", "jacobi")])
def test_altmin_recovers_incoherent_low_rank_matrix(jns_problem, method, preconditioner):
    (M, rows, cols, vals), k = jns_problem
    U, V = complete(rows, cols, vals, M.shape, k, method=method, preconditioner=preconditioner, max_iters=100)
    assert _rel(U, V, M) < 1e-8  # on ALL entries, not just the observed ones (issue asks 1e-6)
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=U.dtype), atol=1e-12)


def test_robust_tolerates_two_cg_steps(jns_problem):
    # Card test 2 (the Gu et al. point): inexact updates, 2 warm-started PCG steps, still converge.
    (M, rows, cols, vals), k = jns_problem
    U, V = complete(rows, cols, vals, M.shape, k, method="robust", cg_iters=2, max_iters=150)
    assert _rel(U, V, M) < 1e-8


def test_row_solves_equal_dense_masked_least_squares():
    # Card test 3: each v_j solves min ||P_Omega_j(U v - M_:,j)||^2 (+ ridge), checked against lstsq.
    M, rows, cols, vals = _problem(40, 30, 3, 500, seed=1)
    U = torch.linalg.qr(torch.randn(40, 3, dtype=torch.float64)).Q
    lam = 1e-3
    side = _Side(cols, rows, vals, 30, 40)
    V = _solve_exact(side, U, lam)
    V_cg = _solve_pcg(side, U, lam, torch.zeros(30, 3, dtype=torch.float64), iters=50, tol=0.0,
                      preconditioner="sketch", s=6, gen=torch.Generator().manual_seed(0))
    for j in range(30):
        obs = cols == j
        A = torch.cat([U[rows[obs]], math.sqrt(lam) * torch.eye(3, dtype=torch.float64)])
        b = torch.cat([vals[obs], torch.zeros(3, dtype=torch.float64)])
        ref = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(V[j], ref, atol=1e-10, rtol=1e-10)
        assert torch.allclose(V_cg[j], ref, atol=1e-9, rtol=1e-9)


def test_too_few_samples_fail_without_crashing(caplog):
    # Card test 4: |Omega| <= (m + n) k is not identifiable; rows with < k observations must not crash.
    M, rows, cols, vals = _problem(100, 100, 5, 900, seed=2)
    counts = torch.bincount(rows, minlength=100)
    assert int(counts.min()) < 5  # some rows are under-determined
    with caplog.at_level(logging.WARNING, logger="rankwise.linalg.complete"):
        for method in ("exact", "robust"):
            U, V = complete(rows, cols, vals, M.shape, 5, method=method, max_iters=20)
            assert torch.isfinite(U).all() and torch.isfinite(V).all()
            assert _rel(U, V, M) > 0.1
    assert "not identifiable" in caplog.text


def test_spectral_init_matches_dense_svd():
    M, rows, cols, vals = _problem(60, 50, 4, 1500, seed=3)
    dense = torch.zeros(60, 50, dtype=torch.float64)
    dense[rows, cols] = vals
    # sigma_5 / sigma_4 ~ 0.66 here: 40 power iterations shrink the subspace error to ~0.66^81.
    U, S, Vh = sparse_top_singular_vectors(rows, cols, vals, (60, 50), 4, power_iters=40)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(dense)
    assert torch.allclose(S, S_ref[:4], rtol=1e-10)
    assert torch.allclose((U * S) @ Vh, (U_ref[:, :4] * S_ref[:4]) @ Vh_ref[:4], atol=1e-9)


def test_observed_values_and_callback_stopping():
    M, rows, cols, vals = _problem(30, 20, 2, 400, seed=4)
    U, V = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    assert torch.allclose(observed_values(U, V, rows, cols), (U @ V.T)[rows, cols])
    seen = []
    complete(rows, cols, vals, M.shape, 2, callback=lambda info: seen.append(info["iteration"]) or True)
    assert seen == [1]  # callback returning True stops
    history = []
    complete(rows, cols, vals, M.shape, 2, tol=1e-3, max_iters=100,
             callback=lambda info: history.append(info["change"]) and None)
    assert history[-1] < 1e-3 and all(c >= 1e-3 for c in history[:-1])  # stops at the first change < tol


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": [0, 5], "cols": [0, 1], "values": [1.0, 2.0]}, "rows indices must lie in"),
        ({"rows": [0, 1], "cols": [0], "values": [1.0, 2.0]}, "one index per value"),
        ({"rows": [0, 1], "cols": [0, 1], "values": [1.0, float("nan")]}, "NaN"),
        ({"rows": [0.0, 1.0], "cols": [0, 1], "values": [1.0, 2.0]}, "integer indices"),
        ({"rows": [0, 1], "cols": [0, 1], "values": [1.0, 2.0], "rank": 9}, "exceeds min"),
        ({"rows": [0, 1], "cols": [0, 1], "values": [1.0, 2.0], "method": "svd"}, "method must be"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    args = {"shape": (4, 3), "rank": 1} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        complete(args.pop("rows"), args.pop("cols"), args.pop("values"), **args)
