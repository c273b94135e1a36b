"""LoRA-SB (Ponkshe, Singhal et al., arXiv 2411.19557): the init is the best rank-r approximation
of the first full-FT update; orthonormal bases; the equivalent-gradient identity
ΔW = −η s² B Bᵀ G Aᵀ A; only R trains.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise import adapt
from rankwise.adapt.methods.lora_sb import first_update_estimate

LR = 1e-2


def mlp():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 6)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / 2)
    return model.eval()


def loss_fn(model, batch):
    x, y = batch
    return (model(x) - y).square().sum()


def data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return [(x[:6], torch.randn(6, 6, generator=g, dtype=torch.float64)),
            (x[6:], torch.randn(6, 6, generator=g, dtype=torch.float64))]


def full_gradients(model, batches):
    """Σ over batches of ∂L/∂W, by plain autograd on a copy."""
    ref = copy.deepcopy(model)
    for batch in batches:
        loss_fn(ref, batch).backward()
    return {"0": ref[0].weight.grad.clone(), "2": ref[2].weight.grad.clone()}


def adapted(**kw):
    model, batches = mlp(), data()
    grads = full_gradients(model, batches)
    adapt.adapt_(model, "lora_sb", target_modules=["0", "2"], data=batches, loss_fn=loss_fn,
                 **({"rank": 3, "init_lr": LR, "alpha": 5.0} | kw))
    return model, grads


def test_init_is_the_best_rank_r_approximation_of_the_first_update():
    model, grads = adapted()
    base = mlp()
    for name in ("0", "2"):
        m = model.get_submodule(name).adapter
        est = -LR * torch.sign(grads[name])  # Adam-like first step of full fine-tuning
        U, S, Vh = torch.linalg.svd(est, full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(m.delta_weight().detach(), best, rtol=1e-5, atol=1e-12)
        # orthonormal bases; s cancels: R = S_r / s
        torch.testing.assert_close(m.B.T @ m.B, torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(m.A @ m.A.T, torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(m.R.detach(), torch.diag(S[:3]) / (5.0 / 3))
    # the model starts at W + (rank-r approximation of one full step), not at the base
    x = torch.randn(4, 8, dtype=torch.float64)
    w0 = base[0].weight + model[0].adapter.delta_weight().detach()
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, w0, base[0].bias))


def test_the_estimate_is_a_signed_step():
    g = torch.tensor([[0.3, -2.0, 0.0], [1e-9, -1e-9, 5.0]], dtype=torch.float64)
    est = first_update_estimate(g, 0.1)
    assert set(est.flatten().tolist()) <= {-0.1, 0.0, 0.1}
    assert est.tolist() == [[-0.1, 0.1, 0.0], [-0.1, 0.1, -0.1]]
    _, grads = adapted()  # any number of samples: still a signed step
    for g in grads.values():
        assert set(first_update_estimate(g, LR).unique().tolist()) <= {-LR, 0.0, LR}
    with pytest.raises(ValueError, match="NaN"):
        first_update_estimate(torch.tensor([[float("nan")]]), 0.1)


def test_an_sgd_step_on_R_is_the_projected_full_gradient_step():
    model, _ = adapted()
    layer = model[2]
    m, s, eta = layer.adapter, 5.0 / 3, 0.05
    x, y = data()[0]
    model.train()
    # full gradient G = ∂L/∂W_eff at the current effective weight, by autograd
    W_eff = layer.effective_weight().clone().requires_grad_(True)
    h = torch.tanh(model[0](x))
    (nn.functional.linear(h, W_eff, layer.base_layer.bias) - y).square().sum().backward()
    G = W_eff.grad
    loss_fn(model, (x, y)).backward()
    torch.testing.assert_close(m.R.grad, s * m.B.T @ G @ m.A.T)  # g_R = s Bᵀ G Aᵀ
    before = layer.effective_weight().clone()
    torch.optim.SGD([m.R], lr=eta).step()
    change = layer.effective_weight() - before
    torch.testing.assert_close(change, -eta * s**2 * m.B @ m.B.T @ G @ m.A.T @ m.A)


def test_only_R_trains_and_noop_init_restores_the_base():
    model, _ = adapted()
    assert adapt.trainable_parameter_count(model) == 2 * 9
    model.train()
    x, y = data()[0]
    names = (loss_fn(model, (x, y)).backward(),
             {n for n, p in model.named_parameters() if p.grad is not None})[1]
    assert names == {"0.adapter.R", "2.adapter.R"}
    base = mlp()
    quiet, _ = adapted(noop_init=True)
    torch.testing.assert_close(quiet(x), base(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        quiet[0].adapter.R.mul_(3.0)
    with adapt.disable_adapter(quiet):
        torch.testing.assert_close(quiet(x), base(x), rtol=1e-12, atol=1e-12)
    adapt.unload_(quiet)
    torch.testing.assert_close(quiet[0].weight, base[0].weight, rtol=1e-12, atol=1e-14)


def test_needs_data():
    with pytest.raises(ValueError, match="first gradient: pass data="):
        adapt.adapt_(mlp(), "lora_sb", rank=2, target_modules=["0"])
