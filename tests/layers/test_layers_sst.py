"""Sparse Spectral Training (Zhao et al.): orthonormal after re-SVD, sampling by |sigma|, sigma grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.sst import SSTLinear, SSTSchedule, sample_indices


@pytest.fixture
def layer() -> SSTLinear:
    torch.manual_seed(0)
    return SSTLinear.from_linear(nn.Linear(12, 9), rank=3, generator=0)


def train_(layer: nn.Module, steps: int = 3, lr: float = 0.05) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        layer(torch.randn(6, 12)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_svd_init_reproduces_the_weight():
    torch.manual_seed(1)
    lin = nn.Linear(12, 9)
    layer = SSTLinear.from_linear(lin, rank=4)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    assert layer.sigma.shape == (9,) and layer.U_s.shape == (9, 4) and layer.Vh_s.shape == (4, 12)


def test_resvd_restores_orthonormality_and_keeps_the_output(layer):
    train_(layer)
    U, Vh = (t.detach() for t in layer._vectors())
    assert (U.T @ U - torch.eye(9)).abs().max() > 1e-3  # training broke orthonormality
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = layer(x)
        layer.resvd_()
        after = layer(x)
    U, Vh = (t.detach() for t in layer._vectors())
    torch.testing.assert_close(U.T @ U, torch.eye(9), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(9), atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert bool((layer.sigma[:-1] >= layer.sigma[1:]).all())


def test_sampling_frequency_is_proportional_to_sigma():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_indices(sigma, 1, gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).double() / 4000
    torch.testing.assert_close(
        freq, torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64), atol=0.03, rtol=0
    )
    two = sample_indices(sigma, 2, gen)
    assert two.unique().numel() == 2 and torch.equal(two, two.sort().values)


def test_sigma_gradient_is_diag_of_u_t_g_v(layer):
    x, target = torch.randn(7, 12), torch.randn(7, 9)
    (layer(x) - target).pow(2).sum().backward()
    W = nn.Parameter(layer.dense_weight().detach())
    (F.linear(x, W, layer.bias.detach()) - target).pow(2).sum().backward()
    U, Vh = (t.detach() for t in layer._vectors())
    torch.testing.assert_close(
        layer.sigma.grad, torch.diagonal(U.T @ W.grad @ Vh.T), atol=1e-4, rtol=1e-4
    )
    assert layer.U.grad is None and layer.Vh.grad is None  # frozen vectors get nothing


def test_frozen_vectors_are_bit_identical_during_a_sampling_period(layer):
    U0, Vh0 = layer.U.detach().clone(), layer.Vh.detach().clone()
    Us0 = layer.U_s.detach().clone()
    train_(layer)
    assert torch.equal(layer.U, U0) and torch.equal(layer.Vh, Vh0)
    assert not torch.equal(layer.U_s, Us0)
    U, _ = layer._vectors()
    others = torch.ones(9, dtype=torch.bool)
    others[layer.sampled] = False
    assert torch.equal(U.detach()[:, others], U0[:, others])


def test_enhanced_gradient_drops_the_sigma_factor():
    torch.manual_seed(2)
    lin = nn.Linear(12, 9)
    plain = SSTLinear.from_linear(lin, rank=3, generator=5)
    enhanced = SSTLinear.from_linear(lin, rank=3, generator=5, enhanced_grad=True)
    x = torch.randn(5, 12)
    plain(x).sum().backward()
    enhanced(x).sum().backward()
    sig = plain.sigma.detach()[plain.sampled]
    torch.testing.assert_close(enhanced.U_s.grad, plain.U_s.grad / sig, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        enhanced.Vh_s.grad, plain.Vh_s.grad / sig[:, None], atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(enhanced.sigma.grad, plain.sigma.grad)


def test_schedule_resamples_resvds_and_resets_state(layer):
    model = nn.Sequential(layer)
    opt = train_(model, steps=1)
    sched = SSTSchedule(model, opt, every=2, svd_every=4, seed=0)
    x = torch.randn(3, 12)
    for step in range(1, 5):
        model(torch.randn(6, 12)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            before = model(x)
        sched()
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        if step % 2 == 0:
            assert float(opt.state[layer.U_s]["exp_avg"].abs().sum()) == 0.0
            assert int(opt.state[layer.U_s]["step"]) == 0
    assert sched.runs == [2, 4]
    U, _ = layer._vectors()
    torch.testing.assert_close(U.detach().T @ U.detach(), torch.eye(9), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of every"):
        SSTSchedule(model, opt, every=3, svd_every=4)
