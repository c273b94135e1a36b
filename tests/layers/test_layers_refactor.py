"""Weight refactorization (Glentis et al. 2025): same product, balanced factors, momentum reset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.layers.factorized import FactorizedLinear
from rankwise.layers.refactor import RefactorSchedule, refactorize, refactorize_
from rankwise.layers.sltrain import SLTrainLinear


def test_product_unchanged_and_factors_balanced():
    torch.manual_seed(0)
    B, A = torch.randn(20, 4) * 3, torch.randn(4, 15) * 0.1
    B2, A2 = refactorize(B, A)
    assert float((B2 @ A2 - B @ A).norm() / (B @ A).norm()) < 1e-6
    S = torch.linalg.svdvals(B @ A)[:4]
    torch.testing.assert_close(B2.T @ B2, torch.diag(S), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(A2 @ A2.T, torch.diag(S), atol=1e-4, rtol=1e-5)
    B3, A3 = refactorize(B2, A2)  # again: the same factors up to a shared sign per rank
    torch.testing.assert_close(B3.abs(), B2.abs(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(A3.abs(), A2.abs(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="exceeds min"):
        refactorize(torch.randn(3, 5), torch.randn(5, 9))


def test_in_place_on_layers_keeps_outputs_and_skips_rank_deficient_products():
    layer = SLTrainLinear(10, 8, rank=3, density=0.2, generator=0)
    assert refactorize_(layer) == []  # B = 0: nothing to balance, A must survive
    assert torch.count_nonzero(layer.A) > 0
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(4, 10)
    before = layer(x).detach()
    B_obj = layer.B
    assert refactorize_(layer) == [layer.B, layer.A] and layer.B is B_obj
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_schedule_resets_moments_so_the_next_update_is_an_adam_first_step():
    torch.manual_seed(0)
    model = nn.Sequential(FactorizedLinear.from_dense(nn.Linear(12, 10), 3), nn.Linear(10, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = RefactorSchedule(model, opt, every=2)
    for _ in range(2):
        model(torch.randn(5, 12)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched()
    assert sched.runs == [2]
    A = model[0].A.weight
    assert float(opt.state[A]["exp_avg"].abs().sum()) == 0 and int(opt.state[A]["step"]) == 0
    assert int(opt.state[model[1].weight]["step"]) == 2  # other parameters keep their state
    x = torch.randn(5, 12)
    model(x).pow(2).sum().backward()
    fresh_A = nn.Parameter(A.detach().clone())
    fresh = torch.optim.AdamW([fresh_A], lr=0.01)
    fresh_A.grad = A.grad.clone()
    opt.step()
    fresh.step()
    torch.testing.assert_close(A, fresh_A)
    with pytest.raises(ValueError, match="no factorised layers"):
        RefactorSchedule(nn.Sequential(nn.Linear(2, 2)), opt)
