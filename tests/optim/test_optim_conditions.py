"""The conditions users train in: NaN batches, bf16 models, parameter lists, documented recipes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import rankwise.optim as ro
from rankwise.optim.precision import round_stochastic_

NAN_PRESETS = {
    "galore_adamw": {"rank": 4},
    "galore_adamw8bit": {"rank": 4, "min_8bit_size": 64},
    "q_galore_adamw8bit": {"rank": 4},
    "fira": {"rank": 4},
    "apollo": {"rank": 4},
    "dct_adamw": {"rank": 4},
    "frugal": {"rank": 4},
}


def _backward(model, batch, i):
    x, y = batch(i)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            copy.deepcopy(opt.state_dict()["state"]))


def _assert_same(a, b):
    (params_a, state_a), (params_b, state_b) = a, b
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), k
    assert state_a.keys() == state_b.keys()
    for pid in state_a:
        assert state_a[pid].keys() == state_b[pid].keys()
        for key, val in state_a[pid].items():
            assert torch.equal(val, state_b[pid][key]), (pid, key)


@pytest.mark.parametrize("name", sorted(NAN_PRESETS))
def test_refused_nan_step_leaves_parameters_and_state_bit_identical(name, tiny, batch):
    model = tiny()
    opt = ro.create(name, model, update_proj_gap=2, lr=1e-2, **NAN_PRESETS[name])
    for i in range(3):
        _backward(model, batch, i)
        opt.step()
    _backward(model, batch, 3)
    last = list(model.parameters())[-1]  # the last one updated: every other would go first
    last.grad[0, 0] = float("nan")
    before = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))


def test_skipped_nan_step_continues_as_if_the_batch_never_came(tiny, batch):
    runs = []
    for bad in (False, True):
        model = tiny()
        opt = ro.create("fira", model, rank=4, update_proj_gap=2, lr=1e-2, nonfinite="skip")
        for i in range(5):
            if bad and i == 2:
                _backward(model, batch, 99)
                model.attn.weight.grad[1, 1] = float("inf")
                opt.step()  # skipped: no counter moves, no refresh happens
            _backward(model, batch, i)
            opt.step()
        runs.append(_snapshot(model, opt))
    _assert_same(*runs)


# --------------------------------------------------------------------------- bf16


def _float_state(opt, p):
    return {k: v for k, v in opt.state[p].items() if v.is_floating_point() and v.ndim and v.numel()}


@pytest.mark.parametrize("name", ["galore_adamw", "apollo", "dct_adamw"])
def test_bf16_model_keeps_bf16_state_of_the_formula_size(name, tiny, batch):
    model = tiny().to(torch.bfloat16)
    opt = ro.create(name, model, rank=4, update_proj_gap=2)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
    opt.step()
    for p in model.parameters():
        st = _float_state(opt, p)
        assert st and all(v.dtype == torch.bfloat16 for v in st.values()), (name, st.keys())
    w = model.mlp.weight  # (24, 12): right projection, moments (24, 4)
    m, n, r = *w.shape, 4
    low = {"galore_adamw": 2 * m * r * 2 + r * n * 2,  # bf16 moments + bf16 basis
           "apollo": 2 * m * r * 2 + 4,                # + fp32 limiter norm, seed-only basis
           "dct_adamw": 2 * m * r * 2 + r * 4}[name]   # + int32 column indices
    counters = 4 * 8  # step, moment_step, proj_seed, proj_count: int64 scalars
    got = sum(v.numel() * v.element_size() for v in opt.state[w].values())
    assert got == low + counters  # torch AdamW on the same bf16 matrix: 2 * m * n * 2


def test_fp32_state_option_on_a_bf16_model(tiny, batch):
    model = tiny().to(torch.bfloat16)
    opt = ro.create("galore_adamw", model, rank=4, state_dtype=torch.float32)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
    opt.step()
    st = _float_state(opt, model.mlp.weight)
    assert {v.dtype for v in st.values()} == {torch.float32}
    assert model.mlp.weight.dtype == torch.bfloat16


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((20000,), 1.0 + 1e-3)  # bf16 neighbours: 1 and 1 + 2**-7
    out = torch.empty(20000, dtype=torch.bfloat16)
    round_stochastic_(out, x, seed=3)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(out.float().mean()) - (1.0 + 1e-3)) < 2e-4
    neg = torch.empty(20000, dtype=torch.bfloat16)
    round_stochastic_(neg, -x, seed=4)
    assert abs(float(neg.float().mean()) + (1.0 + 1e-3)) < 2e-4


def test_stochastic_rounding_keeps_updates_below_half_an_ulp():
    """Adam steps of a constant gradient move by lr = 1e-3 each; on bf16 weights at 1.0 (ulp
    below 1: 2**-8) round-to-nearest drops every one, stochastic rounding moves the weights
    by the fp32 amount on average."""
    finals = {}
    for sr in (False, True):
        w = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = ro.LowRankOptimizer([w], lr=1e-3, stochastic_rounding=sr)
        for _ in range(20):
            w.grad = torch.ones_like(w)
            opt.step()
        finals[sr] = float(w.detach().float().mean())
    assert finals[False] == 1.0
    assert abs(finals[True] - (1.0 - 20 * 1e-3)) < 2e-3


# --------------------------------------------------------------------------- parameter lists


def test_parameter_list_projects_every_matrix(tiny, batch):
    model = tiny()
    opt = ro.create("galore_adamw", model.parameters(), rank=4, update_proj_gap=2)
    lowrank = opt.param_groups[0]
    assert lowrank["projector"] == "svd" and lowrank["rank"] == 4
    mats = {id(p) for p in model.parameters() if p.ndim == 2 and min(p.shape) > 4}  # not head
    assert {id(p) for p in lowrank["params"]} == mats
    _backward(model, batch, 0)
    opt.step()
    assert all("proj_basis" in opt.state[p] for p in lowrank["params"])


def test_named_parameters_follow_the_model_rule(tiny, batch):
    results = []
    for make in (lambda m: ro.create("galore_adamw", m, rank=4, update_proj_gap=2),
                 lambda m: ro.create("galore_adamw", m.named_parameters(), rank=4,
                                     update_proj_gap=2)):
        model = tiny()
        opt = make(model)
        for i in range(4):
            _backward(model, batch, i)
            opt.step()
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_parameter_list_without_rank_or_matrices_is_refused(tiny):
    with pytest.raises(ValueError, match="needs rank="):
        ro.create("galore_adamw", tiny().parameters())
    with pytest.raises(ValueError, match="none of the given parameters is projected"):
        ro.create("galore_adamw", [nn.Parameter(torch.zeros(5))], rank=2)
    with pytest.raises(ValueError, match="none of the given parameters is projected"):
        ro.create("galore_adamw", [{"params": [nn.Parameter(torch.zeros(4, 4))],
                                    "projector": None}], rank=2)


# --------------------------------------------------------------------------- documented recipe


@pytest.mark.parametrize("shape", [(24, 12), (12, 16)])
def test_documented_galore_torch_style_groups_reproduce_galore_torch(shape):
    """docs/optim.md's LowRankOptimizer example, across two refreshes."""
    galore_torch = pytest.importorskip("galore_torch")
    w0, b0 = torch.randn(*shape), torch.randn(shape[0])
    grads = [(torch.randn(*shape), torch.randn(shape[0])) for _ in range(8)]
    out = []
    for ours in (False, True):
        w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
        groups = [{"params": [w], "rank": 4, "update_proj_gap": 3, "scale": 0.25,
                   "proj_type": "std"}, {"params": [b]}]
        if ours:
            opt = ro.LowRankOptimizer(groups, lr=1e-2, adam_style="galore", eps=1e-6,
                                      moment_policy="keep")
        else:
            opt = galore_torch.GaLoreAdamW(groups, lr=1e-2, no_deprecation_warning=True)
        for gw, gb in grads:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
        out.append((w.detach(), b.detach()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-6)


def test_gradnormlorp_without_weight_norm_warns(tiny):
    with pytest.warns(UserWarning, match="behaves exactly as galore_adamw"):
        ro.create("gradnormlorp", tiny(), rank=2)
    model = tiny()
    ro.apply_weight_norm(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ro.create("gradnormlorp", model, rank=2)
