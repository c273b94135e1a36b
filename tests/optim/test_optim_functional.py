"""The pure update rules: limiter, channel scaling, moment rotation (Fira's norm-growth limiter and
per-channel scaling, Chen et al. 2024; APOLLO's channel scaling, Zhu et al. 2025; moments
rotated into a new subspace)."""

from __future__ import annotations

import pytest
import torch

from rankwise.optim import functional as ofn


def _with_norm(norm: float) -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    return x / x.norm() * norm


def test_limiter_first_call_only_records():
    x = _with_norm(1.0)
    out, prev = ofn.norm_growth_limit(x, torch.tensor(-1.0))
    assert torch.equal(out, x)
    assert float(prev) == pytest.approx(1.0, rel=1e-6)


def test_limiter_clips_growth_to_gamma():
    """Fira test 4: norms 1 then 10 -> second applied norm 1.01 and stored state 1.01."""
    _, prev = ofn.norm_growth_limit(_with_norm(1.0), torch.tensor(-1.0))
    out, prev = ofn.norm_growth_limit(_with_norm(10.0), prev, gamma=1.01)
    assert float(out.norm()) == pytest.approx(1.01, rel=1e-5)
    assert float(prev) == pytest.approx(1.01, rel=1e-5)


def test_limiter_leaves_small_growth_untouched():
    """Fira test 4: norms 1 then 1.005 -> untouched."""
    _, prev = ofn.norm_growth_limit(_with_norm(1.0), torch.tensor(-1.0))
    x = _with_norm(1.005)
    out, prev = ofn.norm_growth_limit(x, prev, gamma=1.01)
    torch.testing.assert_close(out, x)
    assert float(prev) == pytest.approx(1.005, rel=1e-5)


def test_limiter_zero_residual_gives_no_nan():
    _, prev = ofn.norm_growth_limit(torch.zeros(3, 3), torch.tensor(-1.0))
    out, prev = ofn.norm_growth_limit(torch.zeros(3, 3), prev)
    assert torch.isfinite(out).all() and float(prev) == 0.0


@pytest.mark.parametrize("side", ["right", "left"])
def test_channel_scale_matches_manual_norms(side):
    """Fira test 3: phi per row of (m, r) [right] or per column of (r, n) [left]."""
    gen = torch.Generator().manual_seed(1)
    n_low = torch.randn(7, 3, generator=gen) if side == "right" else torch.randn(3, 7, generator=gen)
    r_low = torch.randn_like(n_low)
    phi = ofn.channel_scale(n_low, r_low, side)
    if side == "right":
        manual = torch.stack([n_low[i].norm() / (r_low[i].norm() + 1e-8) for i in range(7)])
        assert phi.shape == (7, 1)
    else:
        manual = torch.stack([n_low[:, j].norm() / (r_low[:, j].norm() + 1e-8) for j in range(7)])
        assert phi.shape == (1, 7)
    torch.testing.assert_close(phi.flatten(), manual)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rotation_between_equal_subspaces_is_identity_on_moments(side):
    q, _ = torch.linalg.qr(torch.randn(9, 4, generator=torch.Generator().manual_seed(2)))
    basis = q.T if side == "right" else q  # (r, n) right, (m, r) left
    m = torch.randn(5, 4) if side == "right" else torch.randn(4, 5)
    v = m.square()
    m0, v0 = m.clone(), v.clone()
    ofn.rotate_moments_(m, v, ofn.rotation(basis, basis, side), side)
    torch.testing.assert_close(m, m0, atol=1e-6, rtol=0)
    torch.testing.assert_close(v, v0, atol=1e-6, rtol=0)


def test_rotation_first_moment_preserves_the_full_space_vector_when_span_is_kept():
    """Right side: M P_old equals (M rot) P_new when P_new spans the same space."""
    q, _ = torch.linalg.qr(torch.randn(9, 4, generator=torch.Generator().manual_seed(3)))
    old = q.T
    mix, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(4)))
    new = mix @ old  # same row space, other basis
    m = torch.randn(5, 4)
    v = torch.rand(5, 4)
    full_before = m @ old
    ofn.rotate_moments_(m, v, ofn.rotation(old, new, "right"), "right")
    torch.testing.assert_close(m @ new, full_before, atol=1e-5, rtol=0)
    assert (v >= 0).all()


def test_adam_denom_styles_give_the_same_first_step_without_eps():
    v = torch.rand(4, 4) + 0.1
    m = torch.randn(4, 4)
    d_t, s_t = ofn.adam_denom(v, 3, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, style="torch")
    d_g, s_g = ofn.adam_denom(v, 3, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, style="galore")
    torch.testing.assert_close(s_t * m / d_t, s_g * m / d_g)
    with pytest.raises(ValueError, match="adam_style"):
        ofn.adam_denom(v, 1, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, style="nope")
