"""ReLoRA (Lialin et al., ICLR 2024): merge-and-restart, optimizer resets, jagged cosine LR."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from rankwise.layers.relora import ReLoRALinear, ReLoRASchedule
from rankwise.layers.schedules import jagged_cosine, quantile_linear, reset_optimizer_state_


def step_(model: nn.Module, opt: torch.optim.Optimizer, n_in: int = 12) -> None:
    model(torch.randn(6, n_in)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def test_init_is_the_frozen_linear_and_only_adapters_train():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    layer = ReLoRALinear.from_linear(lin, rank=3, dropout=0.0, generator=0)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.trainable_names() == ("bias", "A", "B") and not layer.weight.requires_grad
    assert float(layer.A.detach().abs().max()) <= 1 / 12**0.5


def test_merge_leaves_the_function_unchanged_and_rank_grows_past_r():
    torch.manual_seed(0)
    layer = ReLoRALinear.from_linear(nn.Linear(12, 10), rank=2, dropout=0.1, generator=0)
    W0 = layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(3, 12)
    for restart in range(3):
        layer.train()
        for _ in range(3):
            step_(layer, opt)
        layer.eval()
        with torch.no_grad():
            before = layer(x)
            layer.merge_and_reinit_()
            torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(layer.B) == 0 and int(layer.restarts) == restart + 1
    assert int(torch.linalg.matrix_rank(layer.weight.detach() - W0)) > 2


def test_schedule_resets_only_the_adapter_state():
    torch.manual_seed(0)
    model = nn.Sequential(
        ReLoRALinear.from_linear(nn.Linear(12, 10), rank=2, dropout=0.0), nn.Linear(10, 4)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sched = ReLoRASchedule(model, opt, every=3)
    for _ in range(3):
        step_(model, opt)
        sched()
    layer = model[0]
    assert sched.runs == [3] and int(layer.restarts) == 1
    for p in (layer.A, layer.B):
        assert (
            float(opt.state[p]["exp_avg"].abs().sum())
            == 0
            == float(opt.state[p]["exp_avg_sq"].abs().sum())
        )
        assert int(opt.state[p]["step"]) == 3  # the reference keeps the step counter
    assert float(opt.state[layer.bias]["exp_avg"].abs().sum()) > 0
    assert float(opt.state[model[1].weight]["exp_avg"].abs().sum()) > 0
    with pytest.raises(ValueError, match="must reset optimizer state"):
        ReLoRASchedule(model, every=1)()


def test_magnitude_reset_zeroes_floor_p_n_minus_1_plus_1_entries():
    p = nn.Parameter(torch.zeros(5))
    opt = torch.optim.Adam([p])
    opt.state[p] = {
        "step": torch.tensor(7.0),
        "exp_avg": torch.tensor([0.5, -0.1, 0.3, -0.9, 0.7]),
        "exp_avg_sq": torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0]),
    }
    zeroed = reset_optimizer_state_(opt, [p], mode="magnitude", ratio=0.9)
    assert zeroed == 2 * (math.floor(0.9 * 4) + 1) == 8
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.0, 0.0, 0.0, -0.9, 0.0]))
    assert float(opt.state[p]["step"]) == 7.0
    x = torch.randn(1000)
    for q in (0.0, 0.37, 0.9, 1.0):
        torch.testing.assert_close(quantile_linear(x, q), torch.quantile(x, q))


def test_random_reset_fraction_and_step_reset_gives_an_adam_first_step():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4000))
    opt = torch.optim.Adam([p], lr=0.1)
    for _ in range(3):
        p.pow(3).sum().backward()
        opt.step()
        opt.zero_grad()
    zeroed = reset_optimizer_state_(
        opt, [p], mode="random", ratio=0.3, generator=torch.Generator().manual_seed(0)
    )
    assert abs(zeroed / 8000 - 0.3) < 0.03
    reset_optimizer_state_(opt, [p], mode="full", reset_step=True)
    fresh_p = nn.Parameter(p.detach().clone())
    fresh = torch.optim.Adam([fresh_p], lr=0.1)
    for q, o in ((p, opt), (fresh_p, fresh)):
        q.pow(3).sum().backward()
        o.step()
    assert torch.equal(p, fresh_p)
    with pytest.raises(ValueError, match="mode must be"):
        reset_optimizer_state_(opt, [p], mode="partial")


def test_jagged_cosine_is_zero_at_resets_and_meets_the_envelope():
    f = functools.partial(
        jagged_cosine,
        total_steps=1000,
        warmup_steps=100,
        restart_every=250,
        restart_warmup_steps=20,
        min_ratio=0.1,
    )
    plain = functools.partial(jagged_cosine, total_steps=1000, warmup_steps=100, min_ratio=0.1)
    assert f(0) == 0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(1.0)
    assert plain(1000) == pytest.approx(0.1) and plain(550) == pytest.approx(0.55)
    for reset in (250, 500, 750):
        assert f(reset) == 0.0
        assert f(reset + 20) == pytest.approx(plain(reset + 20))
        assert f(reset + 10) == pytest.approx(0.5 * plain(reset + 20))
        assert f(reset - 1) == pytest.approx(plain(reset - 1))
    with pytest.raises(ValueError, match="must exceed restart_warmup_steps"):
        jagged_cosine(0, total_steps=10, restart_every=5, restart_warmup_steps=5)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for _ in range(250):  # after update 250 (0-based 249) the next LR is the reset's 0
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == 0.0
