"""Training-time rules: one optimizer-hook mechanism; a forgotten rule fails loudly."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from rankwise import adapt
from rankwise.adapt.methods import LoRA

LAM = 0.05  # soft threshold of the toy proximal rule
REG = 0.1  # weight of its L1 regularizer


class ToyProx(LoRA):
    """LoRA + an L1 term on B and a proximal soft-threshold after every step (SoRA-like)."""

    has_rules = True
    seen: list[tuple[int, int | None, int]] = []

    def regularizer(self) -> torch.Tensor:
        return REG * self.B.abs().sum()

    def after_step(self, state) -> None:
        with torch.no_grad():
            self.B.copy_(torch.sign(self.B) * torch.clamp(self.B.abs() - LAM, min=0))

    @classmethod
    def group_after_step(cls, methods, state) -> None:
        cls.seen.append((state.step, state.total_steps, len(methods)))
        super().group_after_step(methods, state)


@pytest.fixture
def prox_model():
    adapt.register_method("toy_prox", ToyProx)
    ToyProx.seen = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    adapt.adapt_(model, "toy_prox", rank=2, target_modules=["0", "2"])
    with torch.no_grad():
        for layer in adapt.adapter_layers(model).values():
            layer.adapter.B.normal_(std=0.2)
    yield model
    adapt.unregister_method("toy_prox")


def test_training_without_attached_rules_raises(prox_model):
    x = torch.randn(3, 6)
    prox_model.eval()
    prox_model(x)  # inference is fine
    prox_model.train()
    with torch.no_grad():
        prox_model(x)  # no graph, no training
    with pytest.raises(RuntimeError, match="attach_rules"):
        prox_model(x)


def test_rules_run_around_each_optimizer_step(prox_model):
    opt = torch.optim.SGD([p for p in prox_model.parameters() if p.requires_grad], lr=0.1)
    rules = adapt.attach_rules(prox_model, opt, total_steps=7)
    prox_model.train()
    layer = prox_model[2]
    B0 = layer.adapter.B.detach().clone()
    prox_model(torch.randn(3, 6)).square().sum().backward()
    g = layer.adapter.B.grad.clone()
    opt.step()
    # SGD on loss + REG·|B|₁ (regularizer gradient added by the pre-hook), then the prox step
    stepped = B0 - 0.1 * (g + REG * torch.sign(B0))
    expected = torch.sign(stepped) * torch.clamp(stepped.abs() - LAM, min=0)
    torch.testing.assert_close(layer.adapter.B.detach(), expected)
    assert ToyProx.seen == [(0, 7, 2)]  # one group call over both layers
    assert rules.step == 1 and layer.adapter.rule_steps == 1
    rules.detach()
    with pytest.raises(RuntimeError, match="not attached"):
        prox_model(torch.randn(3, 6))


def test_attach_checks_the_optimizer_holds_the_adapter(prox_model):
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="does not hold"):
        adapt.attach_rules(prox_model, other)


def test_merging_after_training_without_a_rule_step_warns(prox_model):
    opt = torch.optim.SGD([p for p in prox_model.parameters() if p.requires_grad], lr=0.1)
    adapt.attach_rules(prox_model, opt)
    prox_model.train()
    prox_model(torch.randn(3, 6)).sum().backward()  # trained forward, but no opt.step()
    with pytest.warns(RuntimeWarning, match="rule never ran"):
        adapt.merge_(prox_model)


def test_trainer_callback_attaches_to_the_trainers_optimizer(prox_model):
    from transformers import TrainerCallback

    cb = adapt.rules_callback()
    assert isinstance(cb, TrainerCallback)
    opt = torch.optim.SGD([p for p in prox_model.parameters() if p.requires_grad], lr=0.1)
    state = types.SimpleNamespace(max_steps=11)
    cb.on_train_begin(None, state, None, model=prox_model, optimizer=opt)
    prox_model.train()
    prox_model(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert ToyProx.seen == [(0, 11, 2)]
    cb.on_train_end(None, state, None)
    assert not prox_model[0].adapter.rules_attached


def test_methods_without_rules_train_freely():
    model = nn.Sequential(nn.Linear(6, 5))
    adapt.adapt_(model, "lora", rank=2, target_modules=["0"])
    model.train()
    model(torch.randn(2, 6)).sum().backward()  # no rules needed, no error
    rules = adapt.attach_rules(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert rules.methods == []
