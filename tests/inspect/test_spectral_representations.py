"""RankMe and the Matrix Nuclear-Norm against their defining properties."""

from __future__ import annotations

import pytest
import torch

from rankwise.linalg import spectral


def test_rankme_of_isotropic_gaussian_is_close_to_full():
    g = torch.Generator().manual_seed(0)
    K = 128
    Z = torch.randn(12_800, K, generator=g)
    assert spectral.rankme(Z) > 0.98 * K


def test_rankme_of_rank_eight_embeddings():
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(6_000, 8, generator=g) @ torch.randn(8, 128, generator=g)
    assert 7.5 <= spectral.rankme(Z) <= 8.1


def test_rankme_is_scale_invariant_and_equals_sigma_erank_up_to_eps():
    g = torch.Generator().manual_seed(2)
    Z = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    assert spectral.rankme(7.0 * Z) == pytest.approx(spectral.rankme(Z), rel=1e-9)
    assert spectral.rankme(Z, eps=0.0) == pytest.approx(spectral.effective_rank(Z), rel=1e-9)
    assert spectral.rankme(Z) == pytest.approx(spectral.effective_rank(Z), rel=1e-4)


def test_mnn_rows_have_unit_norm_after_normalisation():
    R = torch.randn(37, 16, dtype=torch.float64) + 3.0
    Rn = spectral.normalize_representations(R)
    assert torch.allclose(Rn.norm(dim=1), torch.ones(37, dtype=torch.float64))
    # sum_j c_j^2 = ||Rn||_F^2 = L (every row has unit l2 norm)
    assert float(Rn.norm(dim=0).pow(2).sum()) == pytest.approx(37.0, rel=1e-12)


@pytest.mark.parametrize("shape", [(300, 256), (1000, 64), (64, 64)])
def test_mnn_upper_bounds_the_nuclear_norm_when_tokens_outnumber_dims(shape):
    g = torch.Generator().manual_seed(3)
    R = torch.randn(*shape, generator=g) @ torch.randn(shape[1], shape[1], generator=g)
    mnn = spectral.matrix_nuclear_norm(R)
    exact = spectral.nuclear_norm(R, normalize=True)
    assert mnn >= exact * (1 - 1e-12)
    # and both live within [||R||_F, sqrt(min(L, d)) ||R||_F] = [sqrt(L), sqrt(L * d)]
    L, d = shape
    assert L**0.5 * (1 - 1e-9) <= exact <= (L * min(L, d)) ** 0.5 * (1 + 1e-9)


def test_mnn_tracks_the_nuclear_norm_as_a_monotone_surrogate():
    # the paper's use: ranking representations by MNN should agree with ranking by ||R||_*.
    # Representations of growing intrinsic rank (L >= d): both norms grow together.
    g = torch.Generator().manual_seed(4)
    mnn, exact = [], []
    for r in (1, 2, 4, 8, 16, 32, 64):
        R = torch.randn(512, r, generator=g) @ torch.randn(r, 64, generator=g)
        mnn.append(spectral.matrix_nuclear_norm(R))
        exact.append(spectral.nuclear_norm(R, normalize=True))
    assert mnn == sorted(mnn) and exact == sorted(exact)
    # and on a matrix with orthogonal columns (the equality case of the triangle inequality)
    Q = torch.linalg.qr(torch.randn(200, 40, dtype=torch.float64))[0] * torch.linspace(1, 5, 40, dtype=torch.float64)
    assert spectral.matrix_nuclear_norm(Q, normalize=False) == pytest.approx(spectral.nuclear_norm(Q), rel=1e-9)


def test_mnn_hand_computed_and_invariances():
    R = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    # no normalisation: column norms 3 and 4, top min(3, 2) = 2 of them
    assert spectral.matrix_nuclear_norm(R, normalize=False) == pytest.approx(7.0)
    # normalised: centre ([2, -4/3], [-1, 8/3], [-1, -4/3]) then unit rows
    c = R - R.mean(0)
    n = c / c.norm(dim=1, keepdim=True)
    assert spectral.matrix_nuclear_norm(R) == pytest.approx(float(n.norm(dim=0).sum()), rel=1e-6)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(50, 20, generator=g)
    perm = torch.randperm(50, generator=g)
    assert spectral.matrix_nuclear_norm(X[perm]) == pytest.approx(spectral.matrix_nuclear_norm(X), rel=1e-12)
    assert spectral.matrix_nuclear_norm(4.0 * X) == pytest.approx(spectral.matrix_nuclear_norm(X), rel=1e-9)
