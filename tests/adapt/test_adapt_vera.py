"""VeRA (Kopiczko et al., arXiv 2310.11454; ΔW = Λ_b B Λ_d A over shared frozen random A, B):
shared sliced bases equal PEFT's, regeneration, first gradients, count r + out.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import peft
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

SHAPES = {"a": (100, 20), "b": (80, 50)}


def adapted(rank: int = 6, **kw):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "vera", rank=rank, target_modules=list(SHAPES), **kw)
    return model


def test_only_b_gets_a_first_gradient_and_d_starts_at_d_initial():
    model = adapted()
    xs = inputs_for(model)
    model.train()
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {f"{n}.adapter.lambda_{v}" for n in SHAPES for v in "bd"}
    for layer in model.values():
        assert torch.count_nonzero(layer.adapter.lambda_d.grad) == 0  # ∂L/∂d ∝ b = 0
        assert torch.count_nonzero(layer.adapter.lambda_b.grad) > 0
        assert torch.all(layer.adapter.lambda_d == 0.1)


def test_layers_share_one_pair_of_bases_and_use_their_sub_block():
    model = adapted(rank=6)
    a, b = model["a"].adapter, model["b"].adapter
    assert a.basis_shape == b.basis_shape == (100, 50)
    assert a.A.shape == (6, 20) and b.A.shape == (6, 50)
    assert a.B.shape == (100, 6) and b.B.shape == (80, 6)
    # the same storage, sliced: A[:, :20] and B[:80, :] are the top-left corners
    assert a.A.data_ptr() == b.A.data_ptr() and a.B.data_ptr() == b.B.data_ptr()
    torch.testing.assert_close(a.A, b.A[:, :20], rtol=0, atol=0)
    torch.testing.assert_close(b.B, a.B[:80], rtol=0, atol=0)
    # kaiming-uniform with gain √2: bound √(6 / fan_in)
    assert b.A.abs().max() <= (6 / 50) ** 0.5 and a.B.abs().max() <= (6 / 6) ** 0.5
    assert b.A.abs().max() > 0.9 * (6 / 50) ** 0.5


def test_bases_and_outputs_equal_peft(make_llama, perturb):
    targets = ["q_proj", "v_proj"]
    config = peft.VeraConfig(r=4, target_modules=targets, projection_prng_key=7, d_initial=0.1)
    theirs = peft.get_peft_model(make_llama(), config).eval()
    ours = adapt.adapt_(make_llama(), "vera", rank=4, projection_prng_key=7,
                        target_modules=targets)
    layer = ours.model.layers[0].self_attn.v_proj  # (16, 32): a sliced B
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.v_proj
    A, B = peft_layer.vera_A["default"], peft_layer.vera_B["default"]
    torch.testing.assert_close(layer.adapter.A, A[:, :32], rtol=0, atol=0)
    torch.testing.assert_close(layer.adapter.B, B[:16], rtol=0, atol=0)
    perturb(ours)
    with torch.no_grad():  # copy our trained vectors into PEFT's layers
        for name, mod in adapt.adapter_layers(ours).items():
            peft_mod = theirs.base_model.model.get_submodule(name)
            peft_mod.vera_lambda_d["default"].copy_(mod.adapter.lambda_d)
            peft_mod.vera_lambda_b["default"].copy_(mod.adapter.lambda_b)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_count_is_r_plus_out_per_layer():
    model = adapted(rank=6)
    assert adapt.trainable_parameter_count(model) == sum(6 + o for o, _ in SHAPES.values())


def test_save_load_regenerates_bit_identical_bases(tmp_path, perturb):
    model = adapted(rank=6, projection_prng_key=3)
    perturb(model)
    xs = inputs_for(model)
    saved = {n: (layer.adapter.A.clone(), layer.adapter.B.clone()) for n, layer in model.items()}
    del model["a"]  # the loader must redraw with the saved (100, 50), not the remaining layer
    adapt.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "rankwise_adapter.safetensors")) == {
        "b.lambda_d", "b.lambda_b"}  # bases are not stored
    fresh = layers_model(SHAPES)
    del fresh["a"]
    loaded = assert_save_load_equal(model, fresh, {"b": xs["b"]}, tmp_path / "again", rtol=0)
    torch.testing.assert_close(loaded["b"].adapter.A, saved["b"][0], rtol=0, atol=0)
    torch.testing.assert_close(loaded["b"].adapter.B, saved["b"][1], rtol=0, atol=0)


def test_the_global_rng_is_untouched_and_keys_differ():
    m1 = layers_model(SHAPES)
    state = torch.random.get_rng_state()
    adapt.adapt_(m1, "vera", rank=6, target_modules=list(SHAPES))
    m1.train()
    run(m1, inputs_for(m1))
    assert torch.equal(torch.random.get_rng_state(), state)
    m2 = adapted(projection_prng_key=1)
    assert not torch.equal(m1["a"].adapter.A, m2["a"].adapter.A)


def test_bad_options():
    with pytest.raises(ValueError, match="projection_prng_key must be an int"):
        adapted(projection_prng_key=1.5)
    with pytest.raises(ValueError, match="dropout"):
        adapted(dropout=1.0)
