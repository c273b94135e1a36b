"""FactorizedLinear: exactness at full rank, Eckart-Young, parameter counts, naming, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.layers import FactorizedLinear
from rankwise.layers.factorized import factorized_parameters, saves_parameters


def _linear(m: int, n: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24), (32, 32)])
def test_full_rank_reproduces_dense_output(m, n):
    dense = _linear(m, n)
    fact = FactorizedLinear.from_dense(dense, min(m, n), allow_no_saving=True)
    x = torch.randn(5, 7, n)
    assert _rel(fact(x), dense(x)) < 1e-5
    assert _rel(fact.to_dense().weight, dense.weight) < 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_eckart_young_in_fp64():
    dense = _linear(30, 50, dtype=torch.float64)
    W = dense.weight.detach()
    S = torch.linalg.svdvals(W)
    for r in (1, 5, 18):
        fact = FactorizedLinear.from_dense(dense, r)
        err = W - fact.delta_weight().detach()
        torch.testing.assert_close(err.pow(2).sum(), S[r:].pow(2).sum(), rtol=1e-10, atol=0)
        torch.testing.assert_close(torch.linalg.matrix_norm(err, 2), S[r], rtol=1e-10, atol=0)


def test_two_real_matmuls_and_documented_names():
    fact = FactorizedLinear(16, 12, 4, bias=True)
    assert isinstance(fact.A, nn.Linear) and isinstance(fact.B, nn.Linear)
    shapes = {k: tuple(v.shape) for k, v in fact.state_dict().items()}
    assert shapes == {"A.weight": (4, 16), "B.weight": (12, 4), "B.bias": (12,)}
    assert fact.num_parameters() == sum(p.numel() for p in fact.parameters()) == 4 * 28 + 12
    x = torch.randn(3, 16)
    torch.testing.assert_close(fact(x), x @ fact.A.weight.T @ fact.B.weight.T + fact.B.bias)


def test_parameter_rule_matches_break_even():
    for m, n in [(576, 576), (576, 1536), (192, 576), (7, 3), (1, 9)]:
        for r in range(1, min(m, n) + 1):
            assert saves_parameters(m, n, r) == (factorized_parameters(m, n, r) < m * n)


def test_from_dense_refuses_a_rank_that_does_not_save():
    dense = _linear(16, 16)
    with pytest.raises(ValueError, match="does not save parameters"):
        FactorizedLinear.from_dense(dense, 8)  # 8 * 32 = 256 = 16 * 16
    FactorizedLinear.from_dense(dense, 7)


@pytest.mark.parametrize("rank,exc,msg", [(0, ValueError, ">= 1"), (17, ValueError, "exceeds"),
                                          (2.0, TypeError, "int")])
def test_bad_rank(rank, exc, msg):
    with pytest.raises(exc, match=msg):
        FactorizedLinear(16, 20, rank)


def test_nan_weight_and_mismatched_factors():
    dense = _linear(8, 8)
    with torch.no_grad():
        dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        FactorizedLinear.from_dense(dense, 2)
    with pytest.raises(ValueError, match="matching r"):
        FactorizedLinear.from_factors(torch.randn(8, 3), torch.randn(2, 8))
    with pytest.raises(TypeError, match="2-D weight"):
        FactorizedLinear.from_dense(nn.ReLU(), 2)
