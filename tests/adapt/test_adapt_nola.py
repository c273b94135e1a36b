"""NOLA (Koohpayegani et al., ICLR 2024, arXiv 2310.02556; A = Σ α_i A_i, B = Σ β_j B_j over
seeded random bases): count k + l, seeded regenerable bases, chunking, custom backward, memory.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import math

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
from rankwise.adapt.methods.nola import A_BASES, B_BASES, combine_bases, draw_bases

SHAPES = {"q": (12, 10), "v": (6, 10)}


def adapted(**kw):
    model = layers_model(SHAPES)
    options = dict(rank=3, num_basis_A=9, num_basis_B=7, chunk=4) | kw
    adapt.adapt_(model, "nola", target_modules=list(SHAPES), **options)
    return model


def test_count_is_k_plus_l_and_first_gradients():
    model = adapted()
    xs = inputs_for(model)
    assert adapt.trainable_parameter_count(model) == len(SHAPES) * (9 + 7)
    model.train()
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {f"{n}.adapter.coef_{f}" for n in SHAPES for f in "AB"}
    for layer in model.values():
        assert torch.count_nonzero(layer.adapter.coef_A.grad) == 0  # B = 0 at init
        assert torch.count_nonzero(layer.adapter.coef_B.grad) > 0


def test_bases_are_seeded_bit_identical_and_leave_the_global_rng_alone(perturb):
    kw = dict(dtype=torch.float32, device=torch.device("cpu"))
    first = draw_bases(11, A_BASES, 0, 5, (3, 4), 5, **kw)
    assert torch.equal(first, draw_bases(11, A_BASES, 0, 5, (3, 4), 5, **kw))
    assert torch.equal(first[2:], draw_bases(11, A_BASES, 2, 5, (3, 4), 5, **kw))  # per basis
    assert not torch.equal(first, draw_bases(11, B_BASES, 0, 5, (3, 4), 5, **kw))
    assert first.abs().max() <= 1 / math.sqrt(5)
    model = adapted()
    perturb(model)
    xs = inputs_for(model)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    out = run(model, xs)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)  # another global state: same outputs
    for name, y in run(model, xs).items():
        assert torch.equal(y, out[name])


def test_chunking_does_not_change_the_result(perturb):
    m1, m2 = adapted(chunk=1), adapted(chunk=64)
    perturb(m1)
    perturb(m2)
    xs = inputs_for(m1)
    for name, y in run(m1, xs).items():
        torch.testing.assert_close(run(m2, xs)[name], y, rtol=1e-12, atol=1e-14)


def test_custom_backward_equals_autograd_through_materialised_bases():
    coef = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: combine_bases(c, 5, A_BASES, (3, 4), 4), (coef,))
    bases = draw_bases(5, A_BASES, 0, 6, (3, 4), 6, dtype=torch.float64,
                       device=torch.device("cpu"))
    weight = torch.randn(3, 4, dtype=torch.float64)
    (combine_bases(coef, 5, A_BASES, (3, 4), 4) * weight).sum().backward()
    ours = coef.grad.clone()
    coef.grad = None
    (torch.tensordot(coef, bases, dims=1) * weight).sum().backward()
    torch.testing.assert_close(ours, coef.grad, rtol=1e-12, atol=1e-14)


def saved_numel(model, xs) -> int:
    """Elements of every tensor autograd saves for backward during one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(o.sum() for o in run(model, xs).values())
    return total


def test_training_memory_does_not_grow_with_the_number_of_bases():
    small, large = adapted(num_basis_A=4, num_basis_B=4), adapted(num_basis_A=400, num_basis_B=300)
    small.train()
    large.train()
    xs = inputs_for(small)
    assert saved_numel(small, xs) == saved_numel(large, xs) > 0


def test_save_load_regenerates_the_seeded_bases_bit_for_bit(tmp_path, perturb):
    model = adapted()
    perturb(model)
    xs = inputs_for(model)
    loaded = assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path, rtol=1e-12)
    assert loaded["q"].adapter.seed == model["q"].adapter.seed
    torch.testing.assert_close(loaded["q"].adapter.A0, model["q"].adapter.A0, rtol=0, atol=0)


def test_bad_options():
    with pytest.raises(ValueError, match="num_basis_A must be an integer >= 1"):
        adapted(num_basis_A=0)
    with pytest.raises(ValueError, match=r"rank 11 exceeds min\(m, n\) = 10"):
        adapted(rank=11)
