"""Exact equivalences of the projected optimizers with their full-rank rules (GaLore, Zhao et al.
2024, and the presets built on it).

Adam is not rotation-equivariant (GaLore's own caveat): only the identity or a signed permutation makes
projected Adam equal AdamW; SGD-momentum is linear, so any full-rank orthogonal P does.
"""

from __future__ import annotations

import math

import pytest
import torch

import rankwise.optim as ro
from rankwise.optim.projector import PROJECTORS, Projector


class SignedPermutation(Projector):
    """Test projector: a fixed random signed permutation (rank = min(m, n))."""

    kind = "test_signed_perm"

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        a = min(self.shape)
        gen = torch.Generator().manual_seed(1234)
        perm = torch.randperm(a, generator=gen)
        signs = torch.randint(0, 2, (a,), generator=gen).float() * 2 - 1
        p = torch.zeros(a, a)
        p[torch.arange(a), perm] = signs
        self.state["proj_basis"] = p.T.contiguous() if self.side == "left" else p


@pytest.fixture(autouse=True)
def _register_signed_perm():
    ro.register_projector(SignedPermutation)
    yield
    PROJECTORS.pop(SignedPermutation.kind, None)


def _grads(shape, steps, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * scale for _ in range(steps)]


def _run(make_opt, shape=(12, 8), steps=10, seed=0, scale=1e-3, w0=None):
    w = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(7))
                           if w0 is None else w0.clone())
    opt = make_opt(w)
    for g in _grads(shape, steps, seed, scale):
        w.grad = g.clone()
        opt.step()
    return w.detach()


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
@pytest.mark.parametrize("kind", ["identity", "test_signed_perm"])
def test_identity_or_signed_permutation_equals_torch_adamw(shape, kind):
    ref = _run(lambda w: torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1, fused=True), shape)
    got = _run(lambda w: ro.LowRankOptimizer(
        [{"params": [w], "projector": kind, "rank": min(shape)}], lr=1e-2, weight_decay=0.1,
        update_proj_gap=3, moment_policy="keep"), shape)
    if kind == "identity":
        assert torch.equal(ref, got)  # the same fused kernel, bit for bit
        plain = _run(lambda w: torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1), shape)
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)  # and torch's default path
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_plain_group_is_bitwise_torch_adamw():
    b = torch.randn(9)
    ref = _run(lambda w: torch.optim.AdamW([w], lr=3e-3, weight_decay=0.01), (9,), w0=b)
    got = _run(lambda w: ro.LowRankOptimizer([w], lr=3e-3, weight_decay=0.01), (9,), w0=b)
    assert torch.equal(ref, got)


def _reference_galore_adam(shape, steps, lr, eps, wd, betas=(0.9, 0.999)):
    """Card 0's HF-style Adam written out: eps on sqrt(V), bias correction in the step size,
    decay after the update."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    m = torch.zeros(shape)
    v = torch.zeros(shape)
    for t, g in enumerate(_grads(shape, steps), start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        eta = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        w = w - eta * m / (v.sqrt() + eps)
        w = w - lr * wd * w
    return w


def test_galore_style_identity_equals_reference_adam():
    ref = _reference_galore_adam((12, 8), 10, lr=1e-2, eps=1e-6, wd=0.1)
    got = _run(lambda w: ro.LowRankOptimizer(
        [{"params": [w], "projector": "identity", "rank": 8}], lr=1e-2, eps=1e-6,
        weight_decay=0.1, adam_style="galore"))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_full_rank_orthogonal_projector_with_sgd_momentum_equals_sgd(shape):
    ref = _run(lambda w: torch.optim.SGD([w], lr=0.1, momentum=0.9), shape, scale=1.0)
    got = _run(lambda w: ro.LowRankOptimizer(
        [{"params": [w], "projector": "random_orthogonal", "rank": min(shape)}], lr=0.1,
        betas=(0.9, 0.999), rule="sgd", update_proj_gap=1000), shape, scale=1.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_full_rank_orthogonal_projector_with_adam_is_not_adamw():
    """GaLore's caveat, as a guard: a rotated Adam must differ from AdamW."""
    ref = _run(lambda w: torch.optim.AdamW([w], lr=1e-2), (12, 8))
    got = _run(lambda w: ro.LowRankOptimizer(
        [{"params": [w], "projector": "random_orthogonal", "rank": 8}], lr=1e-2))
    assert (got - ref).abs().max() > 1e-4


