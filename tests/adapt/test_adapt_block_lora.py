"""Block-LoRA (Zhou et al., arXiv 2501.16720): forward = rank-r/n LoRA with Σ B_i, equal blocks
stay equal, the parameter count d_out·r + (r/n)·d_in.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import backward_names, inputs_for, layers_model, run

from rankwise import adapt

SHAPES = {"a": (24, 16), "b": (12, 20)}


def adapted(rank: int = 6, n_blocks: int = 3, **kw):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "block_lora", rank=rank, n_blocks=n_blocks,
                 target_modules=list(SHAPES), **kw)
    return model


def test_count_is_the_formula_and_both_factors_train():
    model = adapted(rank=6, n_blocks=3, alpha=4.0)
    xs = inputs_for(model)
    # d_out·r + (r/n)·d_in per layer
    assert adapt.trainable_parameter_count(model) == sum(o * 6 + 2 * i for o, i in SHAPES.values())
    model.train()
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {f"{n}.adapter.{t}" for n in SHAPES for t in "AB"}


def test_forward_equals_a_rank_r_over_n_lora_with_summed_b(perturb):
    model = adapted(rank=6, n_blocks=3, alpha=4.0)
    perturb(model)
    xs = inputs_for(model)
    for name, layer in model.items():
        m = layer.adapter
        assert m.A.shape == (2, SHAPES[name][1]) and m.B.shape == (3, SHAPES[name][0], 2)
        lora = layers_model(SHAPES)[name]
        with torch.no_grad():  # (α/r) (B_1 + B_2 + B_3) A_s x, written out block by block
            ref = lora(xs[name]) + (4.0 / 6) * (
                xs[name] @ m.A.T @ m.B[0].T + xs[name] @ m.A.T @ m.B[1].T
                + xs[name] @ m.A.T @ m.B[2].T)
            torch.testing.assert_close(layer(xs[name]), ref, rtol=1e-10, atol=1e-12)


def test_blocks_initialised_equal_stay_equal_under_adam():
    model = adapted(rank=4, n_blocks=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.values():
            layer.adapter.B.copy_(torch.randn(layer.adapter.B.shape[1:], generator=g).expand(
                2, -1, -1))
    start = {n: layer.adapter.B.detach().clone() for n, layer in model.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    xs = inputs_for(model, batch=8)
    model.train()
    for _ in range(5):
        loss = sum((o - 1).square().mean() for o in run(model, xs).values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, layer in model.items():
        B = layer.adapter.B
        torch.testing.assert_close(B[0], B[1], rtol=0, atol=0)
        assert not torch.equal(B, start[name])  # they did move


def test_bad_options():
    with pytest.raises(ValueError, match="not divisible by n_blocks"):
        adapted(rank=5, n_blocks=2)
    with pytest.raises(ValueError, match="n_blocks must be"):
        adapted(n_blocks=0)
    with pytest.raises(ValueError, match="exceeds min"):
        adapted(rank=26, n_blocks=1)
