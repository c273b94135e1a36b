"""ALLoRA (arXiv 2410.09692; y = W x + B A x, no α and no dropout): gradients scaled by
c(‖θ‖) = 1/√(‖θ‖² + 1/η²) per row or matrix, a larger norm gives a smaller step, count r(m + n).

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from adapt_checks import (
    inputs_for,
    layers_model,
    run,
)

from rankwise import adapt
from rankwise.adapt.methods.allora import ALLoRAConfig, allora_coefficient

SHAPES = {"a": (9, 7), "b": (5, 8)}


def adapted(**kw):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "allora", target_modules=list(SHAPES), **({"rank": 3} | kw))
    return model


def raw_grads(model, xs):
    """Unscaled gradients of the same loss, by autograd through B A with plain tensors."""
    out = {}
    for name, layer in model.items():
        A = layer.adapter.A.detach().clone().requires_grad_(True)
        B = layer.adapter.B.detach().clone().requires_grad_(True)
        y = layer.base_layer(xs[name]) + xs[name] @ A.T @ B.T
        y.square().sum().backward()
        out[name] = (A.grad, B.grad)
    return out


def test_no_alpha_or_dropout_and_count_is_r_times_m_plus_n():
    fields = {f.name for f in dataclasses.fields(ALLoRAConfig)}
    assert fields == {"rank", "eta", "granularity"}
    with pytest.raises(TypeError, match="no option"):
        adapted(alpha=2.0)
    model = adapted()
    assert adapt.trainable_parameter_count(model) == sum(3 * (o + i) for o, i in SHAPES.values())


@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_stored_grad_is_the_raw_grad_times_c(perturb, granularity):
    model = adapted(eta=2.0, granularity=granularity)
    perturb(model, scale=0.5)
    with torch.no_grad():
        model["a"].adapter.B[0].zero_()  # a zero row: c = η, finite
    xs = inputs_for(model)
    raw = raw_grads(model, xs)
    model.train()
    sum(o.square().sum() for o in run(model, xs).values()).backward()
    for name, layer in model.items():
        for p, g in zip((layer.adapter.A, layer.adapter.B), raw[name], strict=True):
            if granularity == "row":
                norm = p.detach().norm(dim=1, keepdim=True)
            else:
                norm = p.detach().norm()
            c = 1 / torch.sqrt(norm**2 + 1 / 2.0**2)
            torch.testing.assert_close(p.grad, g * c, rtol=1e-12, atol=1e-14)
            assert torch.isfinite(p.grad).all()
    c0 = allora_coefficient(torch.zeros(1, dtype=torch.float64), 2.0)
    assert c0.item() == 2.0  # bounded at ‖θ‖ = 0: c(0) = η


def test_larger_norm_means_smaller_step():
    nu = torch.linspace(0, 10, 50, dtype=torch.float64)
    c = allora_coefficient(nu, 1.5)
    assert torch.all(c[1:] < c[:-1])
    model = adapted()
    layer = model["a"]
    with torch.no_grad():
        layer.adapter.B.copy_(torch.ones_like(layer.adapter.B))
        layer.adapter.B[1].mul_(10)  # row 1 has 10× the norm of row 0
    x = torch.randn(4, 7, dtype=torch.float64)
    model.train()
    # a loss whose raw gradient is identical for rows 0 and 1 of B
    (layer(x)[:, :2].sum()).backward()
    g = layer.adapter.B.grad
    assert g[1].norm() < g[0].norm()


def test_bad_options():
    with pytest.raises(ValueError, match="eta must be"):
        adapted(eta=0.0)
    with pytest.raises(ValueError, match="granularity"):
        adapted(granularity="column")
