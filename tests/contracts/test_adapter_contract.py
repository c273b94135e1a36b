"""The adapter contract: what every registered adapter method must satisfy.

Parametrised over every registered name (`registered.adapters()`), on a toy with one layer of
each kind the method supports (Embedding, Linear, HF Conv1D, Conv2d), in fp64:

* no-op at init: the adapted model computes the base model's outputs (exceptions below);
* merge / unmerge: the merged forward equals the unmerged one, unmerge restores the stored
  base weight, `merge_and_unload` leaves plain modules computing the adapted outputs;
* disable = base: inside `disable_adapter` the outputs are the original model's, merged or
  not (a merged model is merged again on exit);
* unload: `unload_` gives back the original modules and weights (PiSSA-style residual bases
  included);
* save / load: a trained adapter saved and loaded onto a fresh base computes the same outputs,
  with the same trainable count, from safetensors + json only;
* trainable count: exactly the adapter's parameters train, each receives a gradient;
* refusal: a layer kind the method does not support is refused with TypeError naming it.

A new method gets all of this by registering; what is specific to it (its paper's equations)
goes in tests/adapt/test_adapt_<method>.py.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from contract_toy import KINDS, Toy, assert_same, batch, data, loss_fn, run
from registered import adapters

from rankwise import adapt

METHODS = adapters()
RANK = 2

#: options a method needs beyond rank=2 on the toy (nothing else is set per method)
OPTIONS: dict[str, dict] = {
    "adalora": {"target_rank": RANK},  # its default target_rank (8) exceeds rank 2
}


@dataclasses.dataclass(frozen=True)
class NotANoop:
    """A method whose default init moves the model on purpose, and the option that makes it
    an exact no-op (the contract checks both: moved by default, exact with `exact`)."""

    reason: str
    exact: dict


#: THE table of methods that are not a no-op at init by design (the only exceptions).
NOT_A_NOOP_AT_INIT: dict[str, NotANoop] = {
    "lora_xs": NotANoop(
        "LoRA-XS (Bałazy et al., arXiv 2405.17604): W + s·B R A with B, A from the SVD of W "
        "and R ~ N(0, r_std²), r_std = 1e-5: the start is ~σ₁·r_std away from W; "
        "init='zero' (R = 0) is the exact no-op",
        {"init": "zero"}),
    "lora_sb": NotANoop(
        "LoRA-SB (Ponkshe, Singhal et al., arXiv 2411.19557): the init is W + s·B R A, the "
        "best rank-r approximation of the first full fine-tuning update −lr·sign(Σ g); "
        "noop_init=True stores W − s·B R₀ A as the base instead",
        {"noop_init": True}),
    "salt": NotANoop(
        "SALT (singular value adaptation with a low-rank transformation, BioMedIA-MBZUAI): "
        "W' = U ReLU(S') Vᵀ with the tail block diag(σ) + X Y, and the public code draws "
        "X, Y ~ N(0, 0.01²), so W' starts ~1e-4 away from W; init='noop' sets Y = 0",
        {"init": "noop"}),
    "increlora": NotANoop(
        "IncreLoRA (Zhang et al., arXiv 2308.12043, advance learning): the reserve block's "
        "E_res is fixed at 1e-5 so its directions pre-train before they are activated; "
        "advance_learn=False keeps E_res = 0",
        {"advance_learn": False}),
}

#: relative tolerance of the identities in fp64 (SVD-based inits recompute factorisations)
RTOL, ATOL = 1e-9, 1e-11


def targets_of(name: str) -> list[str]:
    cls, _ = adapt.get_method(name)
    return [layer for layer, kind in KINDS.items() if kind in cls.layer_kinds]


def adapted(name: str, **options) -> Toy:
    model = Toy()
    adapt.adapt_(model, name, target_modules=targets_of(name), data=data(), loss_fn=loss_fn,
                 **({"rank": RANK} | OPTIONS.get(name, {}) | options))
    return model


def train_a_little(model: Toy, steps: int = 2) -> None:
    """Two Adam steps with the method's training rules attached, as a user's loop would."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    rules = adapt.attach_rules(model, opt, total_steps=10)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model, batch(10 + i)).backward()
        opt.step()
    rules.detach()
    model.eval()


