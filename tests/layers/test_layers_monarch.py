"""Monarch (Dao et al., ICML 2022): block-diagonal product layout, exact dense <-> Monarch projection."""

from __future__ import annotations

import pytest
import torch

from rankwise.layers.monarch import MonarchLinear, monarch_shapes, project_monarch


def reference_matrix(L1: torch.Tensor, L2: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """P_out blockdiag(L2) P blockdiag(L1), cropped, built from explicit permutation matrices."""
    b, q, in_blk = L1.shape
    out_blk = L2.shape[1]
    R = torch.block_diag(*L1)  # (b q, b in_blk)
    L = torch.block_diag(*L2)  # (b out_blk, b q)
    P = torch.zeros(b * q, b * q)
    for t in range(b * q):  # intermediate t = r b + l goes to block l, slot r
        P[(t % b) * q + t // b, t] = 1
    Pout = torch.zeros(b * out_blk, b * out_blk)
    for l_ in range(b):
        for s in range(out_blk):  # block l, row s -> output s b + l
            Pout[s * b + l_, l_ * out_blk + s] = 1
    return (Pout @ L @ P @ R)[:m, :n]


@pytest.mark.parametrize(
    ("m", "n", "b"), [(16, 16, 4), (24, 16, 4), (16, 32, 4), (12, 12, 2), (10, 14, 4), (8, 6, 1)]
)
def test_layer_is_the_monarch_product(m, n, b):
    layer = MonarchLinear(n, m, nblocks=b, generator=0)
    M = reference_matrix(layer.L1.detach(), layer.L2.detach(), m, n)
    x = torch.randn(2, 3, n)
    torch.testing.assert_close(layer(x), x @ M.T + layer.bias.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight().detach(), M, atol=1e-6, rtol=1e-6)
    assert layer.num_parameters() == layer.L1.numel() + layer.L2.numel() + m


def test_square_cost_is_two_d_squared_over_b_and_b1_is_a_dense_product():
    s1, s2 = monarch_shapes(64, 64, 8)
    assert s1 == (8, 8, 8) and s2 == (8, 8, 8)
    assert MonarchLinear(64, 64, nblocks=8, bias=False).num_parameters() == 2 * 64 * 64 // 8
    layer = MonarchLinear(6, 8, nblocks=1, bias=False, generator=0)
    torch.testing.assert_close(
        layer.dense_weight().detach(), layer.L2[0].detach() @ layer.L1[0].detach()
    )


@pytest.mark.parametrize(("m", "n", "b"), [(16, 16, 4), (24, 16, 4), (16, 32, 4), (12, 12, 2)])
def test_projection_recovers_a_monarch_matrix_and_is_idempotent(m, n, b):
    source = MonarchLinear(n, m, nblocks=b, generator=1)
    dense = source.to_dense()
    projected = MonarchLinear.from_linear(dense, nblocks=b)
    W = dense.weight.detach()
    torch.testing.assert_close(projected.dense_weight().detach(), W, atol=1e-5, rtol=1e-5)
    again = MonarchLinear.from_linear(projected.to_dense(), nblocks=b)
    torch.testing.assert_close(
        again.dense_weight().detach(), projected.dense_weight().detach(), atol=1e-5, rtol=1e-5
    )
    x = torch.randn(3, n)
    torch.testing.assert_close(projected(x), dense(x), atol=1e-5, rtol=1e-5)


def test_projection_error_is_the_per_slice_tail_energy():
    torch.manual_seed(0)
    d, b = 16, 4
    W = torch.randn(d, d, dtype=torch.float64)
    L1, L2 = project_monarch(W, b)
    M = reference_matrix(L1.float(), L2.float(), d, d).double()
    # slice (l, k): rows l mod b, columns of input block k; each is rank-1 in a square b^2 Monarch
    slices = W.view(b, b, b, b).permute(1, 2, 0, 3)  # [l, k, s, p]
    tail = sum(
        float((torch.linalg.svdvals(slices[l_, k])[1:] ** 2).sum())
        for l_ in range(b)
        for k in range(b)
    )
    assert float(((W - M) ** 2).sum()) == pytest.approx(tail, rel=1e-4)
    perturbed = reference_matrix(
        (L1 + 0.01 * torch.randn_like(L1)).float(), L2.float(), d, d
    ).double()
    assert float(((W - perturbed) ** 2).sum()) > tail  # optimal: a nearby Monarch matrix is worse


def test_bad_nblocks_raise():
    with pytest.raises(ValueError, match="nblocks 9 exceeds min"):
        MonarchLinear(8, 16, nblocks=9)
    with pytest.raises(ValueError, match="positive int"):
        MonarchLinear(8, 16, nblocks=0)
