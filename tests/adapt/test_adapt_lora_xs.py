"""LoRA-XS (Bałazy et al., arXiv 2405.17604; ΔW = s · B R A, B and A from the SVD of W): SVD
bases, best rank-r approximation at R = I, the init's spectral bound, R-only training.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import (
    backward_names,
    inputs_for,
    layers_model,
    run,
)

from rankwise import adapt

SHAPES = {"a": (9, 7), "b": (5, 11)}


def adapted(**kw):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "lora_xs", target_modules=list(SHAPES), **({"rank": 3} | kw))
    return model


def test_bases_are_the_svd_of_w_and_R_identity_gives_the_best_rank_r_part():
    base = layers_model(SHAPES)
    model = adapted()
    for name, layer in model.items():
        m, W = layer.adapter, base[name].weight.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(m.B.T @ m.B, torch.eye(3, dtype=W.dtype))
        torch.testing.assert_close(m.A @ m.A.T, torch.diag(S[:3] ** 2))
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]  # Eckart–Young
        torch.testing.assert_close(m.B @ torch.eye(3, dtype=W.dtype) @ m.A, best)
        torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=0)  # W untouched


def test_official_init_is_a_tiny_perturbation_within_its_spectral_bound():
    base = layers_model(SHAPES)
    model = adapted(alpha=6.0)
    for name, layer in model.items():
        m = layer.adapter
        assert 0 < m.R.abs().max() < 1e-4  # N(0, 1e-5²)
        sigma1 = torch.linalg.matrix_norm(base[name].weight.detach(), ord=2)
        bound = 2.0 * sigma1 * torch.linalg.matrix_norm(m.R.detach(), ord=2)  # s = 6/3
        assert torch.linalg.matrix_norm(m.delta_weight().detach(), ord=2) <= bound * (1 + 1e-9)


def test_only_R_trains_with_r_squared_parameters():
    model = adapted(init="zero")
    assert adapt.trainable_parameter_count(model) == len(SHAPES) * 3 * 3
    model.train()
    xs = inputs_for(model)
    names = backward_names(model, sum(o.square().sum() for o in run(model, xs).values()))
    assert names == {f"{n}.adapter.R" for n in SHAPES}
    assert all(torch.count_nonzero(layer.adapter.R.grad) > 0 for layer in model.values())


def test_bad_options():
    with pytest.raises(ValueError, match="init must be"):
        adapted(init="kaiming")
    with pytest.raises(ValueError, match=r"rank 6 exceeds min\(m, n\) = 5"):
        adapted(rank=6)
