"""RandLoRA (arXiv 2502.00987; ΔW = (α/r) Σ_i B_i Λ_i A Γ_i over shared random bases): full-rank
ΔW, the formula, shared bases regenerated bit for bit, custom backward.

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
from safetensors.torch import load_file

from rankwise import adapt
from rankwise.adapt.methods.randlora import scaled_bases

# out > in, out < in (transposed roles), and a d_min that r does not divide
SHAPES = {"tall": (14, 9), "wide": (8, 13), "sq": (10, 10)}


def adapted(rank: int = 4, **kw):
    model = layers_model(SHAPES)
    kw = {"alpha": 8.0} | kw
    adapt.adapt_(model, "randlora", rank=rank, target_modules=list(SHAPES), **kw)
    return model


def randomise(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.values():
            m = layer.adapter
            m.lam.copy_(torch.randn(m.lam.shape, generator=g))
            m.gamma.copy_(torch.randn(m.gamma.shape, generator=g))


def test_count_is_n_times_r_plus_dmin_and_gamma_is_one_over_max():
    model = adapted()
    xs = inputs_for(model)
    expected = 0
    for o, i in SHAPES.values():
        n = math.ceil(min(o, i) / 4)
        expected += n * (4 + min(o, i))
    assert adapt.trainable_parameter_count(model) == expected
    m = model["tall"].adapter
    assert m.num_bases == 3 and torch.all(m.gamma == 1 / 9)  # γ = 1/max(n, d_min)
    model.train()
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {f"{n}.adapter.{t}" for n in SHAPES for t in ("lam", "gamma")}


@pytest.mark.parametrize("basis", ["uniform", "sparse", "very_sparse"])
def test_delta_is_the_formula_and_generically_full_rank(basis):
    model = adapted(basis=basis)
    randomise(model)
    for name, (o, i) in SHAPES.items():
        m = model[name].adapter
        d_min, r = min(o, i), 4
        M = torch.zeros(max(o, i), d_min, dtype=torch.float64)
        for b in range(m.num_bases):  # Σ B_i Λ_i A Γ_i, explicitly
            B_i = m.B[:, b * r:(b + 1) * r]
            M += B_i @ torch.diag(m.lam[:, b]) @ m.A @ torch.diag(m.gamma[b])
        M = 2.0 * M  # α/r = 8/4
        delta = m.delta_weight().detach()
        torch.testing.assert_close(delta, M.T if i > o else M, rtol=1e-10, atol=1e-12)
        if basis == "uniform":  # (tiny sparse bases may hold an all-zero column of A)
            assert torch.linalg.matrix_rank(delta) == d_min  # full rank, unlike rank-4 LoRA


def test_bases_are_shared_unit_std_and_regenerated_bit_for_bit(tmp_path):
    model = adapted()
    tall, wide = model["tall"].adapter, model["wide"].adapter
    assert tall.basis_dims == wide.basis_dims == (13, 14)  # D = min(max out 14, max in 13)
    assert tall.A.data_ptr() == wide.A.data_ptr()
    torch.testing.assert_close(wide.B, tall.B[:13, : wide.num_bases * 4], rtol=0, atol=0)
    assert abs(tall.B[:, :4].std().item() - 1) < 0.15
    randomise(model)
    saved = {n: (layer.adapter.A.clone(), layer.adapter.B.clone()) for n, layer in model.items()}
    xs = inputs_for(model)
    loaded = assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path, rtol=0)
    stored = load_file(tmp_path / "rankwise_adapter.safetensors")
    assert {k.split(".")[-1] for k in stored} == {"lam", "gamma"}  # bases are never stored
    for name, (A, B) in saved.items():
        assert torch.equal(loaded[name].adapter.A, A) and torch.equal(loaded[name].adapter.B, B)


def test_custom_backward_equals_plain_autograd():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lam = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda lm, gm: scaled_bases(A, lm, gm), (lam, gamma))
    plain = torch.cat([torch.diag(lam[:, i]) @ A @ torch.diag(gamma[i]) for i in range(2)])
    torch.testing.assert_close(scaled_bases(A, lam, gamma), plain, rtol=1e-12, atol=1e-14)


def test_seed_changes_bases_and_bad_options():
    a, b = adapted(projection_prng_key=0), adapted(projection_prng_key=1)
    assert not torch.equal(a["tall"].adapter.A, b["tall"].adapter.A)
    with pytest.raises(ValueError, match="basis must be one of"):
        adapted(basis="dense")
    with pytest.raises(ValueError, match="alpha"):
        adapted(alpha=0.0)
