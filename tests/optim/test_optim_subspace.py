"""Randomized projector: one-sided subspace iteration (cold and warm), bf16 projector storage."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import rankwise.optim as ro
from rankwise.linalg import top_right_subspace


def _planted(m: int, n: int, r: int, seed: int = 0, tail: float = 1e-3) -> tuple:
    """A (m, n) with singular values 10..1 on a known r-dim right subspace V (r, n), then a
    tail `tail` times smaller: a clear gap, so the top-r subspace is well defined."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = torch.cat([torch.linspace(10, 1, r), tail * torch.rand(k - r, generator=gen)])
    return (u * s) @ v.T, v[:, :r].T.contiguous(), u[:, :r].contiguous()


def _same_span(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    """Rows of a and b (orthonormal) span the same subspace: equal orthogonal projectors."""
    torch.testing.assert_close(a.mT @ a, b.mT @ b, atol=atol, rtol=0)


@pytest.mark.parametrize("power_iters", [1, 2])
def test_cold_subspace_iteration_finds_the_planted_subspace(power_iters):
    a, v, _ = _planted(60, 40, 5)
    got = top_right_subspace(a, 5, power_iters=power_iters, seed=3)
    torch.testing.assert_close(got @ got.mT, torch.eye(5), atol=1e-5, rtol=0)
    _same_span(got, v)


def test_ritz_vectors_come_in_decreasing_singular_value_order():
    a, _, _ = _planted(60, 40, 5, tail=0.0)
    got = top_right_subspace(a, 5, oversample=3, seed=1)
    s = torch.linalg.svd(a, full_matrices=False)
    # each Ritz vector is ± the matching right singular vector (distinct σ 10, 7.75, ... 1)
    torch.testing.assert_close((got @ s.Vh[:5].mT).abs(), torch.eye(5), atol=1e-4, rtol=0)


def test_warm_start_from_the_exact_subspace_is_a_fixed_point():
    """AᵀA V = V Σ²: one step from the true subspace stays on it (Rayleigh-Ritz keeps it)."""
    a, v, _ = _planted(50, 30, 4, tail=0.05)
    got = top_right_subspace(a, 4, power_iters=1, start=v, oversample=2, seed=9)
    _same_span(got, v, atol=1e-5)


def test_warm_start_beats_a_cold_single_step_on_a_slowly_moving_subspace():
    """GaLore's setting: the new gradient's subspace is near the previous one. Started there,
    one step captures more of the new top-r energy than one step from a Gaussian."""
    a, v, _ = _planted(80, 64, 8, tail=0.3)
    gen = torch.Generator().manual_seed(5)
    b = a + 0.2 * torch.randn(a.shape, generator=gen)  # the next refresh's gradient
    best = torch.linalg.svdvals(b)[:8].square().sum()

    def capture(rows):
        return float((b @ rows.mT).square().sum() / best)

    warm = capture(top_right_subspace(b, 8, power_iters=1, start=v, oversample=2, seed=1))
    cold = capture(top_right_subspace(b, 8, power_iters=1, oversample=2, seed=1))
    assert warm > cold and warm > 0.99


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("method", ["subspace", "hmt"])
def test_randomized_projector_both_sides_and_methods(shape, method):
    m, n = shape
    a, v, u = _planted(m, n, 4, seed=2)
    proj = ro.make_projector("randomized", shape, 4, seed=1, method=method)
    proj.update(a, 0)
    basis = proj.basis()
    if proj.side == "right":
        _same_span(basis, v)
    else:
        _same_span(basis.mT, u.mT)
    proj.update(a, 1)  # second refresh: warm start from the first (subspace method)
    again = proj.basis()
    _same_span(again if proj.side == "right" else again.mT,
               basis if proj.side == "right" else basis.mT)


def test_randomized_projector_refuses_an_unknown_method():
    proj = ro.make_projector("randomized", (8, 6), 2, method="lanczos")
    with pytest.raises(ValueError, match="subspace.*hmt"):
        proj.update(torch.randn(8, 6), 0)


def test_resume_across_warm_refreshes_is_exact(tiny, batch):
    """Refreshes at steps 0, 3, 6 (warm from the second); stop at 4, resume, compare."""
    def make():
        model = tiny()
        return model, ro.create("galore_adamw", model, rank=4, projector="randomized",
                                update_proj_gap=3, lr=1e-2)

    def train(model, opt, start, steps):
        for i in range(start, start + steps):
            x, y = batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model, opt = make()
    train(model, opt, 0, 8)
    expected = model.state_dict()
    model, opt = make()
    train(model, opt, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = make()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    train(model, opt, 4, 4)
    for k, val in model.state_dict().items():
        assert torch.equal(val, expected[k]), k


@pytest.mark.parametrize("shape", [(24, 12), (12, 16)])
def test_bf16_projector_halves_the_basis_bytes_and_tracks_fp32(shape):
    r = 3
    a, b = min(shape), max(shape)
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    out = {}
    for dtype in (None, torch.bfloat16):
        w = nn.Parameter(torch.ones(shape))
        opt = ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank": r,
                                    "proj_options": {"dtype": dtype} if dtype else None}])
        for g in grads:
            w.grad = g
            opt.step()
        out[dtype] = (w.detach().clone(), opt)
    (w32, o32), (w16, o16) = out[None], out[torch.bfloat16]
    scalars = 4 * 8  # step, moment_step, proj_seed, proj_count (int64)
    assert o32.state_bytes() == 4 * r * (a + 2 * b) + scalars
    assert o16.state_bytes() == 2 * r * a + 4 * 2 * r * b + scalars  # basis bf16, moments fp32
    assert o16.state[next(iter(o16.state))]["proj_basis"].dtype == torch.bfloat16
    moved = (w32 - 1).norm()
    assert (w16 - w32).norm() < 0.05 * moved  # bf16 basis: ~3 significant digits
    buf = io.BytesIO()
    torch.save(o16.state_dict(), buf)  # the dtype in proj_options is weights_only-safe
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["proj_options"]["dtype"] \
        == torch.bfloat16


def test_dct_basis_rows_are_the_selected_dct_columns():
    from rankwise.linalg import dct_basis

    for shape in ((20, 16), (16, 20)):
        proj = ro.make_projector("dct", shape, 5)
        proj.update(torch.randn(shape), 0)
        idx = proj.state["proj_idx"].long()
        cols = dct_basis(16)[:, idx]  # (16, 5)
        expected = cols.T if proj.side == "right" else cols
        assert torch.equal(proj.basis(), expected)
