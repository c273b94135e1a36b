"""LoRA-GGPO (Chang et al., arXiv 2502.14538): the perturbation scale formula and its empirical
variance, the perturbation is gone after the step, none in eval mode, the gradient norms feed
the next step.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from adapt_checks import (
    assert_save_load_equal,
    inputs_for,
    layers_model,
    run,
)
from torch import nn

from rankwise import adapt

SHAPES = {"a": (9, 7), "b": (5, 8)}


def adapted(shapes=SHAPES, **kw):
    model = layers_model(shapes)
    adapt.adapt_(model, "lora_ggpo", target_modules=list(shapes), **({"rank": 3} | kw))
    return model


def test_row_std_is_the_formula(perturb):
    model = adapted(rho=0.3, mix=0.25)
    perturb(model)
    m = model["a"].adapter
    m.grad_row_norms = torch.linspace(0.5, 2.0, 9, dtype=torch.float64)
    W = model["a"].base_layer.weight.detach() + m.scale * m.B.detach() @ m.A.detach()
    expected = 0.3 * (0.25 * W.norm(dim=1) + 0.75 * m.grad_row_norms) / math.sqrt(7)
    torch.testing.assert_close(m.row_std(model["a"].base_layer.weight.detach()), expected)


def test_empirical_variance_matches_the_formula(perturb):
    model = adapted({"w": (6, 4000)}, rho=0.5, mix=0.6)
    perturb(model)
    layer = model["w"]
    m = layer.adapter
    m.grad_row_norms = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    weight = layer.base_layer.weight.detach()
    eps = m.draw(weight)
    sigma = m.row_std(weight)
    torch.testing.assert_close(eps.std(dim=1), sigma, rtol=0.05, atol=0)
    assert eps.mean(dim=1).abs().max() < 4 * float(sigma.max()) / math.sqrt(4000)
    torch.testing.assert_close(m.draw(weight), eps)  # reproducible per step
    m.rule_steps = 1
    assert not torch.allclose(m.draw(weight), eps)


def test_step_is_the_optimizer_update_at_the_perturbed_point_and_then_removed(perturb):
    model = adapted(rho=0.5)
    perturb(model, scale=0.3)
    xs = inputs_for(model)
    layer, m = model["a"], model["a"].adapter
    model.train()
    with pytest.raises(RuntimeError, match="attach_rules"):
        run(model, xs)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapt.attach_rules(model, opt)
    W0 = layer.base_layer.weight.detach().clone()
    A0, B0 = m.A.detach().clone(), m.B.detach().clone()
    run(model, xs)  # two micro-batches share one ε
    eps = m.perturbation.detach().clone()
    sum(o.square().sum() for o in run(model, xs).values()).backward()
    # reference: the dense layer at W + sBA + ε
    A, B = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    Wp = (W0 + m.scale * B @ A + eps).detach().requires_grad_(True)
    nn.functional.linear(xs["a"], W0 + m.scale * B @ A + eps, layer.base_layer.bias
                         ).square().sum().backward()
    nn.functional.linear(xs["a"], Wp, layer.base_layer.bias).square().sum().backward()
    torch.testing.assert_close(m.A.grad, A.grad)
    torch.testing.assert_close(m.B.grad, B.grad)
    opt.step()
    torch.testing.assert_close(m.A.detach(), A0 - 0.1 * A.grad)
    torch.testing.assert_close(m.B.detach(), B0 - 0.1 * B.grad)
    assert torch.equal(layer.base_layer.weight.detach(), W0)  # never written
    assert m.perturbation is None and m.rule_steps == 1
    torch.testing.assert_close(m.grad_row_norms, Wp.grad.norm(dim=1))  # ‖G_i‖ for step 1


def test_no_perturbation_in_eval_or_without_grad(perturb):
    model = adapted(rho=1.0)
    perturb(model)
    xs = inputs_for(model)
    for layer in model.values():
        layer.adapter.rules_attached = True
    with torch.no_grad():
        model.eval()
        expected = {n: model[n].base_layer(x) + model[n].adapter.lora_branch(x, model[n].geometry)
                    for n, x in xs.items()}
        evaluated = run(model, xs)
        model.train()
        no_grad = run(model, xs)
    for name in xs:
        torch.testing.assert_close(evaluated[name], expected[name])
        torch.testing.assert_close(no_grad[name], expected[name])
    assert model["a"].adapter.perturbation is None
    assert not torch.allclose(run(model, xs)["a"], expected["a"])  # training: perturbed


def test_count_and_the_noise_state_survives_save_load(tmp_path, perturb):
    model = adapted()
    xs = inputs_for(model)
    assert adapt.trainable_parameter_count(model) == sum(3 * (o + i) for o, i in SHAPES.values())
    perturb(model)
    model["a"].adapter.grad_row_norms.fill_(0.5)
    loaded = assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path)
    assert loaded["a"].adapter.noise_seed == model["a"].adapter.noise_seed != 0
    assert (loaded["a"].adapter.grad_row_norms == 0.5).all()
    with pytest.raises(ValueError, match="mix must be"):
        adapted(mix=1.5)


def test_hf_trainer_with_the_rules_callback(tmp_path, make_llama):
    from transformers import Trainer, TrainingArguments

    model = make_llama()
    adapt.adapt_(model, "lora_ggpo", rank=2, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (6, 8),
                                                                        generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[adapt.rules_callback()]).train()
    layers = adapt.adapter_layers(model).values()
    assert all(layer.adapter.rule_steps == 3 for layer in layers)
    assert all(layer.adapter.grad_row_norms.sum() > 0 for layer in layers)
