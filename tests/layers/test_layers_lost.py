"""LOST (Li et al. 2025): SVD split into the Eckart-Young low-rank part + channel-wise sparse residual."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.lost import LOSTLinear


def best_rank(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :r] * S[:r] @ Vh[:r]).float()


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(14, 10)


@pytest.mark.parametrize("channel_dim", ["in", "out"])
def test_all_channels_reconstruct_w_and_none_give_the_truncation(linear, channel_dim):
    W = linear.weight.detach()
    total = 14 if channel_dim == "in" else 10
    full = LOSTLinear.from_linear(linear, rank=3, channels=total, channel_dim=channel_dim)
    torch.testing.assert_close(full.dense_weight().detach(), W, atol=1e-5, rtol=1e-5)
    none = LOSTLinear.from_linear(linear, rank=3, channels=0, channel_dim=channel_dim)
    torch.testing.assert_close(none.dense_weight().detach(), best_rank(W, 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(none.delta_weight().detach(), best_rank(W, 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channel_dim", ["in", "out"])
def test_kept_channels_are_the_largest_residual_ones_and_exact_there(linear, channel_dim):
    W = linear.weight.detach()
    layer = LOSTLinear.from_linear(linear, rank=2, density=0.3, channel_dim=channel_dim)
    dim = 0 if channel_dim == "in" else 1
    residual = W - best_rank(W, 2)
    k = round(0.3 * W.shape[1 - dim])
    assert layer.num_channels == k
    assert set(layer.channels.tolist()) == set(residual.norm(dim=dim).topk(k).indices.tolist())
    rebuilt = layer.dense_weight().detach()
    mask = torch.zeros(W.shape[1 - dim], dtype=torch.bool)
    mask[layer.channels] = True
    on = (slice(None), mask) if channel_dim == "in" else (mask, slice(None))
    off = (slice(None), ~mask) if channel_dim == "in" else (~mask, slice(None))
    torch.testing.assert_close(rebuilt[on], W[on], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rebuilt[off], best_rank(W, 2)[off], atol=1e-5, rtol=1e-5)
    other = 10 if channel_dim == "in" else 14
    assert layer.num_parameters() == 2 * (10 + 14) + k * other + 10


@pytest.mark.parametrize("channel_dim", ["in", "out"])
def test_forward_matches_dense_and_channels_stay_fixed_in_training(linear, channel_dim):
    layer = LOSTLinear.from_linear(linear, rank=2, density=0.4, channel_dim=channel_dim)
    channels = layer.channels.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    for _ in range(3):
        layer(torch.randn(4, 14)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.channels, channels)
    x = torch.randn(3, 5, 14)
    expected = F.linear(x, layer.dense_weight().detach(), layer.bias.detach())
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # only the kept channels of the sparse part are nonzero
    S = layer.sparse_dense().detach()
    dim = 0 if channel_dim == "in" else 1
    nonzero = S.abs().sum(dim=dim).nonzero().flatten()
    assert set(nonzero.tolist()) <= set(channels.tolist())


def test_bad_arguments_raise(linear):
    with pytest.raises(ValueError, match="channels must be an int in \\[0, 14\\]"):
        LOSTLinear.from_linear(linear, rank=2, channels=15)
    with pytest.raises(ValueError, match="channel_dim"):
        LOSTLinear.from_linear(linear, rank=2, channel_dim="rows")
    with pytest.raises(ValueError, match="exceeds min"):
        LOSTLinear.from_linear(linear, rank=11)
