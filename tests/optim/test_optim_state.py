"""The state contract: tensors only, weights_only-loadable, exact resume, bytes = formula."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import rankwise.optim as ro


def _train(model, opt, steps, batch, start=0):
    for i in range(start, start + steps):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


PRESET_OPTIONS = {
    "galore_adamw": {"rank": 4},
    "galore_adafactor": {"rank": 4},
    "galore_adamw8bit": {"rank": 4, "min_8bit_size": 64},
    "q_galore_adamw8bit": {"rank": 4, "proj_options": {"lazy_threshold": -2.0, "lazy_queue": 1}},
    "fira": {"rank": 4},
    "frugal": {"rank": 4},
    "apollo": {"rank": 4},
    "apollo_mini": {},
    "gradnormlorp": {"rank": 4},
    "dct_adamw": {"rank": 4},
}


def _make(name, tiny):
    model = tiny()
    if name == "gradnormlorp":
        ro.apply_weight_norm(model)
    opt = ro.create(name, model, update_proj_gap=3, lr=1e-2, **PRESET_OPTIONS[name])
    return model, opt


@pytest.mark.parametrize("name", sorted(PRESET_OPTIONS))
def test_resume_after_n_steps_equals_uninterrupted(name, tiny, batch):
    assert set(PRESET_OPTIONS) == set(ro.available())
    model, opt = _make(name, tiny)
    _train(model, opt, 8, batch)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = _make(name, tiny)
    _train(model, opt, 4, batch)  # stop mid-period (refresh gap 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # tensors and plain values only
    model, opt = _make(name, tiny)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    _train(model, opt, 4, batch, start=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), f"{name}: {key} differs after resume"


def test_state_holds_tensors_only(tiny, batch):
    model, opt = _make("q_galore_adamw8bit", tiny)
    _train(model, opt, 2, batch)
    for st in opt.state_dict()["state"].values():
        assert st and all(isinstance(v, torch.Tensor) for v in st.values())


def test_loaded_state_keeps_integer_dtypes(tiny, batch):
    model, opt = _make("dct_adamw", tiny)
    _train(model, opt, 1, batch)
    model2, opt2 = _make("dct_adamw", tiny)
    opt2.load_state_dict(opt.state_dict())
    idx = [st["proj_idx"] for st in opt2.state.values() if "proj_idx" in st]
    assert idx and all(t.dtype == torch.int32 for t in idx)


SCALARS = 4 * 8  # step, moment_step, proj_seed, proj_count: one int64 each


@pytest.mark.parametrize("shape", [(24, 12), (12, 16)])
def test_state_bytes_equal_the_galore_formula(shape):
    """Card 0: projector a*r + moments 2*b*r elements (fp32), plus 4 int64 counters."""
    r = 3
    w = nn.Parameter(torch.randn(shape))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank": r}])
    w.grad = torch.randn(shape)
    opt.step()
    a, b = min(shape), max(shape)
    assert opt.state_bytes() == 4 * r * (a + 2 * b) + SCALARS


def test_dct_state_is_moments_plus_r_int32_indices():
    """Card 5 test 4: no a x r float projector; the extra per-layer state is r int32 indices."""
    r, shape = 3, (24, 12)
    w = nn.Parameter(torch.randn(shape))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "dct", "rank": r}])
    w.grad = torch.randn(shape)
    opt.step()
    st = opt.state[w]
    assert "proj_basis" not in st and st["proj_idx"].dtype == torch.int32
    assert st["proj_idx"].numel() == r
    assert opt.state_bytes() == 4 * 2 * 24 * r + 4 * r + SCALARS


def test_seed_only_random_projector_stores_no_basis():
    r, shape = 2, (24, 12)
    w = nn.Parameter(torch.randn(shape))
    opt = ro.create("apollo", [{"params": [w], "rank": r}])
    w.grad = torch.randn(shape)
    opt.step()
    assert "proj_basis" not in opt.state[w]
    limiter = 4  # one fp32 scalar: the previous residual norm
    assert opt.state_bytes() == 4 * 2 * 24 * r + SCALARS + limiter


def test_plain_group_state_bytes_equal_adamw():
    b = nn.Parameter(torch.randn(10))
    opt = ro.LowRankOptimizer([b])
    b.grad = torch.randn(10)
    opt.step()
    assert opt.state_bytes() == 2 * 4 * 10 + 2 * 8
