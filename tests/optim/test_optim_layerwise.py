"""Layer-wise updates from gradient hooks equal the fused step (GaLore, Zhao et al. 2024, §4.2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.optim as ro


def _run(tiny, batch, layerwise: bool, steps: int = 5, accumulation: int = 1,
         name: str = "galore_adamw"):
    model = tiny()
    opt = ro.create(name, model, rank=4, update_proj_gap=2, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    hooks = ro.LayerwiseUpdates(opt, accumulation_steps=accumulation) if layerwise else None
    for i in range(steps):
        for j in range(accumulation):
            x, y = batch(i * accumulation + j)
            loss = nn.functional.cross_entropy(model(x), y) / accumulation
            loss.backward()
            if layerwise and j < accumulation - 1:
                assert all(p.grad is not None for p in model.parameters())
        if layerwise:
            assert all(p.grad is None for p in model.parameters()), "hooks must free gradients"
        opt.step()  # a no-op after the hooks ran
        opt.zero_grad()
        sched.step()
    if hooks is not None:
        hooks.remove()
    return model.state_dict()


@pytest.mark.parametrize("name", ["galore_adamw", "fira", "dct_adamw"])
def test_layerwise_hooks_equal_fused_step(name, tiny, batch):
    fused, hooked = _run(tiny, batch, False, name=name), _run(tiny, batch, True, name=name)
    for key in fused:
        assert torch.equal(fused[key], hooked[key]), key


def test_layerwise_with_gradient_accumulation_equals_fused(tiny, batch):
    fused = _run(tiny, batch, False, accumulation=2)
    hooked = _run(tiny, batch, True, accumulation=2)
    for key in fused:
        torch.testing.assert_close(hooked[key], fused[key], rtol=0, atol=1e-7)


def test_removed_hooks_leave_gradients_alone(tiny, batch):
    model = tiny()
    opt = ro.create("galore_adamw", model, rank=4)
    ro.LayerwiseUpdates(opt).remove()
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
