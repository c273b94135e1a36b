"""DyLoRA (Valipour et al., EACL 2023, arXiv 2210.07558): truncation to rank b = rank-b LoRA with
α/b, frozen-mode gradients, per-step rank sampling through the rules, no-op and merge at each rank.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import (
    assert_merge_roundtrip,
    assert_save_load_equal,
    inputs_for,
    layers_model,
    run,
)
from torch import nn

from rankwise import adapt
from rankwise.adapt.methods.dylora import sample_rank, set_dylora_rank

SHAPES = {"a": (9, 7), "b": (6, 8)}
R = 5


def adapted(**kw):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "dylora", target_modules=list(SHAPES), **({"rank": R, "alpha": 3.0} | kw))
    return model


def lora_output(layer, x, b, alpha=3.0):
    """A plain LoRA built from the first b rows/columns, scale α/b."""
    m = layer.adapter
    return layer.base_layer(x) + (alpha / b) * x @ m.A[:b].T @ m.B[:, :b].T


@pytest.mark.parametrize("b", [1, 3, R])
def test_truncated_forward_is_a_rank_b_lora(perturb, b):
    model = adapted()
    perturb(model)
    xs = inputs_for(model)
    set_dylora_rank(model, b)
    with torch.no_grad():
        for name, out in run(model, xs).items():
            torch.testing.assert_close(out, lora_output(model[name], xs[name], b))
    model.train()  # training uses the sampled rank instead
    for layer in model.values():
        layer.adapter.train_rank = b
        layer.adapter.rules_attached = True  # (the rule itself is tested below)
    for name, out in run(model, xs).items():
        torch.testing.assert_close(out, lora_output(model[name], xs[name], b))


@pytest.mark.parametrize(("update", "b"), [("frozen", 3), ("frozen", 1), ("full", 3)])
def test_frozen_mode_trains_only_row_b(perturb, update, b):
    model = adapted(update=update)
    perturb(model)
    layer = model["a"]
    layer.adapter.train_rank = b
    layer.adapter.rules_attached = True
    layer.train()
    layer(inputs_for(model)["a"]).square().sum().backward()
    A_rows = layer.adapter.A.grad.abs().sum(dim=1)
    B_cols = layer.adapter.B.grad.abs().sum(dim=0)
    trained = [b - 1] if update == "frozen" else list(range(b))
    for i in range(R):
        assert (A_rows[i] > 0) == (i in trained) and (B_cols[i] > 0) == (i in trained)


def test_init_is_a_noop_and_count_is_rmax_times_m_plus_n():
    base = layers_model(SHAPES)
    model = adapted()
    xs = inputs_for(model)
    for b in (1, R):
        set_dylora_rank(model, b)
        for name, out in run(model, xs).items():
            torch.testing.assert_close(out, base[name](xs[name]), rtol=1e-6, atol=0)
    assert adapt.trainable_parameter_count(model) == sum(R * (o + i) for o, i in SHAPES.values())


def test_merge_at_each_rank_and_unmerge_with_the_merged_rank(tmp_path, perturb):
    model = adapted()
    perturb(model)
    xs = inputs_for(model)
    original = {n: layer.base_layer.weight.detach().clone() for n, layer in model.items()}
    for b in (1, R):
        set_dylora_rank(model, b)
        assert_merge_roundtrip(model, xs)
    set_dylora_rank(model, 2)
    with torch.no_grad():
        expected = {n: lora_output(model[n], x, 2) for n, x in xs.items()}
        adapt.merge_(model)
        for name, out in run(model, xs).items():
            torch.testing.assert_close(out, expected[name])
    model["a"].adapter.set_rank(4)  # changing the rank while merged must not break unmerge
    adapt.unmerge_(model)
    for name, layer in model.items():
        torch.testing.assert_close(layer.base_layer.weight.detach(), original[name])
    set_dylora_rank(model, 3)
    loaded = assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path, rtol=1e-12)
    assert loaded["b"].adapter.active_rank == 3


def test_one_rank_per_step_for_the_whole_model_through_the_rules():
    model = adapted(min_rank=2, seed=7)
    model.train()
    xs = inputs_for(model)
    with pytest.raises(RuntimeError, match="attach_rules"):
        run(model, xs)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    adapt.attach_rules(model, opt)
    seen = []
    for step in range(12):
        ranks = {layer.adapter.train_rank for layer in model.values()}
        assert len(ranks) == 1  # the same b in every layer
        seen.append(ranks.pop())
        assert seen[-1] == sample_rank(model["a"].adapter.config, step)
        sum(o.square().sum() for o in run(model, xs).values()).backward()
        opt.step()
        opt.zero_grad()
    assert set(seen) <= set(range(2, R + 1)) and len(set(seen)) > 1


def test_bad_options():
    with pytest.raises(ValueError, match="min_rank must be"):
        adapted(min_rank=6)
    with pytest.raises(ValueError, match="update must be"):
        adapted(update="nested")
    model = adapted()
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 5\]"):
        set_dylora_rank(model, 0)
    assert isinstance(model["a"].base_layer, nn.Linear)
