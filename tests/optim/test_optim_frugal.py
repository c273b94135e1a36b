"""FRUGAL's variants (Zmushko et al. 2024): random-coordinate and block-wise subspaces, lr scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.optim as ro
from rankwise.optim.lowrank_update import active_blocks


def _first_adamw_step(w0, g, lr):
    w = nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    w.grad = g.clone()
    opt.step()
    return w.detach()


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_randperm_coordinates_get_adam_and_the_rest_signsgd(shape):
    gen = torch.Generator().manual_seed(0)
    w0, g = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    w = nn.Parameter(w0.clone())
    opt = ro.create("frugal", [{"params": [w], "rank": 3}], projector="randperm", lr=0.1,
                    weight_decay=0.0)
    w.grad = g.clone()
    opt.step()
    proj = opt.projector_for(w)
    idx = opt.state[w]["proj_idx"].long()
    dim = 1 if proj.side == "right" else 0
    assert idx.numel() == 3 and idx.unique().numel() == 3
    chosen = torch.zeros(shape[dim], dtype=torch.bool)
    chosen[idx] = True
    mask = chosen[None, :] if dim == 1 else chosen[:, None]
    mask = mask.expand(*shape)
    adam = _first_adamw_step(w0, g, 0.1)
    got = w.detach()
    torch.testing.assert_close(got[mask], adam[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[~mask], (w0 - 0.1 * g.sign())[~mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(proj.up(proj.down(g)), g * mask, rtol=0, atol=0)


def test_randperm_redraws_its_coordinates_at_each_refresh():
    w = nn.Parameter(torch.zeros(8, 64))
    opt = ro.create("frugal", [{"params": [w], "rank": 4}], projector="randperm",
                    update_proj_gap=1)
    seen = []
    for _ in range(3):
        w.grad = torch.randn(8, 64)
        opt.step()
        seen.append(tuple(opt.state[w]["proj_idx"].tolist()))
    assert len(set(seen)) == 3


@pytest.mark.parametrize("order", ["random", "ascending", "descending", "mirror"])
def test_active_blocks_have_the_density_and_cycle(order):
    n = 8
    periods = [active_blocks(n, 0.25, order, k, seed=0) for k in range(4)]
    assert all(len(s) == 2 for s in periods)
    if order != "random":  # the cyclic orders visit every matrix in n / a periods
        assert set().union(*periods) == set(range(n))
    if order == "mirror":
        assert periods[0] == {0, n - 1} and periods[1] == {1, n - 2}  # j with n - 1 - j


def test_blockwise_active_matrices_get_adamw_and_the_rest_signsgd():
    gen = torch.Generator().manual_seed(1)
    ws0 = [torch.randn(6, 5, generator=gen) for _ in range(4)]
    gs = [torch.randn(6, 5, generator=gen) for _ in range(4)]
    ws = [nn.Parameter(w.clone()) for w in ws0]
    opt = ro.create("frugal", ws, block_order="ascending", block_density=0.5, lr=0.1,
                    update_proj_gap=2, proj_lr_scale=0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # FRUGAL's projected lr scale
    for w, g in zip(ws, gs, strict=True):
        w.grad = g.clone()
    opt.step()
    for i in (0, 1):  # period 0, ascending, density 1/2: matrices 0 and 1 are active
        torch.testing.assert_close(ws[i].detach(), _first_adamw_step(ws0[i], gs[i], 0.05),
                                   rtol=0, atol=1e-6)
        assert "exp_avg" in opt.state[ws[i]]
    for i in (2, 3):
        torch.testing.assert_close(ws[i].detach(), ws0[i] - 0.05 * gs[i].sign(), rtol=0,
                                   atol=1e-6)
        assert "exp_avg" not in opt.state[ws[i]]
    opt.step()
    opt.step()  # period 1: matrices 2, 3 active, and every moment was dropped at the switch
    assert "exp_avg" not in opt.state[ws[0]] and "exp_avg" in opt.state[ws[2]]
    assert int(opt.state[ws[2]]["moment_step"]) == 1


def test_blockwise_refuses_a_projector():
    w = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="block_order.*projector=None"):
        ro.LowRankOptimizer([{"params": [w], "block_order": "random", "projector": "svd",
                              "rank": 2}])


def _randk(shape, rank, **kw):
    gen = torch.Generator().manual_seed(3)
    w0, g = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    w = nn.Parameter(w0.clone())
    opt = ro.create("frugal", [{"params": [w], "rank": rank}], projector="randk", lr=0.1,
                    weight_decay=0.0, **kw)
    return w0, g, w, opt


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_randk_keeps_state_for_exactly_k_entries_and_signsgd_elsewhere(shape):
    w0, g, w, opt = _randk(shape, rank=2)
    w.grad = g.clone()
    opt.step()
    st = opt.state[w]
    k = 2 * max(shape)  # as many entries as a rank-2 projection of this matrix keeps
    idx = st["proj_idx"].long()
    assert idx.numel() == k and idx.unique().numel() == k
    assert st["exp_avg"].numel() == k and st["exp_avg_sq"].numel() == k
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[idx] = True
    mask = mask.view(shape)
    assert int(mask.sum()) == k  # per entry: not whole rows or columns
    assert not (mask.all(0).any() and mask.all(1).any())
    adam = _first_adamw_step(w0, g, 0.1)
    got = w.detach()
    torch.testing.assert_close(got[mask], adam[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[~mask], (w0 - 0.1 * g.sign())[~mask], rtol=0, atol=1e-6)


def test_randk_matches_a_hand_written_frugal_step_over_two_refreshes():
    shape, lr, b1, b2, eps = (5, 4), 0.05, 0.9, 0.999, 1e-8
    w0, _, w, opt = _randk(shape, rank=1, update_proj_gap=2, betas=(b1, b2), eps=eps)
    opt.param_groups[0]["lr"] = lr
    ref = w0.clone()
    gen = torch.Generator().manual_seed(5)
    m = v = None
    for t in range(4):
        g = torch.randn(*shape, generator=gen)
        w.grad = g.clone()
        opt.step()
        idx = opt.state[w]["proj_idx"].long()  # the selection in force at this step
        if t % 2 == 0:  # refresh: FRUGAL resets the moments
            m, v, k = torch.zeros(idx.numel()), torch.zeros(idx.numel()), 0
        k += 1
        gs = g.reshape(-1)[idx]
        m = b1 * m + (1 - b1) * gs
        v = b2 * v + (1 - b2) * gs * gs
        upd = (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
        flat = ref.reshape(-1)
        sel = torch.zeros_like(flat, dtype=torch.bool)
        sel[idx] = True
        flat[~sel] -= lr * g.reshape(-1)[~sel].sign()
        flat[idx] -= lr * upd
        torch.testing.assert_close(w.detach(), ref, rtol=0, atol=1e-6)


def test_randk_redraws_at_each_refresh_from_its_seed():
    def picks(seed):
        _, _, w, opt = _randk((16, 16), rank=1, update_proj_gap=1, seed=seed)
        out = []
        for _ in range(3):
            w.grad = torch.ones(16, 16)
            opt.step()
            out.append(tuple(opt.state[w]["proj_idx"].tolist()))
        return out

    a = picks(0)
    assert len(set(a)) == 3 and a == picks(0) and a != picks(1)


def test_randk_k_option_and_refusals():
    _, g, w, opt = _randk((6, 10), rank=1, proj_options={"k": 7})
    w.grad = g
    opt.step()
    assert opt.state[w]["proj_idx"].numel() == 7 and opt.state[w]["exp_avg"].numel() == 7
    with pytest.raises(ValueError, match="randk.*moment_policy"):
        _randk((6, 10), rank=1, moment_policy="reproject")
    with pytest.raises(ValueError, match="randk"):
        ro.create("apollo", [{"params": [nn.Parameter(torch.zeros(6, 10))], "rank": 1}],
                  projector="randk")
