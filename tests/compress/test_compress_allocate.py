"""Rank allocation: budgets are met from below, break-even is respected, policies behave."""

from __future__ import annotations

import pytest
import torch

from rankwise.compress.allocate import LayerSpec, allocate_ranks, allocation_parameters
from rankwise.linalg import break_even_rank


def _layers(seed: int = 0) -> dict[str, LayerSpec]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = {"q_proj": (64, 64), "k_proj": (16, 64), "up_proj": (160, 64), "down_proj": (64, 160)}
    for i in range(3):
        for name, (m, n) in shapes.items():
            k = min(m, n)
            decay = 0.5 + torch.rand(1, generator=g).item() * 2.5  # flatter or steeper spectra
            s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
            out[f"layers.{i}.{name}"] = LayerSpec(m, n, s * (1 + torch.rand(1, generator=g).item()))
    return out


@pytest.mark.parametrize("policy", ["uniform", "energy", "welore", "budget", "dynamic"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_budget_met_and_no_rank_above_break_even(policy, ratio):
    layers = _layers()
    ranks = allocate_ranks(layers, ratio, policy)
    dense = sum(s.out_features * s.in_features for s in layers.values())
    assert allocation_parameters(layers, ranks) <= (1 - ratio) * dense
    for f, r in ranks.items():
        assert r is None or 1 <= r <= break_even_rank(*layers[f].shape)


def test_budget_policy_spends_the_budget_within_one_step():
    layers = _layers()
    ranks = allocate_ranks(layers, 0.3, "budget")
    dense = sum(s.out_features * s.in_features for s in layers.values())
    slack = 0.7 * dense - allocation_parameters(layers, ranks)
    assert 0 <= slack < max(s.out_features + s.in_features for s in layers.values())


def test_budget_policy_gives_flat_spectra_more_rank():
    flat = torch.ones(64, dtype=torch.float64)
    steep = torch.arange(1, 65, dtype=torch.float64) ** -2.0
    layers = {"a.q": LayerSpec(64, 64, flat), "b.q": LayerSpec(64, 64, steep)}
    ranks = allocate_ranks(layers, 0.6, "budget")
    assert ranks["a.q"] > ranks["b.q"]


def test_dynamic_equal_spectra_give_equal_ranks_and_flatter_never_less():
    s = torch.arange(1, 65, dtype=torch.float64) ** -1.0
    same = {f"l.{i}.q": LayerSpec(64, 64, s.clone()) for i in range(4)}
    ranks = allocate_ranks(same, 0.6, "dynamic")
    assert max(ranks.values()) - min(ranks.values()) <= 1  # equal up to D-Rank's integer repair
    mixed = {f"l.{i}.q": LayerSpec(64, 64, torch.arange(1, 65, dtype=torch.float64) ** -(0.3 * i + 0.2))
             for i in range(4)}
    ranks = allocate_ranks(mixed, 0.6, "dynamic")
    vals = [ranks[f"l.{i}.q"] for i in range(4)]
    assert vals == sorted(vals, reverse=True) and vals[0] > vals[-1]


def test_uniform_matches_the_closed_form():
    layers = {"x": LayerSpec(576, 1536), "y": LayerSpec(192, 576)}
    ranks = allocate_ranks(layers, 0.2, "uniform")
    assert ranks == {"x": int(0.8 * 576 * 1536 / 2112), "y": int(0.8 * 192 * 576 / 768)}


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        allocate_ranks(_layers(), ratio)


def test_zero_ratio_keeps_everything_dense_and_unknown_policy():
    assert set(allocate_ranks(_layers(), 0.0, "budget").values()) == {None}
    with pytest.raises(ValueError, match="unknown allocation"):
        allocate_ranks(_layers(), 0.2, "greedy")
    with pytest.raises(ValueError, match="needs the spectrum"):
        allocate_ranks({"x": LayerSpec(8, 8)}, 0.2, "welore")
