"""rankwise.linalg.svd against torch.linalg and the Halko-Martinsson-Tropp guarantees
(SIAM Review 2011, §10)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import (
    low_rank_approx,
    orthonormalize,
    randomized_svd,
    split_factors,
    svd,
    svdvals,
    truncated_svd,
)

PROPS = settings(max_examples=25, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A = H diag(sigma) K (m, n) in fp64, H and K products of 4 random Householder reflections:
    dense, with exactly these singular values, and far cheaper to build than Haar factors (the
    error of a Gaussian-sketch SVD depends only on the singular values, HMT §10)."""
    g = _gen(seed)
    A = torch.zeros(m, n, dtype=torch.float64)
    A[: sigma.numel(), : sigma.numel()] = torch.diag(sigma)
    for _ in range(4):
        u = torch.randn(m, 1, generator=g, dtype=torch.float64)
        v = torch.randn(n, 1, generator=g, dtype=torch.float64)
        u, v = u / u.norm(), v / v.norm()
        A = A - 2 * u @ (u.mT @ A)
        A = A - 2 * (A @ v) @ v.mT
    return A


def _low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, n, generator=g, dtype=torch.float64
    )


def _assert_orthonormal_columns(Q: torch.Tensor, tol: float) -> None:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    torch.testing.assert_close(Q.mT @ Q, eye.expand_as(Q.mT @ Q), atol=tol, rtol=0)


# --------------------------------------------------------------------------- exact


@PROPS
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_svd_matches_torch(m: int, n: int, seed: int) -> None:
    A = torch.randn(m, n, generator=_gen(seed), dtype=torch.float64)
    U, S, Vh = svd(A)
    torch.testing.assert_close(S, torch.linalg.svdvals(A))
    torch.testing.assert_close((U * S) @ Vh, A)
    torch.testing.assert_close(svdvals(A), torch.linalg.svdvals(A))


