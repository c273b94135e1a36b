"""Trained Rank Pruning (Xu et al.): energy-rank projection, nuclear-norm subgradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.layers.trp import TRPLinear, TRPSchedule


def nuclear(W: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(W.detach().double()).sum())


@pytest.fixture
def layer() -> TRPLinear:
    torch.manual_seed(0)
    return TRPLinear.from_linear(nn.Linear(12, 10))


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_projection_keeps_the_minimal_energy_rank_and_lowers_the_nuclear_norm(layer, energy):
    S = torch.linalg.svdvals(layer.weight.detach().double())
    frac = (S**2).cumsum(0) / (S**2).sum()
    k_manual = int((frac < energy).sum()) + 1  # the first k whose top-k energy reaches e
    before = nuclear(layer.weight)
    k = layer.project_(energy)
    assert k == k_manual and int(layer.rank_) == k
    assert int(torch.linalg.matrix_rank(layer.weight.detach())) == k
    after = nuclear(layer.weight)
    assert after < before
    assert after == pytest.approx(float(S[:k].sum()), rel=1e-5)


def test_subgradient_step_is_lambda_u_v_t_and_descends_the_nuclear_norm(layer):
    k = layer.project_(0.9)
    layer(torch.randn(5, 12)).pow(2).sum().backward()
    data_grad = layer.weight.grad.clone()
    layer.add_nuclear_grad_(0.01)
    U, S, Vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    UVt = (U[:, :k] @ Vh[:k]).float()
    torch.testing.assert_close(layer.weight.grad - data_grad, 0.01 * UVt, atol=1e-6, rtol=1e-5)
    W = layer.weight.detach()
    assert float((UVt * W).sum()) == pytest.approx(nuclear(W), rel=1e-5)  # <U V^T, W_k> = ||W_k||_*
    eps = 0.1 * float(S[k - 1])
    assert nuclear(W - eps * UVt) == pytest.approx(nuclear(W) - eps * k, rel=1e-5)


def test_energy_one_and_lambda_zero_is_plain_training():
    torch.manual_seed(3)
    lin = nn.Linear(12, 10)
    plain = nn.Linear(12, 10)
    plain.load_state_dict(lin.state_dict())
    model = nn.Sequential(TRPLinear.from_linear(lin))
    sched = TRPSchedule(model, every=1, energy=1.0, lam=0.0)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        x = torch.randn(5, 12)
        model(x).pow(2).sum().backward()
        plain(x).pow(2).sum().backward()
        sched.before_step()
        opt_a.step()
        opt_b.step()
        sched()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert torch.equal(model[0].weight, plain.weight) and sched.runs == [1, 2, 3, 4]


def test_schedule_projects_periodically_and_export_thresholds(layer):
    model = nn.Sequential(layer)
    sched = TRPSchedule(model, every=2, energy=0.9, lam=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        model(torch.randn(5, 12)).pow(2).sum().backward()
        sched.before_step()
        opt.step()
        opt.zero_grad()
        sched()
    assert sched.runs == [2, 4]
    k = int(layer.rank_)
    assert int(torch.linalg.matrix_rank(layer.weight.detach())) == k < 10
    fact = layer.to_factorized()
    assert fact.rank == k
    x = torch.randn(3, 12)
    torch.testing.assert_close(fact(x), layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="energy must lie in"):
        TRPSchedule(model, energy=0.0)
