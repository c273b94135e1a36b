"""The fused update paths (in-place GEMM back-projection, Fira's one-GEMM form with the
residual norm from channel norms) equal the textbook formulas they replace."""

from __future__ import annotations

import pytest
import torch

import rankwise.optim as ro
from rankwise.optim import functional as ofn


def _g(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(24, 12), (12, 20)])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_residual_norm_from_channel_norms_equals_the_formed_residual(shape, scale):
    g = _g(shape, 0)
    proj = ro.make_projector("svd", shape, 4)
    proj.update(_g(shape, 1), 0)  # a subspace that is not g's own
    low = proj.down(g)
    weight = _g((shape[0], 1) if proj.side == "right" else (1, shape[1]), 2).abs()
    direct = ((g - scale * proj.up(low)) * weight).norm()
    got = ofn.residual_norm(g, low, proj.side, scale, weight)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)


def _fira_reference(w0, grads, rank, scale, lr, gap, gamma=1.01, eps=1e-6, **proj_options):
    """Fira eq. (6) + limiter written out: GaLore-style Adam on R = down(G), N = M / denom,
    delta = s up(N) + limit(c ⊙ (G - s up(R))), c = ||N_c|| / (||R_c|| + 1e-8)."""
    w = w0.clone()
    proj, m, v, prev = None, None, None, None
    for t, g in enumerate(grads):
        if t % gap == 0:
            proj = ro.make_projector("svd", tuple(g.shape), rank, **proj_options)
            proj.update(g, t)
        r = proj.down(g)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m.mul_(0.9).add_(r, alpha=0.1)
        v.mul_(0.999).addcmul_(r, r, value=0.001)
        k = t + 1
        eta = lr * (1 - 0.999**k) ** 0.5 / (1 - 0.9**k)
        n = m / (v.sqrt() + eps)
        dim = 1 if proj.side == "right" else 0
        c = n.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        res = (g - scale * proj.up(r)) * c
        norm = res.norm()
        if prev is not None:
            limit = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma
            res, norm = res / limit, norm / limit
        prev = norm
        w -= eta * (scale * proj.up(n) + res)
    return w


@pytest.mark.parametrize("shape", [(24, 12), (12, 20)])
def test_fira_fused_update_equals_equation_6_with_limiter(shape):
    grads = [_g(shape, 10 + i) * (1 + i) for i in range(7)]  # growing norms: limiter engages
    w0 = _g(shape, 3)
    w = torch.nn.Parameter(w0.clone())
    opt = ro.create("fira", [{"params": [w], "rank": 4}], update_proj_gap=3, lr=1e-2)
    for g in grads:
        w.grad = g
        opt.step()
    ref = _fira_reference(w0, grads, 4, 0.25, 1e-2, 3)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 12), (12, 20)])
