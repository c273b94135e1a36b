"""SLTrain (Han et al., NeurIPS 2024): fixed random support of exactly floor(density m n) entries, sparse storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.sltrain import SLTrainLinear, _SparsePlusLowRank, sltrain_nnz


def reference_weight(layer: SLTrainLinear) -> torch.Tensor:
    """(alpha/r) B A + S with S scattered entry by entry (independent of the layer's code)."""
    m, n = layer.out_features, layer.in_features
    S = torch.zeros(m, n, dtype=layer.values.dtype)
    for flat, v in zip(layer.index.tolist(), layer.values.detach().tolist(), strict=True):
        S[flat // n, flat % n] = v
    return layer.alpha / layer.rank * layer.B.detach() @ layer.A.detach() + S


@pytest.mark.parametrize(
    ("m", "n", "density"), [(10, 7, 0.03), (16, 16, 0.1), (5, 33, 0.37), (40, 3, 0.5)]
)
def test_support_count_is_exact_and_only_values_are_stored(m, n, density):
    layer = SLTrainLinear(n, m, rank=2, density=density, generator=1)
    nnz = int(density * m * n)
    assert sltrain_nnz(m, n, density) == nnz == layer.nnz
    idx = layer.index
    assert idx.dtype == torch.int32 and idx.shape == (nnz,)
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == nnz
    assert int(idx.min()) >= 0 and int(idx.max()) < m * n
    assert layer.values.shape == (nnz,)
    # no dense (m, n) tensor is kept anywhere: parameters r(m+n) + nnz + m, buffer nnz indices
    state = layer.state_dict()
    assert {k: tuple(t.shape) for k, t in state.items()} == {
        "bias": (m,),
        "index": (nnz,),
        "B": (m, 2),
        "A": (2, n),
        "values": (nnz,),
    }
    assert layer.num_parameters() == 2 * (m + n) + nnz + m
    assert dict(layer.named_buffers()).keys() == {"index"}


def test_init_follows_the_reference():
    layer = SLTrainLinear(50, 40, rank=4, density=0.2, generator=0)
    assert torch.count_nonzero(layer.B) == 0
    assert (
        float(layer.A.detach().abs().max()) <= 1 / 50**0.5
        and float(layer.values.detach().abs().max()) <= 1 / 50**0.5
    )
    assert float(layer.bias.detach().abs().max()) <= 1 / 40**0.5
    same = SLTrainLinear(50, 40, rank=4, density=0.2, generator=0)
    other = SLTrainLinear(50, 40, rank=4, density=0.2, generator=1)
    assert torch.equal(layer.index, same.index) and not torch.equal(layer.index, other.index)


def test_forward_equals_dense_reference():
    layer = SLTrainLinear(9, 11, rank=3, density=0.2, alpha=6.0, generator=0)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 4, 9)
    expected = F.linear(x, reference_weight(layer), layer.bias.detach())
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        layer.dense_weight().detach(), reference_weight(layer), atol=1e-6, rtol=1e-6
    )


def test_custom_backward_matches_autograd():
    torch.manual_seed(0)
    m, n, r = 5, 4, 2
    idx = torch.tensor([0, 3, 7, 12, 19])
    inputs = (
        torch.randn(3, n, dtype=torch.float64, requires_grad=True),
        torch.randn(m, r, dtype=torch.float64, requires_grad=True),
        torch.randn(r, n, dtype=torch.float64, requires_grad=True),
        torch.randn(5, dtype=torch.float64, requires_grad=True),
    )
    fn = lambda x, B, A, v: _SparsePlusLowRank.apply(x, B, A, v, idx, 0.7, (m, n))  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_value_gradient_is_the_dense_gradient_at_the_support():
    layer = SLTrainLinear(8, 6, rank=2, density=0.25, generator=3)
    with torch.no_grad():
        layer.B.normal_()
    dense = nn.Parameter(reference_weight(layer))
    x, target = torch.randn(10, 8), torch.randn(10, 6)
    (layer(x) - target).pow(2).sum().backward()
    (F.linear(x, dense, layer.bias.detach()) - target).pow(2).sum().backward()
    gathered = dense.grad.flatten()[layer.index.long()]
    torch.testing.assert_close(layer.values.grad, gathered, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        layer.B.grad, layer.scale * dense.grad @ layer.A.detach().T, atol=1e-5, rtol=1e-5
    )


def test_support_stays_fixed_and_off_support_entries_stay_zero_under_adam():
    layer = SLTrainLinear(12, 10, rank=2, density=0.1, generator=0)
    index0 = layer.index.clone()
    off = torch.ones(120, dtype=torch.bool)
    off[index0.long()] = False
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(4):
        layer(torch.randn(5, 12)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.index, index0)
    assert torch.count_nonzero(layer.sparse_dense().detach().flatten()[off]) == 0
    assert torch.count_nonzero(layer.B) > 0  # the low-rank part trained too


def test_from_linear_keeps_shape_dtype_and_bias_presence():
    lin = nn.Linear(12, 6, bias=False).double()
    layer = SLTrainLinear.from_linear(lin, rank=2, density=0.5, generator=0)
    assert layer.bias is None and layer.values.dtype == torch.float64
    assert (layer.out_features, layer.in_features) == (6, 12)
    with pytest.raises(ValueError, match="leaves no nonzero"):
        SLTrainLinear(3, 3, rank=1, density=0.05)


def test_learned_scaling_is_tanh_of_a_parameter_with_its_gradient():
    """The reference's trainable_scaling: W = tanh(s) B A + S, s (1,) initialised to 1."""
    layer = SLTrainLinear(9, 11, rank=3, density=0.2, generator=0, trainable_scaling=True)
    with torch.no_grad():
        layer.B.normal_()
        layer.scaling.fill_(0.7)
    assert layer.scaling.shape == (1,) and "scaling" in layer.state_dict()
    x = torch.randn(4, 9, dtype=torch.float64)
    layer = layer.double()
    S = reference_weight(layer) - layer.alpha / layer.rank * layer.B.detach() @ layer.A.detach()
    s = layer.scaling.detach().clone().requires_grad_(True)
    W = torch.tanh(s) * layer.B.detach() @ layer.A.detach() + S
    ref = F.linear(x, W, layer.bias.detach())
    out = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(layer.scaling.grad, s.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.delta_weight().detach(),
                               torch.tanh(s.detach()) * layer.B.detach() @ layer.A.detach())


def test_fixed_scaling_stays_the_default():
    layer = SLTrainLinear(9, 11, rank=3, density=0.2, alpha=6.0, generator=0)
    assert layer.scale == 2.0 and not hasattr(layer, "scaling")
    lin = nn.Linear(9, 11)
    learned = SLTrainLinear.from_linear(lin, rank=3, trainable_scaling=True)
    assert learned.trainable_scaling and float(learned.scale) == pytest.approx(torch.tanh(
        torch.tensor(1.0)).item())
