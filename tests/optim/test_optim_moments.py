"""Moment policies on subspace change, 8-bit moments, and parity with galore-torch."""

from __future__ import annotations

import pytest
import torch

import rankwise.optim as ro
from rankwise.optim import qstate
from rankwise.optim.lowrank_update import on_refresh


def _g(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 1e-2


def _steps(opt, w, n, start=0, shape=(12, 8)):
    for t in range(start, start + n):
        w.grad = _g(shape, t)
        opt.step()


def test_reset_zeroes_moments_and_restarts_bias_correction():
    """Card 9 test 3 / FRUGAL test 4: right after a reset the update has Adam's first-step
    form -lr * g / (|g| + eps) (identity projector, torch style)."""
    w = torch.nn.Parameter(torch.zeros(12, 8))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "identity", "rank": 8}], lr=0.1,
                              update_proj_gap=3, moment_policy="reset")
    _steps(opt, w, 3)
    before = w.detach().clone()
    g = _g((12, 8), 3)
    w.grad = g.clone()
    opt.step()  # t = 3: refresh + reset, then one Adam step from zero moments
    assert int(opt.state[w]["moment_step"]) == 1 and int(opt.state[w]["step"]) == 4
    torch.testing.assert_close(w.detach() - before, -0.1 * g / (g.abs() + 1e-8),
                               rtol=1e-5, atol=1e-7)


def test_reproject_with_an_unchanged_subspace_equals_keep():
    kw = dict(projector="identity", rank=8, update_proj_gap=2, lr=1e-2)
    runs = {}
    for policy in ("keep", "reproject"):
        w = torch.nn.Parameter(torch.zeros(12, 8))
        opt = ro.LowRankOptimizer([{"params": [w], **kw}], moment_policy=policy)
        _steps(opt, w, 7)
        runs[policy] = w.detach()
    torch.testing.assert_close(runs["reproject"], runs["keep"], rtol=0, atol=1e-7)


def test_reproject_for_dct_keeps_moments_of_columns_in_both_subspaces():
    w = torch.nn.Parameter(torch.zeros(12, 8))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "dct", "rank": 3}], lr=1e-2,
                              update_proj_gap=2, moment_policy="reproject")
    _steps(opt, w, 2)
    st = opt.state[w]
    old_idx, old_m = st["proj_idx"].tolist(), st["exp_avg"].clone()
    proj = opt.projector_for(w)
    old_basis = proj.basis().clone()
    proj.update(_g((12, 8), 50), 2)
    on_refresh(proj, opt.param_groups[0], st, old_basis, w.device, torch.float32)
    new_idx = st["proj_idx"].tolist()
    for j, col in enumerate(new_idx):
        expected = old_m[:, old_idx.index(col)] if col in old_idx else torch.zeros(12)
        torch.testing.assert_close(st["exp_avg"][:, j], expected, atol=1e-6, rtol=0)


def test_8bit_moments_track_fp32_and_bytes_follow_the_block_formula():
    shape, r, block = (64, 48), 8, 256
    runs, opts = {}, {}
    for bits in (32, 8):
        w = torch.nn.Parameter(torch.zeros(shape))
        opt = ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank": r}], lr=1e-2,
                                  state_bits=bits, block_size=block, update_proj_gap=10)
        _steps(opt, w, 20, shape=shape)
        runs[bits], opts[bits] = w.detach(), opt
    rel = (runs[8] - runs[32]).norm() / runs[32].norm()
    assert rel < 0.05, f"8-bit moments drift {rel:.3f} from fp32"
    numel = 64 * r
    blocks = -(-numel // block)
    per_moment = blocks * block + 4 * blocks + 8 * 3  # int8 codes, fp32 scales, shape(2)+block
    projector = 4 * r * 48
    assert opts[8].state_bytes() == 2 * per_moment + projector + 32
    assert qstate.is_quantized(opts[8].state[next(iter(opts[8].state))], "exp_avg_sq")


def test_8bit_moments_keep_small_entries_that_a_linear_code_would_zero():
    """Companded storage (V^(1/4), sign*sqrt|M|) keeps entries 1e-4 below the block max
    nonzero, within half a code step in the companded domain; a linear int8 code of the same
    tensors reads them back as 0 (the failure that turns M / (sqrt(V) + eps) into M / eps)."""
    from rankwise.linalg import dequantize_blockwise, quantize_blockwise

    v = torch.full((256,), 1e-8)
    v[0] = 1e-4
    m = torch.full((256,), -1e-6)
    m[0] = 1e-2
    st = {}
    for name, x, root in (("exp_avg_sq", v, 0.25), ("exp_avg", m, 0.5)):
        qstate.init(st, name, x.shape, "cpu", 8, 256)
        qstate.write(st, name, x)
        back = qstate.read(st, name)
        assert (back[1:] != 0).all()
        c = lambda t, r=root: t.sign() * t.abs().pow(r)  # noqa: E731
        assert float((c(back) - c(x)).abs().max()) <= float(c(x).abs().max()) / 254 + 1e-9
        linear = dequantize_blockwise(quantize_blockwise(x, bits=8, block_size=256))
        assert (linear[1:] == 0).all()


@pytest.mark.parametrize("shape", [(24, 12), (12, 16)])
def test_galore_adamw_matches_galore_torch(shape):
    galore_torch = pytest.importorskip("galore_torch")
    w0 = torch.randn(*shape)
    results = []
    for make in (
        lambda w: galore_torch.GaLoreAdamW(
            [{"params": [w], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}],
            lr=1e-2, no_deprecation_warning=True),
        lambda w: ro.create("galore_adamw", [{"params": [w], "rank": 4}], update_proj_gap=3,
                            lr=1e-2),
    ):
        w = torch.nn.Parameter(w0.clone())
        opt = make(w)
        _steps(opt, w, 7, shape=shape)
        results.append(w.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)


def test_galore_torch_state_is_not_weights_only_loadable_but_ours_is():
    """The contract this package fixes: galore-torch keeps a Python projector in its state."""
    import io

    galore_torch = pytest.importorskip("galore_torch")
    w = torch.nn.Parameter(torch.randn(12, 8))
    theirs = galore_torch.GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3,
                                        "scale": 1.0, "proj_type": "std"}],
                                      no_deprecation_warning=True)
    ours = ro.create("galore_adamw", [{"params": [w], "rank": 2}])
    for opt in (theirs, ours):
        w.grad = torch.randn(12, 8)
        opt.step()
    for opt, ok in ((theirs, False), (ours, True)):
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        if ok:
            torch.load(buf, weights_only=True)
        else:
            with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
                torch.load(buf, weights_only=True)
