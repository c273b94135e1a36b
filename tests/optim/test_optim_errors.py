"""Bad input gives a clear error (or a documented skip), never silent garbage."""

from __future__ import annotations

import pytest
import torch

import rankwise.optim as ro


def test_rank_above_matrix_size_names_the_limit():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(m, n\) = 4.*choose rank <= 4"):
        ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank": 5}])


def test_one_dimensional_parameter_in_projected_group_is_refused():
    b = torch.nn.Parameter(torch.zeros(6))
    with pytest.raises(ValueError, match="2-D matrix.*projector=None"):
        ro.LowRankOptimizer([{"params": [b], "projector": "svd", "rank": 2}])


def test_rank_and_fraction_are_exclusive_and_fraction_is_bounded():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match="exactly one of rank"):
        ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank": 2, "rank_fraction": 0.5}])
    with pytest.raises(ValueError, match=r"rank_fraction 1.5 must be in \(0, 1\]"):
        ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank_fraction": 1.5}])


def test_unknown_names_are_refused_with_the_choices():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match="projector 'nope' is unknown"):
        ro.LowRankOptimizer([{"params": [w], "projector": "nope", "rank": 2}])
    with pytest.raises(TypeError, match="unknown param-group keys"):
        ro.LowRankOptimizer([{"params": [w], "rnak": 2}])
    with pytest.raises(ValueError, match="moment_policy"):
        ro.LowRankOptimizer([w], moment_policy="forget")
    with pytest.raises(ValueError, match="unknown optimizer 'galore'"):
        ro.create("galore", [w])


def test_incompatible_axes_are_refused():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match="residual='drop'"):
        ro.LowRankOptimizer([{"params": [w], "rank": 2, "scaling": "channel",
                              "residual": "fira"}])
    with pytest.raises(ValueError, match="adafactor"):
        ro.LowRankOptimizer([{"params": [w], "rank": 2, "rule": "adafactor",
                              "residual": "fira"}])


def test_nan_gradient_raises_by_default_and_leaves_weights_untouched():
    w = torch.nn.Parameter(torch.ones(6, 4))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "identity", "rank": 4}])
    w.grad = torch.full((6, 4), float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/inf.*nonfinite='skip'"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(6, 4))


def test_nan_gradient_skip_is_a_logged_no_op(caplog):
    w = torch.nn.Parameter(torch.ones(6, 4))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "identity", "rank": 4}],
                              nonfinite="skip")
    w.grad = torch.full((6, 4), float("inf"))
    with caplog.at_level("WARNING"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(6, 4))
    assert "skipped" in caplog.text
    assert "step" not in opt.state[w] and "proj_count" not in opt.state[w]  # nothing counted


def test_identity_projector_needs_full_rank():
    with pytest.raises(ValueError, match="identity projector needs rank == min"):
        ro.make_projector("identity", (6, 4), 2)


def test_quantized_projector_refuses_index_only_bases():
    with pytest.raises(ValueError, match="saves nothing"):
        ro.make_projector("dct", (6, 4), 2, bits=4)


def test_layerwise_needs_a_lowrank_optimizer():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="step_param"):
        ro.LayerwiseUpdates(torch.optim.AdamW([w]))


def test_preset_on_a_model_without_targets_names_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules"):
        ro.create("galore_adamw", model, rank=2)


def test_nan_gradient_between_refreshes_is_caught_on_the_projected_gradient():
    w = torch.nn.Parameter(torch.ones(6, 4))
    opt = ro.LowRankOptimizer([{"params": [w], "projector": "svd", "rank": 2}],
                              update_proj_gap=10)
    w.grad = torch.randn(6, 4)
    opt.step()
    before = w.detach().clone()
    bad = torch.randn(6, 4)
    bad[3, 1] = float("inf")
    w.grad = bad
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        opt.step()
    assert torch.equal(w.detach(), before) and int(opt.state[w]["step"]) == 1
