"""SVFit (fine-tuning the top-r singular values; W_eff = W_res + U diag(σ) Vᵀ): W_eff = W at init,
orthonormal bases, spectrum of W_eff, σ-only training, the energy rule for ranks.

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

from rankwise import adapt

SHAPES = {"a": (9, 7), "b": (5, 11)}


def adapted(model=None, **kw):
    model = layers_model(SHAPES) if model is None else model
    adapt.adapt_(model, "svfit", target_modules=list(model), **({"rank": 3} | kw))
    return model


def test_w_eff_is_w_at_init_and_the_bases_are_orthonormal():
    base = layers_model(SHAPES)
    model = adapted()
    for name, layer in model.items():
        W = base[name].weight.detach()
        torch.testing.assert_close(layer.effective_weight(), W, rtol=1e-12, atol=1e-12)
        m = layer.adapter
        torch.testing.assert_close(m.U.T @ m.U, torch.eye(3, dtype=W.dtype))
        torch.testing.assert_close(m.Vh @ m.Vh.T, torch.eye(3, dtype=W.dtype))
        torch.testing.assert_close(m.sigma.detach(), torch.linalg.svdvals(W)[:3])


def test_singular_values_of_w_eff_are_the_trained_ones_and_the_residual_ones():
    base = layers_model(SHAPES)
    model = adapted()
    new = torch.tensor([0.7, -4.0, 2.5], dtype=torch.float64)  # any values, any sign
    with torch.no_grad():
        model["a"].adapter.sigma.copy_(new)
    S = torch.linalg.svdvals(base["a"].weight.detach())
    expected = torch.sort(torch.cat([new.abs(), S[3:]]), descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(model["a"].effective_weight()), expected)


def test_only_sigma_trains_with_r_parameters():
    model = adapted()
    assert adapt.trainable_parameter_count(model) == 2 * 3
    model.train()
    xs = inputs_for(model)
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {"a.adapter.sigma", "b.adapter.sigma"}


def test_energy_rule_picks_the_minimal_rank_per_layer(tmp_path, perturb):
    g = torch.Generator().manual_seed(4)
    spectra = {"a": [10.0, 6.0, 3.0, 2.0, 0.5, 0.2, 0.1], "b": [5.0, 1.0, 0.9, 0.3, 0.1]}
    model = layers_model(SHAPES)
    with torch.no_grad():
        for name, s in spectra.items():
            o, i = SHAPES[name]
            Q1, _ = torch.linalg.qr(torch.randn(o, len(s), generator=g, dtype=torch.float64))
            Q2, _ = torch.linalg.qr(torch.randn(i, len(s), generator=g, dtype=torch.float64))
            model[name].weight.copy_(Q1 @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ Q2.T)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    adapted(model, rank=1, energy=0.99)
    for name, s in spectra.items():
        r = model[name].adapter.rank
        frac = torch.cumsum(torch.tensor(s) ** 2, 0) / sum(x * x for x in s)
        assert frac[r - 1] >= 0.99 and (r == 1 or frac[r - 2] < 0.99)
    assert (model["a"].adapter.rank, model["b"].adapter.rank) == (4, 3)
    assert adapt.trainable_parameter_count(model) == 4 + 3
    perturb(model)
    other = layers_model(SHAPES)
    other.load_state_dict(fresh)
    loaded = assert_save_load_equal(model, other, inputs_for(model), tmp_path, rtol=1e-12)
    assert loaded["a"].adapter.rank == 4


def test_bad_options():
    with pytest.raises(ValueError, match="energy must be None or in"):
        adapted(energy=1.5)
    with pytest.raises(ValueError, match=r"rank 6 exceeds min\(m, n\) = 5"):
        adapted(rank=6)
