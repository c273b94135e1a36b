"""SALT (singular value adaptation with a low-rank transformation; W' = U ReLU(S') Vᵀ): the
identity point, exact singular-value shifts and scales, the element-wise ReLU, the regularizer
as a rule, save/load recomputing the SVD.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import (
    assert_save_load_equal,
    backward_names,
    inputs_for,
    layers_model,
    run,
)
from torch import nn

from rankwise import adapt

SHAPES = {"a": (9, 7), "b": (6, 10)}  # k = 7 and 6


def adapted(model=None, **kw):
    model = layers_model(SHAPES) if model is None else model
    adapt.adapt_(model, "salt", target_modules=list(model), **({"rank": 2, "lora_rank": 2} | kw))
    return model


def test_identity_point_gives_w_and_the_official_init_is_close():
    base = layers_model(SHAPES)
    model = adapted()
    for name, layer in model.items():
        W = base[name].weight.detach()
        drift = (layer.effective_weight() - W).abs().max()
        assert 0 < drift < 1e-3  # X, Y ~ N(0, 0.01²): ~1e-4 away from a no-op
        with torch.no_grad():
            layer.adapter.X.zero_()
            layer.adapter.Y.zero_()
        torch.testing.assert_close(layer.effective_weight(), W, rtol=1e-10, atol=1e-12)
        assert layer.adapter.salt_penalty().item() == 0


def test_a_shift_moves_exactly_that_singular_value():
    base = layers_model(SHAPES)
    model = adapted(init="noop")
    layer = model["a"]
    S = torch.linalg.svdvals(base["a"].weight.detach())
    c = 0.25 * (S[0] - S[1]).item()  # keeps σ_1 + c positive and in rank order
    with torch.no_grad():
        layer.adapter.X.zero_()
        layer.adapter.sv_shift[0] = c
    expected = S.clone()
    expected[0] += c
    torch.testing.assert_close(torch.linalg.svdvals(layer.effective_weight()), expected)
    # a scale on σ_2 multiplies it
    with torch.no_grad():
        layer.adapter.sv_shift.zero_()
        layer.adapter.sv_scale[1] = 1.1
    expected = S.clone()
    expected[1] *= 1.1
    got = torch.linalg.svdvals(layer.effective_weight())
    torch.testing.assert_close(torch.sort(got, descending=True).values, expected)


def test_count_grads_and_the_elementwise_relu(perturb):
    model = adapted()
    k = {"a": 7, "b": 6}
    assert adapt.trainable_parameter_count(model) == sum(2 * 2 + 2 * 2 * (k[n] - 2) for n in k)
    model.train()
    xs = inputs_for(model)
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {f"{n}.adapter.{t}" for n in SHAPES for t in ("sv_scale", "sv_shift", "X", "Y")}
    model.eval()
    perturb(model, scale=0.5)
    m = model["a"].adapter
    _, d_rest = m.spectrum_change()
    block = torch.diag(m.S[2:]) + m.X @ m.Y
    torch.testing.assert_close(d_rest, torch.relu(block) - torch.diag(m.S[2:]))
    assert (block < 0).any()  # the element-wise ReLU acts (on off-diagonal entries too)


def test_save_load_recomputes_the_svd(tmp_path, perturb):
    model = adapted()
    perturb(model)
    xs = inputs_for(model)
    loaded = assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path, rtol=1e-10)
    torch.testing.assert_close(loaded["a"].adapter.U, model["a"].adapter.U, rtol=1e-10,
                               atol=1e-12)


def test_regularizer_runs_as_a_training_rule():
    model = nn.ModuleDict({"a": layers_model(SHAPES)["a"]})
    adapted(model, reg_weight=0.5, init="noop")
    m = model["a"].adapter
    assert m.has_rules and not adapted().a.adapter.has_rules
    with torch.no_grad():
        m.sv_shift.copy_(torch.tensor([0.3, -0.4], dtype=torch.float64))
    assert m.regularizer().item() == pytest.approx(0.5 * 0.5)  # ‖c‖ = 0.5, X Y = 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapt.attach_rules(model, opt)
    model.train()
    x = inputs_for(model)["a"]
    model["a"](x).sum().backward()
    g = m.sv_shift.grad.clone()
    before = m.sv_shift.detach().clone()
    opt.step()
    reg_grad = 0.5 * torch.tensor([0.3, -0.4], dtype=torch.float64) / 0.5  # ∇ of w‖c‖
    torch.testing.assert_close(m.sv_shift.detach(), before - 0.1 * (g + reg_grad))


def test_bad_options():
    with pytest.raises(ValueError, match="init must be"):
        adapted(init="zero")
    with pytest.raises(ValueError, match=r"rank 7 exceeds min\(m, n\) = 6"):
        adapted(rank=7)
