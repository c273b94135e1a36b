"""Power-law alpha (WeightWatcher fit) and FARMS on sampled spectra with known exponents."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.linalg import spectral


def _pareto(n: int, alpha: float, xmin: float, seed: int) -> torch.Tensor:
    """Samples of density ~ x^-alpha on x >= xmin (inverse CDF)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return xmin * u ** (-1.0 / (alpha - 1.0))


def test_mle_recovers_alpha_on_pareto_samples():
    x = _pareto(100_000, 3.0, 2.0, seed=0)
    fit = spectral.powerlaw_alpha(x, xmin=2.0)
    assert fit.alpha == pytest.approx(3.0, abs=0.02)
    assert fit.n_tail == 100_000  # xmin snaps to the smallest sample, so the whole sample is the tail
    # the MLE closed form, by hand
    by_hand = 1 + x.numel() / float(torch.log(x / x.min()).sum())
    assert fit.alpha == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_scan_finds_the_tail_above_a_bulk(seed):
    # 1000 bulk values in [0.05, 0.95] below a Pareto(alpha=3) tail starting at 1
    g = torch.Generator().manual_seed(100 + seed)
    bulk = 0.05 + 0.9 * torch.rand(1000, generator=g, dtype=torch.float64)
    x = torch.cat([bulk, _pareto(2000, 3.0, 1.0, seed)])
    fit = spectral.powerlaw_alpha(x[torch.randperm(x.numel(), generator=g)])  # order must not matter
    assert fit.alpha == pytest.approx(3.0, abs=0.15)  # sigma = 2 / sqrt(2000) = 0.045
    assert 0.99 <= fit.xmin <= 1.2
    # the KS distance at the chosen xmin is the minimum over all candidates
    assert fit.ks_distance <= spectral.powerlaw_alpha(x, xmin=0.5).ks_distance


def test_peak_restricted_scan_on_a_pure_pareto_sample():
    # the log10 histogram of a Pareto sample peaks in its first bin, so xmin stays near the bottom
    x = _pareto(3000, 3.0, 1.0, seed=5)
    fit = spectral.powerlaw_alpha(x, xmin="peak")
    assert fit.xmin <= 1.5 * 10 ** (float(torch.log10(x).max()) / 100) * 1.0001
    assert fit.alpha == pytest.approx(3.0, abs=0.15)


def test_fit_reports_the_derived_norms_by_hand():
    lam = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    fit = spectral.powerlaw_alpha(lam, xmin=1.0, min_evals=5)
    tail = lam[1:]
    alpha = 1 + 4 / float(torch.log(tail / 1.0).sum())  # 1 + 4 / (6 ln 2)
    assert fit.alpha == pytest.approx(alpha)
    assert fit.n_tail == 4 and fit.xmin == 1.0 and fit.xmax == 8.0
    assert fit.alpha_weighted == pytest.approx(alpha * math.log10(8.0))
    assert fit.log_alpha_norm == pytest.approx(math.log10(float((lam**alpha).sum())))
    emp = torch.arange(4, dtype=torch.float64) / 4
    model = 1 - (tail / 1.0) ** (1 - alpha)
    assert fit.ks_distance == pytest.approx(float((model - emp).abs().max()))
    assert spectral.stable_rank(lam.sqrt()) == pytest.approx(float(lam.sum() / lam.max()))


@pytest.mark.parametrize("shape", [(400, 800), (300, 1200)])
def test_gaussian_matrices_are_not_called_heavy_tailed(shape):
    # Marchenko-Pastur ESDs: the KS scan must report a large alpha ("random-like", > 6 in WW terms)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        assert spectral.powerlaw_alpha(spectral.esd(W)).alpha > 6.0


def test_heavy_tailed_spectrum_gets_a_small_alpha():
    # singular values whose squares are Pareto(alpha=2.5): a heavy-tailed layer
    lam = torch.sort(_pareto(300, 2.5, 1.0, seed=3), descending=True).values
    g = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(600, 300, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))[0]
    W = U @ torch.diag(lam.sqrt()) @ V.T
    fit = spectral.powerlaw_alpha(spectral.esd(W))
    assert fit.alpha == pytest.approx(2.5, abs=0.35)


def test_farms_removes_the_aspect_ratio_bias():
    # FARMS (Hu et al., arXiv 2506.06280) at a quarter of the size: i.i.d. Gaussian W / sqrt(cols) of four shapes
    shapes = [(250, 250), (250, 500), (250, 1000), (125, 1000)]
    full, farms = [], []
    for k, shape in enumerate(shapes):
        g = torch.Generator().manual_seed(k)
        W = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        full.append(spectral.powerlaw_alpha(spectral.esd(W), xmin="mid").alpha)
        farms.append(spectral.farms_alpha(W).alpha)
    assert max(full) - min(full) > 1.0  # whole-matrix alpha drifts with the aspect ratio
    assert max(farms) - min(farms) < 0.1  # FARMS does not
    assert full == sorted(full)  # and the drift grows with the aspect ratio


def test_farms_esd_pools_fixed_shape_windows():
    W = torch.randn(300, 700)
    lam = spectral.farms_esd(W, thresh=None)
    assert lam.numel() == 10 * 10 * 100  # 10 x 10 windows of 100 x 200, 100 eigenvalues each
    assert torch.equal(spectral.farms_esd(W.T, thresh=None), lam)  # orientation does not matter
    small = spectral.farms_esd(torch.randn(40, 60), thresh=None)  # window shrinks to 40 x 60
    assert small.numel() == 40


def test_fit_rejects_too_few_eigenvalues():
    with pytest.raises(ValueError, match="at least 10"):
        spectral.powerlaw_alpha(torch.rand(5) + 0.1)
    with pytest.raises(ValueError, match="xmin"):
        spectral.powerlaw_alpha(torch.rand(50) + 0.1, xmin="median")  # type: ignore[arg-type]
