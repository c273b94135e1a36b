"""PiSSA (Meng et al., arXiv 2404.02948; W = W_res + s B A with s B A the top-r SVD part):
residual + top-r part = W, singular values, α-invariance, the layer's delta over the original.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise import adapt


def adapted_linear(alpha: float, rank: int = 3, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7)).to(dtype)
    W = model[0].weight.detach().clone()
    adapt.adapt_(model, "pissa", rank=rank, alpha=alpha, target_modules=["0"], **kw)
    return model, W


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_plus_adapter_is_w(dtype):
    model, W = adapted_linear(alpha=2.0, dtype=dtype)
    layer = model[0]
    m = layer.adapter
    W_res = layer.base_layer.weight.detach()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(W_res + m.scale * m.B @ m.A, W, rtol=tol, atol=tol)
    x = torch.randn(4, 9, dtype=dtype)
    torch.testing.assert_close(model(x), x @ W.T + layer.base_layer.bias, rtol=tol, atol=tol)


def test_adapter_is_the_top_r_svd_part_and_residual_the_rest():
    model, W = adapted_linear(alpha=2.0)
    m = model[0].adapter
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(m.scale * m.B @ m.A)[:3], S[:3])
    W_res = model[0].base_layer.weight.detach()
    torch.testing.assert_close(W_res.square().sum(), S[3:].square().sum())
    # balanced factors: BᵀB = AAᵀ = diag(S_r / s)
    torch.testing.assert_close(m.B.T @ m.B, torch.diag(S[:3] / m.scale))
    torch.testing.assert_close(m.A @ m.A.T, torch.diag(S[:3] / m.scale))


def test_alpha_invariance():
    deltas = []
    for alpha in (1.0, 3.0, 6.0):
        model, _ = adapted_linear(alpha=alpha)
        deltas.append(model[0].adapter.delta_weight().detach())
    for d in deltas[1:]:
        torch.testing.assert_close(d, deltas[0])
    model, _ = adapted_linear(alpha=4.0, use_rslora=True)
    torch.testing.assert_close(model[0].adapter.delta_weight().detach(), deltas[0])


def test_randomized_svd_init_is_close_and_still_exact_at_init():
    model, W = adapted_linear(alpha=2.0, niter=4, dtype=torch.float32)
    m = model[0].adapter
    torch.testing.assert_close(model[0].base_layer.weight + m.delta_weight(), W, atol=1e-5,
                               rtol=1e-5)
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(m.delta_weight().detach())[:3], S[:3],
                               rtol=1e-4, atol=1e-5)


def test_trainable_count_is_r_times_m_plus_n():
    model, _ = adapted_linear(alpha=2.0)
    assert adapt.trainable_parameter_count(model) == 3 * (9 + 7)


def test_rank_above_min_dim_and_bad_niter():
    model = nn.Sequential(nn.Linear(9, 7))
    with pytest.raises(ValueError, match=r"rank 8 exceeds min\(m, n\) = 7"):
        adapt.adapt_(model, "pissa", rank=8, target_modules=["0"])
    with pytest.raises(ValueError, match="niter"):
        adapt.adapt_(model, "pissa", rank=2, niter=-1, target_modules=["0"])
    with pytest.raises(ValueError, match="alpha > 0"):
        adapt.adapt_(model, "pissa", rank=2, alpha=-1.0, target_modules=["0"])


def test_layer_delta_weight_is_the_update_over_the_original(perturb):
    model, W = adapted_linear(alpha=2.0)
    perturb(model)
    layer = model[0]
    m = layer.adapter
    expected = m.scale * (m.B @ m.A - m.B_init @ m.A_init)  # s(BA − B₀A₀)
    torch.testing.assert_close(layer.delta_weight(), expected.detach())
    torch.testing.assert_close(layer.original_weight(), W)
    adapt.merge_(model)
    torch.testing.assert_close(layer.delta_weight(), expected.detach())
    assert layer.trainable_names() == ("A", "B")
