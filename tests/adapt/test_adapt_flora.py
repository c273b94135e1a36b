"""FLoRA (Si, Wang et al., arXiv 2405.14739; ΔW = s · G ×₁ U⁽¹⁾ … ×_N U⁽ᴺ⁾): the N = 2 formula,
conv output = conv with the Tucker ΔW, full Tucker rank represents any conv delta (orthonormal
HOSVD factors), Kaiming factor init.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from adapt_checks import layers_model
from torch import nn

from rankwise import adapt, linalg


def convs(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    model = nn.ModuleDict({
        "c": nn.Conv2d(3, 6, kernel_size=3, padding=1),
        "s": nn.Conv2d(4, 4, kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        "p": nn.Conv2d(6, 5, kernel_size=1, bias=False),
    })
    return model.double().eval()


def conv_inputs(model: nn.ModuleDict, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, layer.in_channels if isinstance(layer, nn.Conv2d)
                           else layer.base_layer.in_channels, 7, 9, generator=g).double()
            for n, layer in model.items()}


def test_linear_delta_is_scale_u_out_g_t_u_in_t(perturb):
    shapes = {"a": (12, 10), "b": (7, 9)}
    model = layers_model(shapes)
    adapt.adapt_(model, "flora", rank=3, scale=2.5, dropout=0.0, target_modules=list(shapes))
    perturb(model)
    for layer in model.values():
        m = layer.adapter
        U_in, U_out = m.U[0], m.U[1]
        torch.testing.assert_close(m.delta_weight(), 2.5 * U_out @ m.G.T @ U_in.T,
                                   rtol=1e-12, atol=1e-12)
    assert adapt.trainable_parameter_count(model) == sum(9 + 3 * (o + i) for o, i in shapes.values())


def test_conv_output_is_the_conv_with_the_tucker_delta(perturb):
    model = convs()
    adapt.adapt_(model, "flora", rank=2, kernel_rank=2, dropout=0.0, target_modules=["c", "s", "p"])
    base, xs = convs(), conv_inputs(model)
    with torch.no_grad():
        for name, layer in model.items():  # no-op at init
            torch.testing.assert_close(layer(xs[name]), base[name](xs[name]), rtol=1e-6, atol=0)
    perturb(model)
    with torch.no_grad():
        for name, layer in model.items():
            m, conv = layer.adapter, base[name]
            U_in, U_out, U_h, U_w = m.U
            # ΔW[o, i, a, b] = scale Σ G[p, q, s, t] U_in[i, p] U_out[o, q] U_h[a, s] U_w[b, t]
            delta = m.config.scale * torch.einsum("pqst,ip,oq,as,bt->oiab", m.G, U_in, U_out,
                                                  U_h, U_w)
            assert delta.shape == conv.weight.shape
            ref = F.conv2d(xs[name], conv.weight + delta, conv.bias, conv.stride, conv.padding,
                           conv.dilation)
            torch.testing.assert_close(layer(xs[name]), ref, rtol=1e-9, atol=1e-10)
    # ranks [r, r, min(r_k, kh), min(r_k, kw)]: the 1x1 conv gets kernel ranks 1
    assert model["p"].adapter.G.shape == (2, 2, 1, 1)
    # Π r_n + Σ d_n r_n per layer, dims [C_in, C_out, kh, kw]
    expected = ((2 ** 4 + 2 * (3 + 6) + 2 * 3 + 2 * 3)
                + (2 ** 4 + 2 * (4 + 4) + 2 * 3 + 2 * 2)
                + (2 * 2 * 1 * 1 + 2 * (6 + 5) + 1 * 1 + 1 * 1))
    assert adapt.trainable_parameter_count(model) == expected
    model.eval()
    with torch.no_grad():
        before = {n: layer(xs[n]) for n, layer in model.items()}
        adapt.merge_(model)
        for n, layer in model.items():
            torch.testing.assert_close(layer(xs[n]), before[n], rtol=1e-9, atol=1e-10)
        adapt.unmerge_(model)
        for n, layer in model.items():
            torch.testing.assert_close(layer.base_layer.weight, base[n].weight, rtol=1e-12,
                                       atol=1e-14)


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)


def test_full_tucker_rank_represents_any_conv_delta_with_orthonormal_factors():
    model = nn.ModuleDict({"c": nn.Conv2d(4, 4, kernel_size=3, padding=1)}).double()
    adapt.adapt_(model, "flora", rank=4, kernel_rank=3, dropout=0.0, target_modules=["c"])
    m = model["c"].adapter
    target = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # HOSVD of the target in FLoRA's axis order [C_in, C_out, kh, kw]
    T = target.transpose(0, 1)
    factors = [linalg.svd(_unfold(T, mode))[0] for mode in range(4)]
    core = T
    for mode, U in enumerate(factors):
        core = torch.movedim(torch.tensordot(core, U, dims=([mode], [0])), -1, mode)
    with torch.no_grad():
        for U, Uh in zip(m.U, factors, strict=True):
            torch.testing.assert_close(Uh.T @ Uh, torch.eye(Uh.shape[1], dtype=Uh.dtype),
                                       rtol=0, atol=1e-12)  # orthonormal factors
            U.copy_(Uh)
        m.G.copy_(core / m.config.scale)
    torch.testing.assert_close(m.delta_tensor(), target, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model["c"].delta_weight(), target.flatten(1), rtol=1e-10,
                               atol=1e-12)


def test_factor_init_is_kaiming_normal_a_sqrt3():
    model = layers_model({"a": (600, 500)}, dtype=torch.float32)
    adapt.adapt_(model, "flora", rank=16, target_modules=["a"])
    m = model["a"].adapter
    assert torch.count_nonzero(m.G) == 0
    for U in m.U:
        ref = torch.empty_like(U)
        nn.init.kaiming_normal_(ref, a=math.sqrt(3))  # torch's own std for this shape
        assert abs(U.std().item() / ref.std().item() - 1) < 0.05


def test_bad_options():
    with pytest.raises(ValueError, match="exceeds min"):
        adapt.adapt_(convs(), "flora", rank=4, target_modules=["c"])  # C_in = 3
    with pytest.raises(ValueError, match="kernel_rank"):
        adapt.adapt_(convs(), "flora", rank=2, kernel_rank=0, target_modules=["c"])
    with pytest.raises(TypeError, match="cannot adapt a embedding"):
        adapt.adapt_(nn.ModuleDict({"e": nn.Embedding(5, 4)}), "flora", rank=2,
                     target_modules=["e"])

