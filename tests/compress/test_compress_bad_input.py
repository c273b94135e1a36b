"""Bad input to compress_ (issue 6): a clear error naming the fix, or a documented fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from rankwise.compress import compress_
from rankwise.layers import FactorizedLinear


def _toy(dead: int = 0) -> nn.Sequential:
    """Embedding -> Linear -> ReLU -> Linear without repeated blocks; `dead` zeroed input features."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        model[0].weight[:, :dead] = 0
    return model


IDS = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("ratio", [1.0, -1e-9, float("nan")])
def test_ratio_outside_the_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        compress_(_toy(), "svd-llm", ratio, calibration=IDS, progress=False)


def test_ratio_zero_keeps_every_layer_dense():
    model = _toy()
    report = compress_(model, "svd-llm", 0.0, calibration=IDS, progress=False)
    assert report.n_factorized == 0 and report.params_model_after == report.params_model_before
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())


@pytest.mark.parametrize("method", ["svd-llm", "svd-llm-seq"])
def test_too_little_calibration_data_names_the_fix(method):
    with pytest.raises(ValueError, match="at least 128.*raise n_samples or seq_len"):
        compress_(_toy(), method, 0.2, calibration=IDS[:3, :16], progress=False)


def test_a_model_without_linear_layers():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Conv1d(16, 16, 3))
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        compress_(model, "svd-llm", 0.2, calibration=IDS, progress=False)


def test_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match="matched no module"):
        compress_(_toy(), "lord", 0.2, target_modules=["q_proj"], calibration=IDS, progress=False)


def test_block_wise_update_needs_repeated_blocks():
    with pytest.raises(ValueError, match="no nn.ModuleList of blocks.*method='svd-llm'"):
        compress_(_toy(), "svd-llm-seq", 0.3, calibration=IDS, progress=False)


def test_singular_covariance_falls_back_to_jitter_and_stays_optimal_on_the_data(caplog):
    """Dead input features make the Gram singular however many tokens there are: Cholesky
    retries with jitter (logged) and the whitened SVD still beats plain SVD at equal rank on
    the calibration inputs (its defining property)."""
    whitened, plain = _toy(dead=5), _toy(dead=5)
    x = whitened[0](IDS).reshape(-1, 16).detach()
    gram = (x.T @ x).double()
    assert torch.linalg.matrix_rank(gram) <= 11  # singular: 5 dead inputs
    with caplog.at_level(logging.INFO, logger="rankwise.linalg"):
        compress_(whitened, "svd-llm", 0.3, calibration=IDS, progress=False)
    assert "singular" in caplog.text
    compress_(plain, "lord", 0.3, calibration=IDS, progress=False)
    with torch.no_grad():
        ref = _toy(dead=5)[1](x)
        err_w = float((whitened[1](x) - ref).pow(2).sum())
        err_p = float((plain[1](x) - ref).pow(2).sum())
    assert torch.isfinite(torch.tensor(err_w)) and err_w < err_p
    assert whitened[1].rank == plain[1].rank
