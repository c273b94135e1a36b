"""LoLDU (arXiv 2410.13618; W = P L U, W_eff = W_res + σ P L_r diag(z) Ũ_r): P L U = W, unit
triangular factors, z-only training, the permuted fast path, zero pivots.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import (
    assert_dense_delta_matches,
    backward_names,
    inputs_for,
    layers_model,
    run,
)

from rankwise import adapt
from rankwise.linalg.lu import lu

SHAPES = {"tall": (9, 6), "wide": (5, 8)}


def adapted(model=None, **kw):
    model = layers_model(SHAPES) if model is None else model
    adapt.adapt_(model, "loldu", target_modules=list(model), **({"rank": 3} | kw))
    return model


def test_factors_reproduce_w_and_the_residual_base_is_w_minus_the_lu_part():
    base = layers_model(SHAPES)
    model = adapted(alpha=2.0)
    for name, layer in model.items():
        W, m = base[name].weight.detach(), layer.adapter
        perm, L, U = lu(W)
        torch.testing.assert_close((L @ U)[perm], W, rtol=1e-10, atol=1e-12)  # P L U = W
        D = torch.diagonal(U)
        torch.testing.assert_close(m.z0, D[:3])
        torch.testing.assert_close(m.U, U[:3] / D[:3, None])
        # W_eff = W_res + σ P L_r diag(z) Ũ_r = W at init (σ = 2/3)
        torch.testing.assert_close(layer.effective_weight(), W, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.base_layer.weight.detach(),
                                   W - 2 / 3 * ((m.L * m.z0) @ m.U)[m.perm], rtol=1e-12,
                                   atol=1e-12)


def test_unit_triangular_factors_and_a_permutation():
    model = adapted()
    for layer in model.values():
        m = layer.adapter
        top = m.L[:3]
        assert torch.all(torch.triu(top, 1) == 0)
        torch.testing.assert_close(torch.diagonal(top), torch.ones(3, dtype=top.dtype))
        torch.testing.assert_close(torch.diagonal(m.U), torch.ones(3, dtype=top.dtype))
        assert torch.all(torch.tril(m.U, -1) == 0)
        assert torch.equal(torch.sort(m.perm).values, torch.arange(m.out_features))


def test_only_z_trains_with_r_parameters_and_the_fast_path_is_the_dense_delta(perturb):
    model = adapted()
    assert adapt.trainable_parameter_count(model) == 2 * 3
    model.train()
    xs = inputs_for(model)
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {"tall.adapter.z", "wide.adapter.z"}
    model.eval()
    perturb(model)
    assert_dense_delta_matches(model, xs)  # checks the row permutation of the fast path


def test_zero_pivots_stay_finite_and_exact():
    model = layers_model(SHAPES, dtype=torch.float32)
    with torch.no_grad():
        model["tall"].weight[:, 0] = 0  # the first pivot is exactly zero in fp32 and fp64
    W = model["tall"].weight.detach().clone()
    adapted(model)
    m = model["tall"].adapter
    assert all(torch.isfinite(t).all() for t in (m.L, m.U, m.z0, m.z))
    assert m.z0[0] == 1  # unnormalised row, product unchanged
    torch.testing.assert_close(model["tall"].effective_weight(), W, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model["tall"](x), model["tall"].base_layer(x)
                               + torch.nn.functional.linear(x, m.offset_weight().detach()),
                               rtol=1e-6, atol=1e-6)


def test_bad_options():
    with pytest.raises(ValueError, match=r"rank 6 exceeds min\(m, n\) = 5"):
        adapted(rank=6)
    with pytest.raises(ValueError, match="alpha"):
        adapted(alpha=float("inf"))
