"""Maestro (Horvath et al., ICML 2024): SVD init, nested ranks, group lasso / importance, shrinking, sampler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.maestro import MaestroLinear, MaestroSchedule


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(10, 8)


def test_full_width_reproduces_the_dense_layer_and_width_k_is_the_truncated_svd(linear):
    layer = MaestroLinear.from_linear(linear)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    for k in (1, 3, 8):
        layer.set_active_rank(k)
        expected = F.linear(x, U[:, :k] * S[:k] @ Vh[:k], linear.bias.detach())
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_nested_ranks_truncation_equals_training_time_rank_k_output(linear):
    layer = MaestroLinear.from_linear(linear)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # ordered-dropout training at random widths
        layer.set_active_rank(int(torch.randint(1, 9, (1,), generator=gen)))
        layer(torch.randn(6, 10)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(3, 10)
    with torch.no_grad():
        for k in range(1, 9):
            layer.set_active_rank(k)
            torch.testing.assert_close(layer.to_factorized(k)(x), layer(x), atol=1e-6, rtol=1e-6)


def test_group_lasso_and_importance_match_a_manual_computation(linear):
    layer = MaestroLinear.from_linear(linear)
    A, B = layer.A.detach(), layer.B.detach()
    d = A.shape[0]
    ta = torch.stack([A[i:].norm() for i in range(d)])
    tb = torch.stack([B[:, i:].norm() for i in range(d)])
    torch.testing.assert_close(layer.group_lasso().detach(), ta.sum() + tb.sum())
    imp = layer.importance()
    torch.testing.assert_close(imp, ta * tb)
    assert bool((imp[:-1] >= imp[1:]).all())


def test_shrinking_zero_ranks_keeps_outputs(linear):
    layer = MaestroLinear.from_linear(linear)
    with torch.no_grad():
        layer.A[5:] = 0
        layer.B[:, 5:] = 0
    x = torch.randn(4, 10)
    before = layer(x).detach()
    assert layer.shrink_(1e-5) == 5
    assert layer.rank == 5 and int(layer.kept) == 5
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
    compact = layer.to_compact()  # 5 (8 + 10) = 90 > 80: dense is smaller
    assert isinstance(compact, nn.Linear)
    torch.testing.assert_close(compact(x), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="active rank must be an int in \\[1, 5\\]"):
        layer.set_active_rank(6)


def test_schedule_sampler_covers_every_pair_and_truncates_one_layer():
    model = nn.Sequential(
        MaestroLinear.from_linear(nn.Linear(6, 4)), MaestroLinear.from_linear(nn.Linear(4, 3))
    )
    sched = MaestroSchedule(model, seed=0)
    seen = [sched.current]
    for _ in range(6):
        sched()
        seen.append(sched.current)
    assert sorted(seen) == sorted([("0", k) for k in range(1, 5)] + [("1", k) for k in range(1, 4)])
    name, k = sched.current
    with sched.truncated():
        assert model[int(name)].rank == k and model[1 - int(name)].active_rank is None
    assert model[int(name)].active_rank is None


def test_schedule_adds_the_lasso_gradient_and_distillation_is_soft_cross_entropy():
    model = nn.Sequential(MaestroLinear.from_linear(nn.Linear(6, 4)))
    sched = MaestroSchedule(model, lam=0.1)
    layer = model[0]
    model(torch.randn(3, 6)).pow(2).sum().backward()
    data_A, data_B = layer.A.grad.clone(), layer.B.grad.clone()
    lasso_A, lasso_B = torch.autograd.grad(0.1 * layer.group_lasso(), (layer.A, layer.B))
    sched.before_step()
    torch.testing.assert_close(layer.A.grad, data_A + lasso_A)
    torch.testing.assert_close(layer.B.grad, data_B + lasso_B)
    assert float(lasso_A.abs().sum()) > 0
    full, part = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    manual = -(full.softmax(-1) * part.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(MaestroSchedule.distillation_loss(full, part), manual)


def test_schedule_shrinks_periodically():
    model = nn.Sequential(MaestroLinear.from_linear(nn.Linear(6, 4)))
    with torch.no_grad():
        model[0].A[2:] = 0
        model[0].B[:, 2:] = 0
    sched = MaestroSchedule(model, every=3)
    for _ in range(3):
        sched()
    assert sched.runs == [3] and int(model[0].kept) == 2
    assert sched.current[1] <= 2
