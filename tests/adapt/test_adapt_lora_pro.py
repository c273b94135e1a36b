"""LoRA-Pro (arXiv 2407.18242): the rewritten gradients give the projected full gradient, the
Sylvester X, full-rank recovery, finiteness at B = 0, the rule in an optimizer step.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import inputs_for, layers_model, run
from torch import nn

from rankwise import adapt
from rankwise.adapt.methods.lora_pro import lora_pro_gradients, solve_sylvester_sym

SHAPES = {"a": (9, 7), "b": (5, 8)}


def factors(out=10, inp=7, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    G = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return A, B, G


def projected(A, B, G):
    """P_B G + (I − P_B) G P_A with exact inverses (the best rank-constrained approximation)."""
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    return P_B @ G + (torch.eye(len(P_B), dtype=G.dtype) - P_B) @ G @ P_A


def equivalent(A, B, gA, gB, s):
    return s * B @ gA + s * gB @ A


@pytest.mark.parametrize("mode", ["sylvester", "symmetry", "zero"])
def test_equivalent_gradient_is_the_projected_full_gradient(mode):
    A, B, G = factors()
    s = 2.0
    gA, gB = lora_pro_gradients(A, B, s * B.T @ G, s * G @ A.T, s, mode)
    torch.testing.assert_close(equivalent(A, B, gA, gB, s), projected(A, B, G), rtol=1e-6,
                               atol=1e-9)


def test_the_sylvester_x_solves_its_equation():
    A, B, G = factors(seed=1)
    s = 1.5
    gA = s * B.T @ G
    P, Q = B.T @ B, A @ A.T
    C = -(torch.linalg.inv(P) @ gA @ A.T) / s**2
    X = solve_sylvester_sym(P, Q, C)
    torch.testing.assert_close(P @ X + X @ Q, C, rtol=1e-6, atol=1e-10)
    # g̃_A = (1/s²)(BᵀB)⁻¹ g_A + X A, so X is what lora_pro_gradients used
    new_A, _ = lora_pro_gradients(A, B, gA, s * G @ A.T, s, "sylvester")
    torch.testing.assert_close(new_A, torch.linalg.inv(P) @ gA / s**2 + X @ A, rtol=1e-6,
                               atol=1e-10)


def test_full_rank_factors_recover_the_full_gradient():
    A, B, G = factors(out=9, inp=6, r=6, seed=2)  # r = min(in, out): P_A = I
    # well-conditioned full-rank factors (singular values in [1, 2]): δ's bias stays ~1e-8
    A = torch.linalg.qr(A)[0] @ torch.diag(torch.linspace(1, 2, 6, dtype=A.dtype))
    B = torch.linalg.qr(B)[0] @ torch.diag(torch.linspace(2, 1, 6, dtype=B.dtype))
    gA, gB = lora_pro_gradients(A, B, B.T @ G, G @ A.T, 1.0)
    torch.testing.assert_close(equivalent(A, B, gA, gB, 1.0), G, rtol=1e-6, atol=1e-8)


def test_b_zero_stays_finite():
    A, B, G = factors()
    B = torch.zeros_like(B)
    for mode in ("sylvester", "symmetry", "zero"):
        gA, gB = lora_pro_gradients(A, B, 2 * B.T @ G, 2 * G @ A.T, 2.0, mode)
        assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
        # B = 0: g̃ = G P_A (only the B side can move)
        torch.testing.assert_close(equivalent(A, B, gA, gB, 2.0),
                                   G @ A.T @ torch.linalg.inv(A @ A.T) @ A, rtol=1e-6, atol=1e-9)


def test_closer_to_the_full_gradient_than_any_scaled_lora_gradient():
    A, B, G = factors(seed=3)
    s = 2.0
    gA, gB = s * B.T @ G, s * G @ A.T
    pro = torch.linalg.norm(equivalent(A, B, *lora_pro_gradients(A, B, gA, gB, s), s) - G)
    lora = equivalent(A, B, gA, gB, s)
    for c in torch.logspace(-4, 2, 25, dtype=torch.float64):
        assert pro < torch.linalg.norm(c * lora - G)


def test_the_rule_rewrites_gradients_before_the_optimizer_step(perturb):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "lora_pro", target_modules=list(SHAPES), rank=3, alpha=6.0)
    perturb(model, scale=0.3)
    xs = inputs_for(model)
    layer = model["a"]
    # the true full gradient G = ∂L/∂W' from a dense copy of the adapted layer
    W = layer.effective_weight().clone().requires_grad_(True)
    nn.functional.linear(xs["a"], W, layer.base_layer.bias).square().sum().backward()
    model.train()
    with pytest.raises(RuntimeError, match="attach_rules"):
        run(model, xs)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapt.attach_rules(model, opt)
    A0, B0 = layer.adapter.A.detach().clone(), layer.adapter.B.detach().clone()
    sum(o.square().sum() for o in run(model, xs).values()).backward()
    s = layer.adapter.scale
    torch.testing.assert_close(layer.adapter.A.grad, s * B0.T @ W.grad)  # raw LoRA gradient
    gA, gB = lora_pro_gradients(A0, B0, layer.adapter.A.grad, layer.adapter.B.grad, s)
    opt.step()
    torch.testing.assert_close(layer.adapter.A.detach(), A0 - 0.1 * gA)
    torch.testing.assert_close(layer.adapter.B.detach(), B0 - 0.1 * gB)
    step = equivalent(A0, B0, (A0 - layer.adapter.A.detach()) / 0.1,
                      (B0 - layer.adapter.B.detach()) / 0.1, s)
    torch.testing.assert_close(step, projected(A0, B0, W.grad), rtol=1e-6, atol=1e-9)


def test_count_scale_and_bad_options():
    model = layers_model(SHAPES)
    adapt.adapt_(model, "lora_pro", target_modules=list(SHAPES), rank=4)
    assert adapt.trainable_parameter_count(model) == sum(4 * (o + i) for o, i in SHAPES.values())
    assert model["a"].adapter.scale == 16.0 / 4  # official s = 2 at r = 8: α = 16
    with pytest.raises(ValueError, match="x_mode must be"):
        adapt.adapt_(layers_model(SHAPES), "lora_pro", target_modules=["a"], x_mode="exact")


def test_hf_trainer_with_the_rules_callback(tmp_path, make_llama):
    from transformers import Trainer, TrainingArguments

    model = make_llama()
    adapt.adapt_(model, "lora_pro", rank=2, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (6, 8),
                                                                        generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    model.train()
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[adapt.rules_callback()]).train()
    layers = adapt.adapter_layers(model).values()
    assert all(layer.adapter.rule_steps == 3 for layer in layers)
    assert any(layer.adapter.B.detach().abs().sum() > 0 for layer in layers)
