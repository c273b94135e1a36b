"""The layer contract: what every registered parameterised linear layer must satisfy.

Parametrised over every registered layer method (`registered.layers()`), converting the two
linears of a small MLP with `rankwise.layers.convert_` (the public model-level API):

* fidelity at conversion: the converted weight reproduces W exactly, or as well as the table
  below says the method can by design (a truncation, a projection, or a fresh init);
* dense = forward: after training moves the factors, `to_dense_` gives plain nn.Linear layers
  with the same outputs;
* save / load: the state dict goes through safetensors and, loaded into a layer converted with
  another seed, reproduces the outputs (random supports and bases are state, not seed);
* trainable: `trainable_names()` are exactly the parameters that require grad, each of them
  receives a gradient, and `num_parameters(trainable_only=True)` counts them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import pytest
import torch
from registered import layers
from safetensors.torch import load, save
from torch import nn

from rankwise import layers as rl

METHODS = layers()
RANK = 3

#: options a method needs on the 16 -> 24 -> 12 MLP (the only per-method settings)
OPTIONS: dict[str, dict] = {
    "factorized": {"rank": RANK, "allow_no_saving": True},
    "relora": {"rank": RANK, "dropout": 0.0},
    "sltrain": {"rank": RANK, "density": 0.1},
    "lost": {"rank": RANK, "density": 0.25},
    "sst": {"rank": RANK},
    "monarch": {"nblocks": 4},
}


def eckart_young(w: torch.Tensor) -> float:
    """||W − W_r||_F / ||W||_F of the best rank-RANK approximation (Eckart–Young)."""
    s = torch.linalg.svdvals(w.double())
    return float(s[RANK:].norm() / s.norm())


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """The largest relative error ||W' − W||_F / ||W||_F a method may have at conversion."""

    reason: str
    bound: Callable[[torch.Tensor], float]
    keeps_bias: bool = True


EXACT = Fidelity("an exact reparameterisation of W", lambda w: 1e-5)

#: THE table of methods that do not reproduce W at conversion, with the reason and the bound
#: that still holds (every method not listed must be exact).
NOT_EXACT_AT_CONVERSION: dict[str, Fidelity] = {
    "factorized": Fidelity("the rank-r truncated SVD: error = the discarded singular values "
                           "(Eckart–Young)", lambda w: eckart_young(w) * (1 + 1e-4)),
    "lost": Fidelity("LOST (Li et al. 2025, \"Low-rank and Sparse Pre-training\"): the top-r "
                     "SVD part plus a sparse part on some channels of the residual: no worse "
                     "than the rank-r truncation", lambda w: eckart_young(w) * (1 + 1e-4)),
    "monarch": Fidelity("Monarch (Dao et al., ICML 2022): the closed-form Frobenius "
                        "projection onto Monarch matrices, a set containing 0: no farther "
                        "from W than 0 is", lambda w: 1.0),
    "sltrain": Fidelity("SLTrain (Han et al., NeurIPS 2024): pretrains from scratch; the dense "
                        "weight and bias are not used, any error is allowed", lambda w: float("inf"),
                        keeps_bias=False),
}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 12))


def converted(name: str, seed: int = 0) -> nn.Sequential:
    model = mlp()
    new = rl.convert_(model, name, target_modules=["0", "2"], seed=seed, **OPTIONS.get(name, {}))
    assert set(new) == {"0", "2"}
    return model


def trained(name: str) -> nn.Sequential:
    model = converted(name)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        model(torch.randn(6, 16, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.randn(7, 16, generator=torch.Generator().manual_seed(1))


def test_every_layer_method_is_enumerated():
    assert {"factorized", "relora", "monarch"} <= set(METHODS)
    assert set(NOT_EXACT_AT_CONVERSION) <= set(METHODS) and set(OPTIONS) <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_conversion_keeps_w_as_well_as_the_method_can(name):
    base, model = mlp(), converted(name)
    fidelity = NOT_EXACT_AT_CONVERSION.get(name, EXACT)
    for i in ("0", "2"):
        w = base.get_submodule(i).weight.detach()
        dense = model.get_submodule(i).to_dense().weight.detach()
        err = float((dense - w).norm() / w.norm())
        assert err <= fidelity.bound(w), f"{name} ({fidelity.reason}): relative error {err:.2e}"
        if fidelity.keeps_bias:
            torch.testing.assert_close(model.get_submodule(i).to_dense().bias,
                                       base.get_submodule(i).bias)


@pytest.mark.parametrize("name", METHODS)
def test_to_dense_gives_the_same_outputs(name):
    model = trained(name)
    with torch.no_grad():
        want = model(inputs())
        rl.to_dense_(model)
        assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
        torch.testing.assert_close(model(inputs()), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trips_through_safetensors(name):
    model = trained(name)
    blob = save({k: v.contiguous() for k, v in model.state_dict().items()})
    fresh = converted(name, seed=123)  # another seed: supports/bases must come from the state
    fresh.load_state_dict(load(blob))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs()), model(inputs()), rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_trainable_names_are_the_trainable_parameters_and_get_gradients(name):
    model = trained(name)  # moved off zero-initialised factors
    model.train()
    model(inputs()).square().mean().backward()
    for i in ("0", "2"):
        layer = model.get_submodule(i)
        params = dict(layer.named_parameters())
        names = set(layer.trainable_names())
        assert names == {n for n, p in params.items() if p.requires_grad}
        takes_flag = "trainable_only" in inspect.signature(layer.num_parameters).parameters
        count = layer.num_parameters(trainable_only=True) if takes_flag else layer.num_parameters()
        assert count == sum(params[n].numel() for n in names)
        silent = sorted(n for n in names if params[n].grad is None or not params[n].grad.any())
        assert not silent, f"{name}: no gradient reaches {silent} of layer {i}"
