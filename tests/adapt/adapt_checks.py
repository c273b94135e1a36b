"""Helpers for the method-specific adapter tests: tiny models of bare layers and the round trips
a method-specific state needs checking after (growth, data-chosen ranks, regenerated bases).

The invariants every method shares are not rechecked per method: they are parametrised over the
registry in tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import torch
from torch import nn

from rankwise import adapt


def layers_model(shapes: dict[str, tuple[int, int]], *, dtype=torch.float64, seed: int = 0,
                 bias: bool = True) -> nn.ModuleDict:
    """Independent Linear layers named like `shapes` ({name: (out, in)}), seeded weights."""
    g = torch.Generator().manual_seed(seed)
    model = nn.ModuleDict({n: nn.Linear(i, o, bias=bias) for n, (o, i) in shapes.items()})
    with torch.no_grad():
        for layer in model.values():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / 3)
            if bias:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return model.to(dtype).eval()


def inputs_for(model: nn.ModuleDict, *, batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in model.items():
        base = layer.base_layer if isinstance(layer, adapt.AdapterLayer) else layer
        out[name] = torch.randn(batch, base.in_features, generator=g).to(base.weight.dtype)
    return out


def run(model: nn.ModuleDict, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: model[name](x) for name, x in xs.items()}


def assert_outputs_close(a: dict, b: dict, rtol: float, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol)


def assert_merge_roundtrip(model: nn.ModuleDict, xs, *, rtol: float = 1e-5) -> None:
    """(T-merge) merged forward = unmerged forward in eval mode; unmerge restores the base."""
    model.eval()
    stored = {n: layer.base_layer.weight.detach().clone() for n, layer in model.items()}
    with torch.no_grad():
        unmerged = run(model, xs)
        adapt.merge_(model)
        merged = run(model, xs)
        adapt.unmerge_(model)
        again = run(model, xs)
    assert_outputs_close(unmerged, merged, rtol=rtol, atol=rtol * 1e-2)
    assert_outputs_close(unmerged, again, rtol=rtol, atol=rtol * 1e-2)
    for n, layer in model.items():
        torch.testing.assert_close(layer.base_layer.weight.detach(), stored[n], rtol=1e-6,
                                   atol=1e-7)


def assert_dense_delta_matches(model: nn.ModuleDict, xs, *, rtol: float = 1e-6) -> None:
    """The forward equals the base layer applied with W_stored + delta_weight()."""
    with torch.no_grad():
        for name, layer in model.items():
            w = layer.base_layer.weight + layer.adapter.delta_weight().to(layer.base_layer.weight)
            ref = nn.functional.linear(xs[name], w, layer.base_layer.bias)
            torch.testing.assert_close(layer(xs[name]), ref, rtol=rtol, atol=rtol * 1e-2)


def assert_save_load_equal(model: nn.ModuleDict, fresh: nn.ModuleDict, xs, path,
                           *, rtol: float = 1e-6) -> nn.ModuleDict:
    """Save `model`'s adapters, load them onto `fresh` (the original base): equal outputs."""
    model.eval()
    with torch.no_grad():
        expected = run(model, xs)
    adapt.save_adapter(model, path)
    adapt.load_adapter(fresh, path)
    fresh.eval()
    with torch.no_grad():
        assert_outputs_close(expected, run(fresh, xs), rtol=rtol, atol=rtol * 1e-2)
    assert adapt.trainable_parameter_count(fresh) == adapt.trainable_parameter_count(model)
    return fresh


def backward_names(model: nn.Module, loss: torch.Tensor) -> set[str]:
    """Names of the parameters that receive a gradient from `loss`."""
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}