def test_fira_with_a_quantised_basis_equals_equation_6_with_the_formed_residual(shape):
    """An int4 basis is not orthonormal, so the channel-norm shortcut for the residual's norm
    is wrong for it (checked first); the optimizer forms the residual instead, and its
    trajectory equals Fira eq. (6) written out with the same int4 projector."""
    grads = [_g(shape, 20 + i) * (1 + i) for i in range(7)]  # growing norms: limiter engages
    proj = ro.make_projector("svd", shape, 4, bits=4, group_size=256)
    proj.update(grads[0], 0)
    low, c = proj.down(grads[1]), _g((shape[0], 1) if proj.side == "right" else (1, shape[1]), 2)
    formed = (proj.residual(grads[1], low * 0.25) * c.abs()).norm()
    shortcut = ofn.residual_norm(grads[1], low, proj.side, 0.25, c.abs())
    assert abs(float(shortcut / formed) - 1) > 1e-4  # the shortcut would be measurably off

    w0 = _g(shape, 4)
    w = torch.nn.Parameter(w0.clone())
    opt = ro.create("fira", [{"params": [w], "rank": 4}], proj_bits=4, update_proj_gap=3,
                    lr=1e-2)
    for g in grads:
        w.grad = g
        opt.step()
    assert not opt.projector_for(w).orthonormal
    ref = _fira_reference(w0, grads, 4, 0.25, 1e-2, 3, bits=4, group_size=256)
    # the shortcut's trajectory is ~1e-5 away: this tolerance tells the two apart
    torch.testing.assert_close(w.detach(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", [(24, 12), (12, 20)])
@pytest.mark.parametrize("temp_max", [1 << 24, 0])  # GEMM + add, or addmm_ accumulation
def test_in_place_back_projection_equals_up_then_add(shape, temp_max, monkeypatch):
    from rankwise.optim import projector

    monkeypatch.setattr(projector, "ADD_UP_TEMP_MAX", temp_max)
    proj = ro.make_projector("randomized", shape, 4, seed=1)
    proj.update(_g(shape, 0), 0)
    low = torch.randn(proj.low_shape)
    w = _g(shape, 5)
    expected = w + proj.up(low)
    torch.testing.assert_close(proj.add_up_(w.clone(), low), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(proj.residual(w, low), w - proj.up(low), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_8bit_codec_round_trip_within_half_a_step_and_leaves_its_input_alone(name):
    """Blockwise absmax int8 of the companded value (sign·√|M|, V^¼): read(write(x)) is within
    half a code step (block max / 254) of x in the companded domain, on a size that is not a
    multiple of the block (padding), and write does not modify the tensor it is given."""
    from rankwise.optim import qstate

    x = _g((37, 11), 4)
    x = x.square() if name == "exp_avg_sq" else x
    keep = x.clone()
    st: dict = {}
    qstate.init(st, name, x.shape, "cpu", 8, 64)
    qstate.write(st, name, x)
    assert torch.equal(x, keep)
    back = qstate.read(st, name)
    root = 0.25 if name == "exp_avg_sq" else 0.5
    comp = lambda t: t.sign() * t.abs().pow(root)  # noqa: E731
    flat = torch.cat([comp(x).reshape(-1), torch.zeros(64 * 7 - x.numel())]).view(7, 64)
    step = flat.abs().amax(1, keepdim=True) / 254
    err = (comp(back).reshape(-1) - comp(x).reshape(-1)).abs()
    assert (err <= step.expand(7, 64).reshape(-1)[: x.numel()] * (1 + 1e-5) + 1e-7).all()
    assert st[f"{name}_q_codes"].dtype == torch.int8 and st[f"{name}_q_codes"].shape == (7, 64)


@pytest.mark.parametrize(("style", "weight_decay"), [("torch", 0.1), ("galore", 0.0)])
def test_compiled_8bit_adam_equals_the_eager_codec(monkeypatch, style, weight_decay):
    """qstate_fused (decode, Adam, encode in one compiled pass) against qstate's eager read ->
    torch's fused AdamW -> write, on a plain 8-bit moment and a projected one, both above
    MIN_FUSED entries; galore style folds eps into eps / sqrt(bc2)."""
    import shutil

    from rankwise.optim import qstate_fused

    if qstate_fused._disabled or not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile is unavailable here (RANKWISE_COMPILE=0 or no C++ compiler): "
                    "the eager codec runs, tested above")

    def run(fused):
        monkeypatch.setattr(qstate_fused, "_disabled", not fused)
        w = torch.nn.Parameter(_g((160, 128), 0))  # 20480 entries: fused when allowed
        e = torch.nn.Parameter(_g((144, 128), 1))  # projected, rank 128: (144, 128) moments
        opt = ro.LowRankOptimizer([{"params": [w]}, {"params": [e], "projector": "svd",
                                                      "rank": 128, "update_proj_gap": 2}],
                                  lr=1e-2, state_bits=8, adam_style=style,
                                  weight_decay=weight_decay, min_8bit_size=0)
        for t in range(4):
            w.grad, e.grad = _g((160, 128), 10 + t) * 1e-2, _g((144, 128), 20 + t) * 1e-2
            opt.step()
        assert qstate_fused._disabled is not fused  # the compiled path ran: no fallback
        return w.detach() - _g((160, 128), 0), e.detach() - _g((144, 128), 1), opt

    fused, eager = run(True), run(False)
    for a, b in zip(fused[:2], eager[:2], strict=True):
        assert float((a - b).norm() / b.norm()) < 2e-3  # rounding of the codes only
    for p_f, p_e in zip(fused[2].state.values(), eager[2].state.values(), strict=True):
        codes = [k for k in p_f if k.endswith("_codes")]
        assert codes
        for k in codes:
            assert float((p_f[k] != p_e[k]).float().mean()) < 0.01
