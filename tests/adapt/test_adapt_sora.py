"""SoRA (Ding et al., EMNLP 2023; y = W x + s B (g ⊙ A x)): the proximal gate step and the L1
term via the rules, gates not weight-decayed, pruning zero gates gives an equal plain LoRA.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import (
    inputs_for,
    layers_model,
    run,
)

from rankwise import adapt
from rankwise.adapt.methods.lora import LoRA
from rankwise.adapt.methods.sora import prune_to_lora_, soft_threshold, sora_param_groups

SHAPES = {"a": (9, 7), "b": (5, 8)}


def adapted(**kw):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "sora", target_modules=list(SHAPES), **({"rank": 4} | kw))
    return model


def set_gates(model, values):
    with torch.no_grad():
        for layer, v in zip(model.values(), values, strict=True):
            layer.adapter.gate.copy_(torch.tensor(v, dtype=torch.float64))


def test_soft_threshold_values():
    g = torch.tensor([0.5, -0.05, 0.15, -0.5])
    torch.testing.assert_close(soft_threshold(g, 0.1), torch.tensor([0.4, 0.0, 0.05, -0.4]))
    # the official sequence: 0.15 → 0.05 → 0 (dead zone 2λ₂)
    torch.testing.assert_close(soft_threshold(g, 0.1, official=True),
                               torch.tensor([0.4, 0.0, 0.0, -0.4]))


@pytest.mark.parametrize("lr", [0.0, 0.5])
def test_the_prox_step_runs_after_each_optimizer_step_and_ignores_the_lr(lr):
    model = adapted(threshold=0.1, l1_weight=0.0)
    set_gates(model, [[0.5, -0.05, 0.15, 1.0], [0.0, 0.3, -0.2, 0.1]])
    opt = torch.optim.SGD(sora_param_groups(model), lr=lr)
    adapt.attach_rules(model, opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    torch.testing.assert_close(model["a"].adapter.gate.detach(),
                               torch.tensor([0.4, 0.0, 0.05, 0.9], dtype=torch.float64))
    torch.testing.assert_close(model["b"].adapter.gate.detach(),
                               torch.tensor([0.0, 0.2, -0.1, 0.0], dtype=torch.float64))


def test_l1_term_is_the_mean_over_all_gates_of_the_model():
    model = adapted(threshold=0.0, l1_weight=0.2)
    set_gates(model, [[0.5, -0.05, 0.15, 1.0], [0.1, 0.3, -0.2, 0.1]])
    gates = [layer.adapter.gate for layer in model.values()]
    before = [g.detach().clone() for g in gates]
    ref = [g.detach().clone().requires_grad_(True) for g in gates]
    (0.2 * torch.cat(ref).abs().mean()).backward()  # λ₁ · mean |g| over all 8 gates
    layers = [layer.adapter for layer in model.values()]
    assert type(layers[0]).l1_penalty(layers).item() == pytest.approx(
        0.2 * torch.cat(before).abs().mean().item())
    opt = torch.optim.SGD(sora_param_groups(model), lr=1.0)
    adapt.attach_rules(model, opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for g, g0, r in zip(gates, before, ref, strict=True):
        torch.testing.assert_close(g.detach(), g0 - r.grad)


def test_gates_are_not_weight_decayed():
    model = adapted()
    groups = sora_param_groups(model, weight_decay=0.1, gate_lr=0.01)
    gate_ids = {id(layer.adapter.gate) for layer in model.values()}
    assert {id(p) for p in groups[1]["params"]} == gate_ids
    assert groups[1]["weight_decay"] == 0 and groups[1]["lr"] == 0.01
    assert not gate_ids & {id(p) for p in groups[0]["params"]} and groups[0]["weight_decay"] == 0.1
    decayed = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapt.attach_rules(model, decayed)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    with pytest.warns(RuntimeWarning, match="gates are weight-decayed"):
        decayed.step()


def test_count_is_r_times_m_plus_n_plus_one_gate_and_training_needs_rules():
    model = adapted()
    xs = inputs_for(model)
    assert adapt.trainable_parameter_count(model) == sum(4 * (o + i + 1) for o, i in SHAPES.values())
    model.train()
    with pytest.raises(RuntimeError, match="attach_rules"):
        run(model, xs)


def test_pruning_zero_gates_gives_an_equal_plain_lora(perturb):
    model = adapted(rank=4, alpha=6.0)
    perturb(model)
    set_gates(model, [[0.5, 0.0, -1.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    xs = inputs_for(model)
    expected = run(model, xs)
    adapt.merge_(model)  # pruning unmerges first
    prune_to_lora_(model)
    layer = model["a"]
    assert isinstance(layer.adapter, LoRA) and layer.adapter.A.shape == (2, 7)
    assert isinstance(model["b"], torch.nn.Linear)  # every gate zero: the layer is unadapted
    for name, out in run(model, xs).items():
        torch.testing.assert_close(out, expected[name], rtol=1e-6, atol=1e-9)
    assert adapt.trainable_parameter_count(model) == 2 * (9 + 7)