def perturb(model: Toy, scale: float = 0.1) -> None:
    """Move every trainable adapter tensor off its init (zero-initialised factors included)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapt.adapter_layers(model).values():
            for p in layer.adapter.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def trained(name: str) -> Toy:
    model = adapted(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # methods whose rules warn about a 2-step horizon
        train_a_little(model)
    perturb(model)
    return model


def test_every_adapter_is_enumerated_and_every_exception_names_a_method():
    assert {"lora", "pissa", "dora"} <= set(METHODS)
    assert set(NOT_A_NOOP_AT_INIT) <= set(METHODS) and set(OPTIONS) <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_init_is_a_noop(name):
    ref = run(Toy(), batch())
    if name in NOT_A_NOOP_AT_INIT:
        moved = run(adapted(name), batch())
        assert any(not torch.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(moved, ref, strict=True)), (
            f"{name} is listed as not a no-op at init, but its default init is one: update "
            "NOT_A_NOOP_AT_INIT")
        model = adapted(name, **NOT_A_NOOP_AT_INIT[name].exact)
    else:
        model = adapted(name)
    assert_same(run(model, batch()), ref, rtol=RTOL, atol=ATOL, what=f"{name} at init")


@pytest.mark.parametrize("name", METHODS)
def test_merge_unmerge_and_merge_and_unload(name):
    model = trained(name)
    layers = adapt.adapter_layers(model)
    stored = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    want = run(model, batch())
    adapt.merge_(model)
    assert all(layer.merged for layer in layers.values())
    assert_same(run(model, batch()), want, rtol=1e-7, atol=1e-9, what=f"{name} merged")
    adapt.unmerge_(model)
    assert_same(run(model, batch()), want, rtol=1e-7, atol=1e-9, what=f"{name} unmerged")
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight.detach(), stored[n], rtol=1e-9,
                                   atol=1e-11)
    plain = adapt.merge_and_unload(model)
    assert not adapt.adapter_layers(plain)
    assert_same(run(plain, batch()), want, rtol=1e-7, atol=1e-9, what=f"{name} unloaded merge")


@pytest.mark.parametrize("name", METHODS)
def test_disable_gives_the_base_model_and_unload_restores_it(name):
    base = Toy()
    ref = run(base, batch())
    model = trained(name)
    want = run(model, batch())
    assert any(not torch.allclose(a, b) for a, b in zip(want, ref, strict=True)), f"{name}: training moved nothing"
    with adapt.disable_adapter(model):
        assert_same(run(model, batch()), ref, rtol=RTOL, atol=ATOL, what=f"{name} disabled")
    assert_same(run(model, batch()), want, rtol=0, atol=0, what=f"{name} after disable")
    adapt.merge_(model)  # disabling a merged model unmerges, then merges back on exit
    with adapt.disable_adapter(model):
        assert_same(run(model, batch()), ref, rtol=1e-7, atol=1e-9, what=f"{name} merged+disabled")
    assert all(layer.merged for layer in adapt.adapter_layers(model).values())
    assert_same(run(model, batch()), want, rtol=1e-7, atol=1e-9, what=f"{name} merged again")
    adapt.unload_(model)
    assert not adapt.adapter_layers(model)
    for layer in KINDS:
        torch.testing.assert_close(getattr(model, layer).weight, getattr(base, layer).weight,
                                   rtol=RTOL, atol=ATOL)
    assert_same(run(model, batch()), ref, rtol=RTOL, atol=ATOL, what=f"{name} unloaded")


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(name, tmp_path):
    model = trained(name)
    want = run(model, batch())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapt.save_adapter(model, tmp_path / "adapter")
    files = {p.suffix for p in (tmp_path / "adapter").iterdir()}
    assert files == {".safetensors", ".json"}, f"{name} saved {files}: safetensors + json only"
    fresh = adapt.load_adapter(Toy(), tmp_path / "adapter")
    assert_same(run(fresh, batch()), want, rtol=1e-9, atol=1e-11, what=f"{name} reloaded")
    assert adapt.trainable_parameter_count(fresh) == adapt.trainable_parameter_count(model)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", METHODS)
def test_only_adapter_parameters_train_and_each_gets_a_gradient(name):
    model = adapted(name)
    perturb(model)  # zero-initialised factors would block their partners' gradients
    layers = adapt.adapter_layers(model)
    assert set(layers) == set(targets_of(name))
    own = {f"{n}.adapter.{p}" for n, layer in layers.items() for p in layer.trainable_names()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == own and own, f"{name}: trainable {sorted(trainable - own)} outside adapters"
    count = sum(p.numel() for n, p in model.named_parameters() if n in own)
    assert adapt.trainable_parameter_count(model) == count
    loss_fn(model, batch()).backward()
    missing = sorted(n for n, p in model.named_parameters()
                     if p.requires_grad and p.numel()  # empty (e.g. MoS private_rank=0): vacuous
                     and (p.grad is None or not torch.any(p.grad != 0)))
    assert not missing, f"{name}: no gradient reaches {missing}"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", METHODS)
def test_unsupported_layer_kinds_are_refused_by_name(name):
    cls, _ = adapt.get_method(name)
    for layer, kind in KINDS.items():
        if kind in cls.layer_kinds:
            continue
        with pytest.raises(TypeError, match=rf"cannot adapt a {kind} layer"):
            adapt.adapt_(Toy(), name, target_modules=[layer], data=data(), loss_fn=loss_fn,
                         **({"rank": RANK} | OPTIONS.get(name, {})))


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trips_through_its_dict(name):
    config = adapt.build_config(name, **({"rank": RANK} | OPTIONS.get(name, {})))
    assert type(config).from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="no option"):
        adapt.build_config(name, not_an_option=1)
