"""Projectors: side rule, Eckart-Young, DCT selection, seeds, quantisation, lazy refresh."""

from __future__ import annotations

import pytest
import torch

import rankwise.optim as ro
from rankwise.linalg import dct_basis


def _g(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("shape", "side", "basis", "low"), [
    ((12, 8), "right", (3, 8), (12, 3)),
    ((8, 12), "left", (8, 3), (3, 12)),
    ((8, 8), "right", (3, 8), (8, 3)),
])
def test_std_side_rule_and_shapes(shape, side, basis, low):
    """GaLore test 2: m >= n -> P (r, n), moments (m, r); m < n -> P (m, r), moments (r, n)."""
    proj = ro.make_projector("svd", shape, 3)
    proj.update(_g(shape), 0)
    assert proj.side == side
    assert proj.basis().shape == basis and proj.down(_g(shape)).shape == low
    assert ro.resolve_side(shape, "reverse_std") != side


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_svd_back_projection_is_the_eckart_young_approximation(shape):
    g = _g(shape)
    proj = ro.make_projector("svd", shape, 3)
    proj.update(g, 0)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(proj.up(proj.down(g)), best, atol=1e-5, rtol=0)


def test_randomized_projector_recovers_a_low_rank_subspace_and_is_seeded():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(40, 4, generator=gen) @ torch.randn(4, 30, generator=gen)  # rank 4
    a = ro.make_projector("randomized", g.shape, 4, seed=5, oversample=2)
    b = ro.make_projector("randomized", g.shape, 4, seed=5, oversample=2)
    a.update(g, 0)
    b.update(g, 0)
    assert torch.equal(a.basis(), b.basis())
    torch.testing.assert_close(a.up(a.down(g)), g, atol=1e-4, rtol=0)


def test_dct_basis_is_orthonormal():
    q = dct_basis(16, dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(20, 16), (16, 20)])
def test_dct_selection_picks_the_planted_columns(shape):
    """DCT test 2: G built from r planted DCT columns -> selection returns them and
    back(proj(G)) = G."""
    m, n = shape
    d = min(shape)
    q = dct_basis(d, dtype=torch.float32)
    planted = torch.tensor([1, 5, 11])
    coeff = _g((max(shape), 3))
    g = coeff @ q[:, planted].T if m >= n else q[:, planted] @ coeff.T  # (m, n)
    proj = ro.make_projector("dct", shape, 3)
    proj.update(g, 0)
    assert set(proj.state["proj_idx"].tolist()) == set(planted.tolist())
    torch.testing.assert_close(proj.up(proj.down(g)), g, atol=1e-5, rtol=0)


def test_random_projector_is_regenerated_from_its_seed_with_variance_one_over_r():
    proj = ro.make_projector("random", (400, 300), 50, seed=3)
    proj.update(_g((400, 300)), 0)
    p1 = proj.basis()
    again = ro.make_projector("random", (400, 300), 50, state=dict(proj.state))
    assert torch.equal(again.basis(), p1)
    assert abs(float(p1.var()) - 1 / 50) < 0.1 / 50
    proj.update(_g((400, 300)), 1)  # a refresh draws a new matrix
    assert not torch.equal(proj.basis(), p1)


def test_random_orthogonal_projector_has_orthonormal_rows():
    proj = ro.make_projector("random_orthogonal", (30, 20), 6, seed=1)
    proj.update(_g((30, 20)), 0)
    p = proj.basis()  # (r, n) for right projection
    torch.testing.assert_close(p @ p.T, torch.eye(6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_projector_error_is_within_half_a_step(bits):
    """Q-GaLore test 1: per-element error <= s/2 for groups holding both signs."""
    g = _g((64, 48))
    exact = ro.make_projector("svd", g.shape, 8)
    exact.update(g, 0)
    quant = ro.make_projector("svd", g.shape, 8, bits=bits, group_size=64)
    quant.update(g, 0)
    p = exact.basis().reshape(-1, 64)
    step = (p.amax(1) - p.amin(1)) / (2**bits - 1)
    err = (quant.basis().reshape(-1, 64) - p).abs()
    assert (err <= step[:, None] / 2 + 1e-7).all()
    assert "proj_basis" not in quant.state
    packed = quant.state["proj_q_data"]
    assert packed.dtype == torch.uint8 and packed.numel() == 8 * 48 * bits // 8


def test_refresh_happens_exactly_every_gap_and_leaves_moments_alone():
    """GaLore test 3: SVD at t = 0, T, 2T ...; the refresh itself does not touch moments."""
    w = torch.nn.Parameter(torch.zeros(12, 8))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank": 3}],
                              update_proj_gap=4)
    refresh_steps = []
    for t in range(10):
        w.grad = _g((12, 8), seed=t)
        st = opt.state[w]
        before = int(st["proj_count"]) if "proj_count" in st else 0
        opt.step()
        if int(opt.state[w]["proj_count"]) > before:
            refresh_steps.append(t)
    assert refresh_steps == [0, 4, 8]
    st = opt.state[w]
    m, v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    opt.projector_for(w).update(_g((12, 8), seed=99), 10)
    assert torch.equal(st["exp_avg"], m) and torch.equal(st["exp_avg_sq"], v)


def test_lazy_refresh_gap_schedule_matches_q_galore():
    """Q-GaLore test 3: identical gradients -> SVDs at 0, 200, ..., 1000; T -> 400 at 1000;
    then 1200 (T -> 800), 1600 (T -> 1600), 3200 ...; random gradients keep T = 200."""
    g = _g((12, 8))
    proj = ro.make_projector("svd", g.shape, 3, lazy_threshold=0.4)
    refreshed = [t for t in range(3300) if proj.maybe_update(g, t, 200)]
    assert refreshed == [0, 200, 400, 600, 800, 1000, 1200, 1600, 3200]
    assert int(proj.state["proj_gap"]) == 3200

    proj = ro.make_projector("svd", g.shape, 3, lazy_threshold=0.4)
    refreshed = [t for t in range(1500) if proj.maybe_update(_g((12, 8), seed=t), t, 200)]
    assert refreshed == list(range(0, 1500, 200))
    assert int(proj.state["proj_gap"]) == 200


def test_q_galore_without_quantisation_and_lazy_threshold_above_one_is_galore_8bit(tiny, batch):
    """Q-GaLore test 4: proj_bits=None and cos_threshold > 1 == GaLore-AdamW8bit bit for bit."""
    from torch import nn

    results = []
    for name, extra in (("galore_adamw8bit", {}),
                        ("q_galore_adamw8bit", {"proj_bits": None,
                                                "proj_options": {"lazy_threshold": 1.5}})):
        model = tiny()
        opt = ro.create(name, model, rank=4, update_proj_gap=2, lr=1e-2, min_8bit_size=64,
                        **extra)
        for i in range(5):
            x, y = batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results.append(model.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
