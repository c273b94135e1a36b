"""The optimizer contract: what every registered low-rank optimizer preset must satisfy.

Parametrised over every registered preset (`registered.optimizers()`), on a 2-block toy whose
``attn`` / ``mlp`` linears are projected (the default target rule) and whose norm and head go
to the plain AdamW group:

* state is tensors only: ``torch.save(opt.state_dict())`` loads back with
  ``torch.load(..., weights_only=True)``;
* resume is bit-exact: 4 steps, save, load into a fresh model + optimizer, 4 more steps equals
  8 uninterrupted steps (the refresh gap 3 puts the save mid-period);
* descent: the first small step lowers the loss (a fresh rule's update has a positive inner
  product with the gradient G: Adam's first step is sign(down(G)) up-projected, so
  <G, up(sign(down(G)))> = ||down(G)||_1 > 0; residual terms add c ⊙ (G − up(down(G))) with
  c > 0, or its sign, both non-negative against G);
* a parameter without a gradient is left untouched, and `zero_grad` + `step` changes nothing.
"""

from __future__ import annotations

import io

import pytest
import torch
from optim_toy import ProjectedToy, toy_batch
from registered import optimizers
from torch import nn

import rankwise.optim as ro

PRESETS = optimizers()

#: what a preset needs on the toy beyond rank 4 and a refresh gap of 3 (the only per-preset
#: options): 8-bit states need a smaller size threshold, Q-GaLore's lazy refresh is forced on
#: every gap, APOLLO-Mini has its rank (1) built in.
OPTIONS: dict[str, dict] = {
    "galore_adamw8bit": {"min_8bit_size": 64},
    "q_galore_adamw8bit": {"min_8bit_size": 64,
                           "proj_options": {"lazy_threshold": -2.0, "lazy_queue": 1}},
    "apollo_mini": {"rank": None},
}


Toy = ProjectedToy


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return toy_batch(100 + i)


def loss(model: nn.Module, i: int) -> torch.Tensor:
    x, y = batch(i)
    return nn.functional.cross_entropy(model(x), y)


def make(name: str, **extra) -> tuple[Toy, torch.optim.Optimizer]:
    model = Toy()
    if name == "gradnormlorp":  # GradNormLoRP projects the direction of a weight-normed model
        ro.apply_weight_norm(model)
    options = {"rank": 4, "update_proj_gap": 3, "lr": 1e-2} | OPTIONS.get(name, {}) | extra
    options = {k: v for k, v in options.items() if v is not None}
    return model, ro.create(name, model, **options)


def train(model: Toy, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        loss(model, i).backward()
        opt.step()


def test_every_preset_is_enumerated():
    assert {"galore_adamw", "fira", "apollo"} <= set(PRESETS)
    assert set(OPTIONS) <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_state_is_tensors_only_and_loads_weights_only(name):
    model, opt = make(name)
    train(model, opt, 2)
    state = opt.state_dict()["state"]
    assert state, f"{name} kept no state"
    for key, st in state.items():
        bad = {k: type(v).__name__ for k, v in st.items() if not isinstance(v, torch.Tensor)}
        assert not bad, f"{name}: state of param {key} holds non-tensors {bad}"
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", PRESETS)
def test_resume_is_bit_exact(name):
    model, opt = make(name)
    train(model, opt, 8)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = make(name)
    train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = make(name)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    train(model, opt, 4, start=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), f"{name}: {key} differs after resume"


@pytest.mark.parametrize("name", PRESETS)
def test_one_small_step_is_a_descent_step(name):
    model, opt = make(name, lr=1e-4, weight_decay=0.0)
    before = loss(model, 50)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss(model, 50)
    assert after < before, f"{name}: loss {float(before):.6f} -> {float(after):.6f}"


@pytest.mark.parametrize("name", PRESETS)
def test_parameters_without_gradient_are_untouched(name):
    model, opt = make(name, weight_decay=0.1)
    train(model, opt, 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()  # set_to_none: no parameter has a gradient
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen[n]), f"{name}: {n} moved without a gradient"
    opt.zero_grad()
    loss(model, 7).backward()
    model.head.weight.grad = None  # one parameter drops out of this step
    head = model.head.weight.detach().clone()
    opt.step()
    assert torch.equal(model.head.weight, head), f"{name}: a gradient-less parameter moved"
