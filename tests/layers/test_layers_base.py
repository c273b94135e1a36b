"""Model-level conversion: every method replaces nn.Linear layers and converts back exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankwise.layers._base import (
    LAYER_METHODS,
    ParameterizedLinear,
    convert_,
    converted_layers,
    get_layer_class,
    method_of,
    to_dense_,
    to_factorized_,
)

KWARGS = {
    "factorized": {"rank": 3, "allow_no_saving": True},
    "relora": {"rank": 3, "dropout": 0.0},
    "sltrain": {"rank": 3, "density": 0.1},
    "lost": {"rank": 3, "density": 0.25},
    "sst": {"rank": 3},
    "maestro": {},
    "trp": {},
    "monarch": {"nblocks": 4},
}


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 12), nn.GELU(), nn.Linear(12, 8)
    )


def perturb_(model: nn.Module, steps: int = 2) -> None:
    """A few SGD steps so that zero-initialised factors (B = 0) become nonzero."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(torch.randn(6, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_registry_names_every_method():
    assert set(KWARGS) == set(LAYER_METHODS)
    for name in LAYER_METHODS:
        assert isinstance(get_layer_class(name), type)
    with pytest.raises(ValueError, match="unknown layer method 'galore'.*choose one of"):
        get_layer_class("galore")


@pytest.mark.parametrize("method", sorted(KWARGS))
def test_to_dense_gives_identical_outputs(method):
    model = mlp()
    new = convert_(model, method, target_modules=["0", "2"], **KWARGS[method])
    assert set(new) == {"0", "2"}
    assert method_of(model) == {method}
    assert isinstance(model[4], nn.Linear)  # untouched
    perturb_(model)
    model.eval()
    x = torch.randn(7, 16)
    with torch.no_grad():
        y = model(x)
        assert set(to_dense_(model)) == {"0", "2"}
        assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    assert method_of(model) == set()


@pytest.mark.parametrize("method", ["sst", "maestro", "trp"])
def test_natural_rank_factorization_is_exact(method):
    model = mlp()
    convert_(model, method, target_modules=["2"], **KWARGS[method])
    perturb_(model)
    model.eval()
    layer = model[2]
    if method == "trp":
        layer.project_(0.9)  # rank k: keeping sigma > 1e-2 is then exact
    x = torch.randn(5, 16)
    with torch.no_grad():
        y = model(x)
        to_factorized_(model)
        assert method_of(model) == {"factorized"}
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


def test_generic_to_factorized_needs_rank_and_is_exact_at_full_rank():
    layer = get_layer_class("sltrain")(12, 10, rank=2, density=0.2, generator=0)
    with pytest.raises(ValueError, match="to_factorized\\(rank=...\\)"):
        layer.to_factorized()
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer.to_factorized(10)(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(set(KWARGS) - {"factorized"}))
def test_frozen_and_trainable_names(method):
    layer = get_layer_class(method).from_linear(
        nn.Linear(16, 12), **{k: v for k, v in KWARGS[method].items() if k != "allow_no_saving"}
    )
    names = set(layer.trainable_names())
    assert "bias" in names
    params = dict(layer.named_parameters())
    assert names == {n for n, p in params.items() if p.requires_grad}
    frozen = {n for n, p in params.items() if not p.requires_grad}
    expected_frozen = {"relora": {"weight"}, "sst": {"U", "Vh"}}.get(method, set())
    assert frozen == expected_frozen
    assert layer.num_parameters(trainable_only=True) == sum(params[n].numel() for n in names)


def test_convert_twice_and_bad_targets_raise():
    model = mlp()
    convert_(model, "trp")  # every linear (no output head in a Sequential)
    with pytest.raises(ValueError, match="already converted.*to_dense_"):
        convert_(model, "sst", rank=2)
    with pytest.raises(ValueError, match="matched no module"):
        convert_(mlp(), "trp", target_modules=["nope"])


def test_convert_skips_output_head_and_embeddings_of_a_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    new = convert_(model, "sltrain", rank=4, density=0.05)
    assert len(new) == 7 and not any("lm_head" in n or "embed" in n for n in new)
    assert isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        logits = model(ids).logits
        to_dense_(model)
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 13])
@pytest.mark.parametrize("method", ["relora", "sltrain", "lost", "sst"])
def test_rank_out_of_range_raises(method, rank):
    kw = {k: v for k, v in KWARGS[method].items() if k != "rank"}
    with pytest.raises(ValueError, match="rank"):
        convert_(mlp(), method, target_modules=["2"], rank=rank, **kw)


@pytest.mark.parametrize("density", [0.0, 1.0, 1.5, -0.1, math.nan])
@pytest.mark.parametrize("method", ["sltrain", "lost"])
def test_density_outside_open_unit_interval_raises(method, density):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        convert_(mlp(), method, target_modules=["2"], rank=2, density=density)


def test_non_int_rank_and_non_linear_raise():
    with pytest.raises(TypeError, match="rank must be an int"):
        convert_(mlp(), "sltrain", rank=2.5)
    with pytest.raises(TypeError, match="nn.Linear"):
        get_layer_class("trp").from_linear(nn.Conv1d(3, 3, 1))


def test_nan_weight_raises():
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        get_layer_class("sst").from_linear(lin, rank=2)


def test_converted_layers_and_subclass_protocol():
    model = mlp()
    convert_(model, "maestro", target_modules=["0"])
    convert_(model, "lost", target_modules=["2"], rank=2, channels=3)
    layers = converted_layers(model)
    assert set(layers) == {"0", "2"} and all(
        isinstance(m, ParameterizedLinear) for m in layers.values()
    )
    assert method_of(model) == {"maestro", "lost"}