@pytest.mark.parametrize(
    ("dtype", "compute"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
)
def test_dtype_policy(dtype: torch.dtype, compute: torch.dtype) -> None:
    A = torch.randn(20, 12).to(dtype)
    for U, S, Vh in (svd(A), truncated_svd(A, 3), randomized_svd(A, 2, seed=0)):
        assert U.dtype == S.dtype == Vh.dtype == compute
    assert svdvals(A).dtype == compute
    assert low_rank_approx(A, 3).dtype == dtype  # the dense approximation returns in A's dtype


@PROPS
@given(m=st.integers(2, 12), n=st.integers(2, 12), data=st.data())
def test_truncated_svd_is_eckart_young(m: int, n: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(1, min(m, n)))
    A = torch.randn(m, n, generator=_gen(data.draw(st.integers(0, 999))), dtype=torch.float64)
    U, S, Vh = truncated_svd(A, rank)
    full = torch.linalg.svdvals(A)
    torch.testing.assert_close(S, full[:rank])
    err2 = torch.linalg.matrix_norm(A - (U * S) @ Vh) ** 2
    torch.testing.assert_close(err2, (full[rank:] ** 2).sum(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(low_rank_approx(A, rank), (U * S) @ Vh)


# --------------------------------------------------------------------------- randomized


@PROPS
@given(
    m=st.integers(20, 60),
    n=st.integers(20, 60),
    true_rank=st.integers(1, 5),
    extra=st.integers(0, 3),
    q=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_randomized_exact_on_low_rank_inputs(
    m: int, n: int, true_rank: int, extra: int, q: int, seed: int
) -> None:
    """HMT: a sketch of width >= rank(A) captures A exactly (fp64, 1e-10)."""
    A = _low_rank(m, n, true_rank, seed)
    k = true_rank + extra
    U, S, Vh = randomized_svd(A, k, oversample=5, power_iters=q, seed=seed)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    scale = torch.linalg.matrix_norm(A)
    assert torch.linalg.matrix_norm(A - (U * S) @ Vh) <= 1e-10 * scale
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[:k], atol=1e-10 * scale, rtol=0)
    _assert_orthonormal_columns(U[:, :true_rank], 1e-10)
    _assert_orthonormal_columns(Vh[:true_rank].mT, 1e-10)


@PROPS
@given(m=st.integers(15, 50), n=st.integers(15, 50), k=st.integers(1, 4), seed=st.integers(0, 999))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_factors_orthonormal(m: int, n: int, k: int, seed: int, dtype: torch.dtype) -> None:
    A = torch.randn(m, n, generator=_gen(seed), dtype=dtype)
    U, S, Vh = randomized_svd(A, k, seed=seed)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    _assert_orthonormal_columns(U, tol)
    _assert_orthonormal_columns(Vh.mT, tol)
    assert bool((S[:-1] >= S[1:]).all()) and bool((S >= 0).all())
    # Ritz values never exceed the true singular values (interlacing of Q^T A).
    assert bool((S <= torch.linalg.svdvals(A.double())[:k].to(dtype) * (1 + 1e-5)).all())


def test_randomized_near_optimal_on_slow_decay() -> None:
    """Card test 2: 2000 x 1000, sigma_j = 1/j, k = 50, p = 10, q = 2 (3 seeds): Frobenius error
    <= 1.02x optimal and spectral <= 1.10 sigma_{k+1}; with q = 0 it is clearly worse."""
    k = 50
    sigma = 1.0 / torch.arange(1, 1001, dtype=torch.float64)
    A = _with_spectrum(2000, 1000, sigma)
    opt_f = sigma[k:].pow(2).sum().sqrt()
    for seed in range(3):
        U, S, Vh = randomized_svd(A, k, oversample=10, power_iters=2, seed=seed)
        R = A - (U * S) @ Vh
        assert torch.linalg.matrix_norm(R) <= 1.02 * opt_f
        if seed == 0:  # spectral norm once: the largest eigenvalue of R^T R (1000 x 1000)
            assert torch.linalg.eigvalsh(R.mT @ R)[-1].sqrt() <= 1.10 * sigma[k]
        U0, S0, Vh0 = randomized_svd(A, k, oversample=10, power_iters=0, seed=seed)
        err0 = torch.linalg.matrix_norm(A - (U0 * S0) @ Vh0)
        assert err0 > 1.1 * opt_f and err0 > torch.linalg.matrix_norm(R)


def test_more_power_iterations_do_not_hurt() -> None:
    """Card test 3: on a slow spectrum the median error over seeds is monotone in q."""
    sigma = torch.arange(1, 301, dtype=torch.float64).rsqrt()
    A = _with_spectrum(400, 300, sigma)
    medians = []
    for q in range(4):
        errs = [
            float(torch.linalg.matrix_norm(A - low_rank_approx(A, 10, "randomized", power_iters=q, seed=s)))
            for s in range(5)
        ]
        medians.append(sorted(errs)[2])
    assert all(a >= b for a, b in zip(medians, medians[1:], strict=False))


def test_same_seed_is_bit_identical() -> None:
    A = torch.randn(120, 80)
    a = randomized_svd(A, 7, seed=123)
    b = randomized_svd(A, 7, seed=123)
    c = randomized_svd(A, 7, seed=torch.Generator().manual_seed(123))
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    d = randomized_svd(A, 7, seed=124)
    assert not torch.equal(a[0], d[0])


def test_batched_equals_per_matrix() -> None:
    """Each batch member gets its own sketch; on exactly low-rank inputs every route is exact, so
    the batched factors equal the per-matrix ones (fp64), tall and wide."""
    for m, n in ((50, 30), (30, 50)):
        A = torch.stack([_low_rank(m, n, 3, s) for s in range(4)]).reshape(2, 2, m, n)
        U, S, Vh = randomized_svd(A, 3, oversample=4, seed=0)
        assert U.shape == (2, 2, m, 3) and S.shape == (2, 2, 3) and Vh.shape == (2, 2, 3, n)
        for i in range(2):
            for j in range(2):
                u, s, vh = randomized_svd(A[i, j], 3, oversample=4, seed=7)
                torch.testing.assert_close(S[i, j], s, atol=1e-10, rtol=1e-10)
                torch.testing.assert_close((U[i, j] * S[i, j]) @ Vh[i, j], (u * s) @ vh)
                torch.testing.assert_close((u * s) @ vh, A[i, j])


def test_wide_sketch_falls_back_to_exact() -> None:
    A = torch.randn(30, 12, dtype=torch.float64)
    U, S, Vh = randomized_svd(A, 5)  # rank + oversample >= 12 columns: exact SVD
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[:5])


# --------------------------------------------------------------------------- factors and bases


@PROPS
@given(m=st.integers(2, 10), n=st.integers(2, 10), seed=st.integers(0, 999), data=st.data())
def test_split_factors_balanced(m: int, n: int, seed: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(1, min(m, n)))
    A = torch.randn(m, n, generator=_gen(seed), dtype=torch.float64)
    U, S, Vh = truncated_svd(A, rank)
    B, Af = split_factors(U, S, Vh)
    assert B.shape == (m, rank) and Af.shape == (rank, n)
    torch.testing.assert_close(B @ Af, (U * S) @ Vh)
    torch.testing.assert_close(B.norm(dim=0), Af.norm(dim=1))  # both sides carry sqrt(S)


@PROPS
@given(m=st.integers(1, 12), seed=st.integers(0, 999), data=st.data())
def test_orthonormalize(m: int, seed: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, m))
    Y = torch.randn(m, k, generator=_gen(seed), dtype=torch.float64)
    Q = orthonormalize(Y)
    _assert_orthonormal_columns(Q, 1e-12)
    torch.testing.assert_close(Q @ (Q.mT @ Y), Y)  # same span
    assert bool((torch.diagonal(Q.mT @ Y) > 0).all())  # sign fix: R has a positive diagonal


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda A: randomized_svd(A, 13), ValueError, r"exceeds min\(m, n\) = 12"),
        (lambda A: truncated_svd(A, 0), ValueError, "must be positive"),
        (lambda A: randomized_svd(A, -1), ValueError, "must be positive"),
        (lambda A: randomized_svd(A, 2.0), TypeError, "must be an int"),
        (lambda A: randomized_svd(A, 2, oversample=-1), ValueError, "oversample"),
        (lambda A: randomized_svd(A, 2, power_iters=-1), ValueError, "power_iters"),
        (lambda A: low_rank_approx(A, 2, method="nope"), ValueError, "method"),
        (lambda A: svd(A[0]), ValueError, "must be a matrix"),
        (lambda A: svd(A.to(torch.int64)), TypeError, "floating"),
        (lambda A: svd(A.numpy()), TypeError, "torch.Tensor"),
        (lambda A: orthonormalize(A.mT), ValueError, "at most m columns"),
    ],
)
def test_bad_input_errors(call, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        call(torch.randn(20, 12))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fn", [svd, svdvals, lambda A: randomized_svd(A, 2), lambda A: truncated_svd(A, 2)])
def test_nonfinite_input_is_a_clear_error(bad: float, fn) -> None:  # noqa: ANN001
    A = torch.randn(30, 20)
    A[3, 4] = bad
    with pytest.raises(ValueError, match="NaN .* upstream loss"):
        fn(A)
