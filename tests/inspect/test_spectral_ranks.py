"""Rank metrics of rankwise.linalg.spectral against closed forms on matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import spectral


def _with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with Haar-random orthonormal U (m, k), V (n, k)."""
    g = torch.Generator().manual_seed(seed)
    k = s.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(s.to(torch.float64)) @ V.T


def _entropy_rank(p: list[float]) -> float:
    return math.exp(-sum(x * math.log(x) for x in p if x > 0))


def test_effective_rank_closed_forms():
    s = torch.tensor([3.0, 1.0])
    assert spectral.effective_rank(s) == pytest.approx(_entropy_rank([0.75, 0.25]), rel=1e-12)
    assert spectral.effective_rank(s) == pytest.approx(1.75477, abs=1e-5)
    assert spectral.effective_rank(s, form="energy") == pytest.approx(1.38415, abs=1e-5)
    assert spectral.effective_rank(torch.eye(40)) == pytest.approx(40.0, rel=1e-6)
    rank_one = torch.outer(torch.randn(30), torch.randn(20))
    assert spectral.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    assert spectral.effective_rank(rank_one, form="energy") == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_of_r_equal_values_is_r_and_zeros_do_not_give_nan():
    W = _with_spectrum(torch.tensor([2.0] * 7 + [0.0] * 5), 30, 20)
    assert spectral.effective_rank(W) == pytest.approx(7.0, rel=1e-9)
    assert spectral.effective_rank(torch.tensor([5.0, 5.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert spectral.effective_rank(torch.zeros(4, 3)) == 0.0


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 24), n=st.integers(2, 24), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 99))
def test_effective_rank_bounds_and_scale_invariance(m, n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    rank = spectral.numerical_rank(A)
    for form in ("sigma", "energy"):
        e = spectral.effective_rank(A, form=form)
        assert 1.0 - 1e-9 <= e <= rank + 1e-9
        assert spectral.effective_rank(scale * A, form=form) == pytest.approx(e, rel=1e-9)
    sr = spectral.stable_rank(A)
    assert 1.0 - 1e-9 <= sr <= rank + 1e-9
    assert spectral.stable_rank(scale * A) == pytest.approx(sr, rel=1e-9)


def test_stable_rank_closed_forms():
    assert spectral.stable_rank(torch.tensor([3.0, 1.0])) == pytest.approx(10 / 9)
    Q = torch.linalg.qr(torch.randn(25, 25, dtype=torch.float64))[0]
    assert spectral.stable_rank(Q) == pytest.approx(25.0, rel=1e-9)
    assert spectral.stable_rank(torch.outer(torch.randn(9), torch.randn(6))) == pytest.approx(1.0, rel=1e-5)
    # ||A||_F^2 / ||A||_2^2 computed directly
    A = torch.randn(40, 17, dtype=torch.float64)
    direct = float(A.pow(2).sum() / torch.linalg.matrix_norm(A, ord=2) ** 2)
    assert spectral.stable_rank(A) == pytest.approx(direct, rel=1e-10)


def test_energy_rank_counts_the_smallest_prefix():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    assert spectral.energy_rank(s, 0.6) == 1  # 9/15 = 0.6 exactly
    assert spectral.energy_rank(s, 0.61) == 2
    assert spectral.energy_rank(s, 0.9) == 3  # 14/15 = 0.933
    assert spectral.energy_rank(s, 1.0) == 4
    W = _with_spectrum(torch.tensor([1.0] * 10), 50, 40)
    assert spectral.energy_rank(W, 0.95) == 10  # 9.5 of 10 equal values: needs all ten
    assert spectral.energy_rank(W, 0.85) == 9


def test_numerical_rank_matches_a_planted_rank():
    W = _with_spectrum(torch.tensor([5.0, 3.0, 1.0, 0.5, 1e-3]), 60, 40)
    assert spectral.numerical_rank(W) == 5
    assert spectral.numerical_rank(W.float()) == 5


def test_welore_drop_and_class():
    # a heavy tail loses more rank than a flat spectrum at the same tau (WeLore, Jaiswal et al. 2024)
    heavy = torch.tensor([1.0 / (i + 1) ** 2 for i in range(64)])
    flat = torch.linspace(1.0, 0.5, 64)
    assert spectral.welore_drop(heavy, 0.1) > spectral.welore_drop(flat, 0.1)
    # min-max normalisation: (s - 0.5) / 0.5 < 0.1  <=>  s < 0.55
    assert spectral.welore_drop(flat, 0.1) == int((flat < 0.55).sum())
    drops = [spectral.welore_drop(heavy, t) for t in (0.0, 0.01, 0.05, 0.2, 0.6, 1.0)]
    assert drops == sorted(drops)
    assert spectral.welore_class(heavy, 0.1, shape=(64, 64)) == "LRC"
    assert spectral.welore_class(flat, 0.1, shape=(64, 64)) == "N-LRC"  # keeps 57 > 32 = break-even


def test_welore_threshold_hits_the_requested_reduction():
    g = torch.Generator().manual_seed(1)
    spectra = [torch.rand(n, generator=g) ** p for n, p in [(64, 1), (32, 3), (128, 6), (48, 2)]]
    total = sum(s.numel() for s in spectra)
    for target in (0.1, 0.3, 0.5, 0.7):
        tau = spectral.welore_threshold(spectra, target)
        got = sum(spectral.welore_drop(s, tau) for s in spectra) / total
        # within one singular value per matrix (WeLore, Jaiswal et al. 2024)
        assert target <= got <= target + len(spectra) / total


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        spectral.effective_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=">= 0"):
        spectral.stable_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="energy"):
        spectral.energy_rank(torch.tensor([1.0]), 1.5)
    with pytest.raises(ValueError, match="form"):
        spectral.effective_rank(torch.tensor([1.0]), form="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        spectral.welore_class(torch.tensor([1.0, 0.5]), 0.1)


@pytest.mark.parametrize("shape", [(50, 80), (80, 50)])
def test_singular_values_methods_agree_with_an_fp64_svd(shape):
    s_true = torch.logspace(0, -3, 40, dtype=torch.float64)
    W = _with_spectrum(s_true, *shape).float()
    ref = torch.linalg.svdvals(W.double())
    for method in ("svd", "gram"):
        S, exact = spectral.singular_values(W, method=method)
        assert exact and S.dtype == torch.float32 and S.shape == (50,)
        assert torch.allclose(S.double(), ref, atol=2e-6 * float(ref[0]), rtol=0)
    # above the exact-size threshold only the top `rank` values come back, from a randomized SVD
    S, exact = spectral.singular_values(W, max_exact=10, rank=8)
    assert not exact and S.shape == (8,)
    assert torch.allclose(S.double(), ref[:8], rtol=1e-3)