def test_fira_at_full_rank_and_scale_one_equals_galore():
    kw = dict(projector="svd", rank=8, scale=1.0, adam_style="galore", eps=1e-6, lr=1e-2)
    galore = _run(lambda w: ro.LowRankOptimizer([w], **kw))
    fira = _run(lambda w: ro.LowRankOptimizer([w], residual="fira", limiter=True, **kw))
    assert torch.isfinite(fira).all()
    torch.testing.assert_close(fira, galore, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_fira_residual_is_orthogonal_to_the_subspace(shape):
    g = _grads(shape, 1)[0]
    proj = ro.make_projector("svd", shape, 3, state={})
    proj.update(g, 0)
    residual = g - proj.up(proj.down(g))
    assert proj.down(residual).abs().max() <= 1e-5 * g.abs().max()
    assert residual.norm() > 0.1 * g.norm()  # rank 3 of 8 leaves a real residual


def _adam_n(g, eps=1e-6):
    """Adam's first normalised direction N = M/(sqrt(V)+eps) with galore-style bias handling."""
    m, v = 0.1 * g, 0.001 * g * g
    return m / (v.sqrt() + eps)


def test_apollo_tensor_mode_identity_is_normalised_sgd():
    """APOLLO test 1: identity projector, tensor scaling, no limiter: first update equals
    G * ||Adam(G)|| / ||G|| (times the step size)."""
    w0 = torch.randn(12, 8)
    g = _grads((12, 8), 1)[0]
    w = torch.nn.Parameter(w0.clone())
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "identity", "rank": 8,
                                "scaling": "tensor"}], lr=0.1, adam_style="galore", eps=1e-6)
    w.grad = g.clone()
    opt.step()
    eta = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    expected = w0 - eta * g * (_adam_n(g).norm() / (g.norm() + 1e-8))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_apollo_channel_mode_identity_scales_each_channel(shape):
    """APOLLO test 2 (and sqrt(scale)): each full-size channel j is updated by
    G_j ||Adam(G)_j|| / ||G_j||, times sqrt(scale)."""
    w0 = torch.randn(*shape)
    g = _grads(shape, 1)[0]
    w = torch.nn.Parameter(w0.clone())
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "identity", "rank": min(shape),
                                "scaling": "channel", "scale": 4.0}], lr=0.1,
                              adam_style="galore", eps=1e-6)
    w.grad = g.clone()
    opt.step()
    dim = 1 if shape[0] >= shape[1] else 0  # rows for right projection, columns for left
    s = _adam_n(g).norm(dim=dim, keepdim=True) / (g.norm(dim=dim, keepdim=True) + 1e-8)
    eta = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    torch.testing.assert_close(w.detach(), w0 - eta * 2.0 * g * s, rtol=1e-5, atol=1e-7)


def test_frugal_full_rank_identity_equals_torch_adamw_for_first_period():
    """FRUGAL test 1: rho = 1 with an identity projector leaves no residual (sign(0) = 0)."""
    ref = _run(lambda w: torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1), steps=4)
    got = _run(lambda w: ro.create("frugal", [{"params": [w], "rank": 8}], projector="identity",
                                   lr=1e-2, weight_decay=0.1, update_proj_gap=5), steps=4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_frugal_galore_settings_equal_galore_with_eps_zero():
    """FRUGAL test 3: reset off, no state-free residual, lr scale alpha == GaLore-AdamW."""
    kw = dict(projector="svd", rank=3, eps=0.0, lr=1e-2, update_proj_gap=4)
    galore = _run(lambda w: ro.LowRankOptimizer([w], scale=0.25, adam_style="galore",
                                                moment_policy="keep", **kw))
    frugal = _run(lambda w: ro.create("frugal", [{"params": [w], "rank": 3}],
                                      moment_policy="keep", residual="drop", scale=0.25, **kw))
    torch.testing.assert_close(frugal, galore, rtol=1e-5, atol=1e-6)


def test_frugal_residual_is_signsgd():
    """With rank r < a, the out-of-subspace part moves by exactly lr * sign(G - back(R))."""
    g = _grads((12, 8), 1, scale=1.0)[0]
    w0 = torch.zeros(12, 8)
    w = torch.nn.Parameter(w0.clone())
    opt = ro.create("frugal", [{"params": [w], "rank": 2}], lr=0.5)
    w.grad = g.clone()
    opt.step()
    proj = opt.projector_for(w)
    res = g - proj.up(proj.down(g))
    in_sub = w.detach() - (-0.5 * res.sign())
    # what is left lies in the subspace: projecting it out leaves nothing
    torch.testing.assert_close(in_sub - proj.up(proj.down(in_sub)), torch.zeros(12, 8),
                               atol=1e-6, rtol=0)


def test_galore_adafactor_identity_equals_hf_adafactor():
    from transformers.optimization import Adafactor

    kw = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    ref = _run(lambda w: Adafactor([w], **kw), scale=1.0)
    got = _run(lambda w: ro.LowRankOptimizer(
        [{"params": [w], "projector": "identity", "rank": 8}], lr=1e-2, rule="adafactor"),
        scale=1.0)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
