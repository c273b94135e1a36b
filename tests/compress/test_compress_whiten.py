"""Whitened SVD (LoRD / ASVD / FWSVD / SVD-LLM): the defining identities of each
method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.compress.base import InputStats
from rankwise.compress.svd import SVDConfig, WhitenedSVD


def _layer(m: int, n: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64))
    return layer


def _inputs(n: int, N: int, seed: int = 1, outliers: int = 0) -> torch.Tensor:
    """(N, n) correlated inputs; `outliers` channels scaled 100x."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    X = torch.randn(N, n, generator=g, dtype=torch.float64) @ mix + 0.3
    X[:, :outliers] *= 100.0
    return X


def _fit(whitener: str, layer: nn.Linear, X: torch.Tensor, **cfg) -> WhitenedSVD:
    c = WhitenedSVD(SVDConfig(whitener=whitener, **cfg))
    c.observe("fc", layer, X[: len(X) // 2])
    c.observe("fc", layer, X[len(X) // 2:])  # streaming == one shot
    return c


def _out_err(layer: nn.Linear, new: nn.Module, X: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(X) - new(X)).pow(2).sum())


@pytest.mark.parametrize("whitener", ["cholesky", "eigh"])
def test_truncation_loss_equals_discarded_singular_values(whitener):
    layer, X = _layer(24, 40), _inputs(40, 300)
    c = _fit(whitener, layer, X)
    S = c.spectrum("fc", layer)
    for r in (1, 7, 14):
        err = _out_err(layer, c.compress("fc", layer, r), X)
        assert err == pytest.approx(float(S[r:].pow(2).sum()), rel=1e-8)


def test_svd_llm_beats_plain_asvd_and_random_perturbations():
    layer, X = _layer(24, 40), _inputs(40, 300, outliers=3)
    r = 8
    best = _out_err(layer, _fit("cholesky", layer, X).compress("fc", layer, r), X)
    for other in ("none", "act-scale"):
        assert best < _out_err(layer, _fit(other, layer, X).compress("fc", layer, r), X)
    new = _fit("cholesky", layer, X).compress("fc", layer, r)
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        pert = type(new).from_factors(new.B.weight.detach() + 1e-3 * torch.randn(24, r, generator=g, dtype=torch.float64),
                                      new.A.weight.detach() + 1e-3 * torch.randn(r, 40, generator=g, dtype=torch.float64))
        assert _out_err(layer, pert, X) >= best


def test_gram_scaling_leaves_the_result_unchanged():
    layer, X = _layer(16, 20), _inputs(20, 100)
    c1, c2 = WhitenedSVD(), WhitenedSVD()
    gram = X.T @ X
    c1.observe_stats("fc", InputStats(gram=gram, n_tokens=100))
    c2.observe_stats("fc", InputStats(gram=7.5 * gram, n_tokens=100))
    w1 = c1.compress("fc", layer, 5).dense_weight()
    w2 = c2.compress("fc", layer, 5).dense_weight()
    torch.testing.assert_close(w1, w2, rtol=1e-8, atol=1e-10)


def test_rank_deficient_inputs_take_the_jitter_path_and_still_work():
    layer = _layer(16, 40)
    X = _inputs(40, 25)  # 25 tokens < 40 features: singular Gram
    c = _fit("cholesky", layer, X)
    new = c.compress("fc", layer, 6)
    assert torch.isfinite(new.dense_weight()).all()
    plain = _fit("none", layer, X).compress("fc", layer, 6)
    assert _out_err(layer, new, X) < _out_err(layer, plain, X)


def test_asvd_alpha_zero_is_plain_svd_and_scaled_truncation_identity():
    layer, X = _layer(20, 30), _inputs(30, 200, outliers=2)
    W = layer.weight.detach()
    plain = _fit("none", layer, X).compress("fc", layer, 6).dense_weight()
    a0 = _fit("act-scale", layer, X, alpha=0.0).compress("fc", layer, 6).dense_weight()
    torch.testing.assert_close(a0, plain, rtol=1e-8, atol=1e-8)
    # any alpha: B A = [W S]_r S^-1 with S = diag(mean|x|^alpha + 1e-6)
    s = X.abs().mean(0) ** 0.5 + 1e-6
    U, Sv, Vh = torch.linalg.svd(W * s[None, :])
    ref = (U[:, :6] * Sv[:6]) @ Vh[:6] / s[None, :]
    got = _fit("act-scale", layer, X, alpha=0.5).compress("fc", layer, 6).dense_weight()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


def test_asvd_beats_plain_svd_with_outlier_channels():
    wins = 0
    for seed in range(10):
        layer, X = _layer(24, 32, seed), _inputs(32, 256, seed + 100, outliers=3)
        asvd = _out_err(layer, _fit("act-scale", layer, X).compress("fc", layer, 6), X)
        plain = _out_err(layer, _fit("none", layer, X).compress("fc", layer, 6), X)
        wins += asvd < plain
    assert wins == 10


def _fisher(layer: nn.Linear, F: torch.Tensor, **cfg) -> WhitenedSVD:
    c = WhitenedSVD(SVDConfig(whitener="fisher", **cfg))
    c.observe_stats("fc", InputStats(sq_grad=F, n_tokens=1))
    return c


@pytest.mark.parametrize("axis", ["in", "out"])
def test_fwsvd_identities(axis):
    layer = _layer(18, 26)
    W = layer.weight.detach()
    ones = torch.ones(18, 26, dtype=torch.float64)
    plain = _fit("none", layer, _inputs(26, 50)).compress("fc", layer, 5).dense_weight()
    got = _fisher(layer, ones, alpha=1.0, fisher_axis=axis).compress("fc", layer, 5).dense_weight()
    torch.testing.assert_close(got, plain, rtol=1e-8, atol=1e-8)

    F = torch.rand(18, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) ** 3
    c = _fisher(layer, F, alpha=1.0, fisher_axis=axis)
    imp = F.sum(1 if axis == "out" else 0)
    d = (imp + 1e-5 * imp.mean()).sqrt()
    D = (lambda M: d[:, None] * M) if axis == "out" else (lambda M: M * d[None, :])
    weighted = lambda What: float(D(W - What.detach()).pow(2).sum())  # noqa: E731
    S = torch.linalg.svdvals(D(W))
    fw = c.compress("fc", layer, 5).dense_weight()
    assert weighted(fw) == pytest.approx(float(S[5:].pow(2).sum()), rel=1e-8)
    assert weighted(fw) <= weighted(plain)
    scaled = _fisher(layer, 1234.0 * F, alpha=1.0, fisher_axis=axis).compress("fc", layer, 5).dense_weight()
    torch.testing.assert_close(scaled, fw, rtol=1e-8, atol=1e-8)  # floor is relative: exact


def test_fwsvd_heavily_weighted_row_is_kept():
    layer = _layer(12, 16)
    W = layer.weight.detach()
    F = torch.ones(12, 16, dtype=torch.float64)
    F[3] *= 1e6
    fw = _fisher(layer, F, alpha=1.0, fisher_axis="out").compress("fc", layer, 2).dense_weight()
    plain = _fit("none", layer, _inputs(16, 40)).compress("fc", layer, 2).dense_weight()
    assert (fw[3] - W[3]).norm() < 1e-2 * (plain[3] - W[3]).norm() + 1e-9
    assert (fw - W).norm() > (plain - W).norm()


def test_missing_statistics_and_bad_config_are_explained():
    layer = _layer(8, 8)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        WhitenedSVD().compress("fc", layer, 2)
    with pytest.raises(ValueError, match="unknown whitener"):
        SVDConfig(whitener="qr")
    c = WhitenedSVD()
    with pytest.raises(ValueError, match="NaN"):
        c.observe("fc", layer, torch.full((4, 8), float("nan")))


def test_cholesky_whitening_keeps_the_gram_and_never_forms_the_inverse():
    """SVD-LLM's factors by triangular solve equal B, A with the explicit L^-1 (the paper's
    formula A = S^1/2 V^T L^-1), the Gram is only symmetrised (damping put back), and no (n, n)
    inverse is kept: streaming compression counts those matrices."""
    from rankwise.linalg import cholesky, inverse_lower, svd

    layer, X = _layer(10, 16), _inputs(16, 80)
    c = _fit("cholesky", layer, X, damping=1e-3)
    gram = c.stats_["fc"].gram
    before = gram.clone()
    B, A = c.factors("fc", layer, 4)
    # the Gram is only symmetrised (in place, the same numbers as (G + G^T) / 2), damping undone
    assert torch.equal(gram, (before + before.mT) / 2)
    wh = c._svd("fc", layer)[3]
    assert wh.right_inv is None and wh.right_lower
    G = (before + before.mT) / 2
    G.diagonal().add_(1e-3 * G.diagonal().mean())
    L = cholesky(G)
    U, S, Vh = svd(layer.weight.detach() @ L)
    root = S[:4].sqrt()
    torch.testing.assert_close(B, U[:, :4] * root, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(A, (Vh[:4] * root[:, None]) @ inverse_lower(L), atol=1e-9, rtol=1e-9)


def test_release_grams_drops_a_shared_gram_once_factored_and_keeps_the_factors():
    """Streaming's memory mode: q/k/v share one Gram; it is released as soon as its whitening
    exists, and every sibling's factors equal those of the default (cached Gram) mode."""
    x = _inputs(16, 80)
    layers = {name: _layer(10, 16, seed=i) for i, name in enumerate("qkv")}
    results = {}
    for release in (False, True):
        c = WhitenedSVD(SVDConfig(whitener="cholesky"))
        c.release_grams = release
        gram = (x.mT @ x)
        for name in layers:  # one shared Gram object, as the calibration hooks hand it over
            c.observe_stats(name, InputStats(gram=gram, n_tokens=len(x)))
        del gram
        results[release] = {name: c.factors(name, layer, 3) for name, layer in layers.items()}
        if release:
            assert all(c.stats_[name].gram is None for name in layers)
        else:
            assert all(c.stats_[name].gram is not None for name in layers)
    for name in layers:
        for a, b in zip(results[False][name], results[True][name], strict=True):
            assert torch.equal(a, b)
