"""AFM output-feature PCA: exactness, error = discarded eigenvalues, relation to SVD-LLM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.compress.features import FeatureCompressor
from rankwise.compress.svd import SVDConfig, WhitenedSVD


def _layer(m=20, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(m, generator=g, dtype=torch.float64))
    return layer


def _x(n=30, N=400, seed=1, dim=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=torch.float64) + 2.0
    if dim is not None:  # inputs confined to a dim-dimensional subspace (+ offset)
        X = torch.randn(N, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, n, generator=g, dtype=torch.float64) + 1.0
    return X


def _fit(layer, X, **kw):
    c = FeatureCompressor(**kw)
    for chunk in X.split(64):  # streaming over mini-batches
        c.observe("fc", layer, chunk)
    return c


def test_full_rank_is_exact():
    layer, X = _layer(), _x()
    new = _fit(layer, X).compress("fc", layer, 20)
    with torch.no_grad():
        torch.testing.assert_close(new(X), layer(X), rtol=1e-8, atol=1e-8)


def test_output_mse_equals_discarded_eigenvalues():
    layer, X = _layer(), _x()
    c = _fit(layer, X)
    with torch.no_grad():
        Y = layer(X)
    C = torch.cov(Y.T, correction=0)
    lam = torch.linalg.eigvalsh(C).flip(0)
    for k in (3, 9):
        with torch.no_grad():
            mse = (c.compress("fc", layer, k)(X) - Y).pow(2).sum(1).mean()
        assert float(mse) == pytest.approx(float(lam[k:].sum()), rel=1e-8)


def test_uncentred_afm_is_svd_llm():
    layer, X = _layer(), _x()
    afm = _fit(layer, X, center=False).compress("fc", layer, 6)
    svd = WhitenedSVD(SVDConfig(whitener="cholesky"))
    svd.observe("fc", layer, X)
    ref = svd.compress("fc", layer, 6)
    torch.testing.assert_close(afm.delta_weight(), ref.delta_weight(), rtol=1e-7, atol=1e-8)


def test_afm_beats_weight_svd_on_subspace_inputs():
    layer, X = _layer(), _x(dim=5)
    afm = _fit(layer, X).compress("fc", layer, 5)
    plain = WhitenedSVD(SVDConfig(whitener="none")).compress("fc", layer, 5)
    with torch.no_grad():
        Y = layer(X)
        assert (afm(X) - Y).pow(2).mean() < 1e-12 < (plain(X) - Y).pow(2).mean()
