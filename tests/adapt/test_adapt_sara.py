"""SaRA (Hu, Zhang, Yi et al., progressive sparse low-rank adaptation): mask = {|w| < threshold}
with w's signs, gradients and updates only at masked positions, nuclear-norm gradient reaches
the values, progressive re-selection exactly at progressive_iter, sparse save/load.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapt_checks import (
    assert_merge_roundtrip,
    assert_save_load_equal,
    inputs_for,
    layers_model,
    run,
)

from rankwise import adapt

SHAPES = {"a": (20, 16), "b": (12, 24)}
THR = 0.05  # weights ~ N(0, 1/9): about 12 % of them are "ineffective"


def adapted(**kw):
    model = layers_model(SHAPES)
    opts = dict(threshold=THR, lambda_rank=0.0, progressive_iter=None)
    adapt.adapt_(model, "sara", target_modules=list(SHAPES), **{**opts, **kw})
    return model


def test_mask_is_the_small_weights_with_their_signs():
    base, model = layers_model(SHAPES), adapted()
    for name, layer in model.items():
        w = base[name].weight.detach()
        m = layer.adapter
        expected = torch.nonzero((w.abs() < THR).reshape(-1)).reshape(-1)
        assert m.index.numel() == int((w.abs() < THR).sum()) > 0
        assert torch.equal(m.index, expected)
        assert torch.equal(m.values.detach(), w.reshape(-1)[expected])  # w, signs kept
        assert (m.values < 0).any()
    assert adapt.trainable_parameter_count(model) == sum(
        int((base[n].weight.abs() < THR).sum()) for n in SHAPES)


def test_gradients_and_updates_only_at_masked_positions():
    base, model = layers_model(SHAPES), adapted()
    xs = inputs_for(model, batch=6)
    model.train()
    loss = sum((o - 1).square().sum() for o in run(model, xs).values())
    loss.backward()
    for name, layer in model.items():  # dense reference: ∂L/∂W of the plain layer, at M
        w = base[name].weight.detach().clone().requires_grad_(True)
        (F.linear(xs[name], w, base[name].bias) - 1).square().sum().backward()
        torch.testing.assert_close(layer.adapter.values.grad,
                                   w.grad.reshape(-1)[layer.adapter.index], rtol=1e-10, atol=1e-12)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for name, layer in model.items():
        changed = (layer.effective_weight() != base[name].weight.detach()).reshape(-1)
        mask = torch.zeros_like(changed)
        mask[layer.adapter.index] = True
        assert changed.any() and not (changed & ~mask).any()


def test_training_with_rules_needs_attach_rules():
    model = adapted(progressive_iter=3)
    model.train()
    with pytest.raises(RuntimeError, match="attach_rules"):
        run(model, inputs_for(model))


def test_nuclear_norm_gradient_reaches_the_values_of_one_drawn_layer():
    lam = 0.3
    model = adapted(lambda_rank=lam, nuclear_min_dim=4, nuclear_min_masked=0)
    xs = inputs_for(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    adapt.attach_rules(model, opt)
    model.train()
    loss = sum(o.square().sum() for o in run(model, xs).values())
    loss.backward()
    loss_grads = {n: layer.adapter.values.grad.clone() for n, layer in model.items()}
    before = {n: layer.adapter.values.detach().clone() for n, layer in model.items()}
    opt.step()
    penalised = []
    for name, layer in model.items():
        m = layer.adapter
        extra = (before[name] - m.values.detach()) - loss_grads[name]  # λ ∂‖W⊙M‖_*/∂v or 0
        v = before[name].clone().requires_grad_(True)
        X = torch.zeros(m.out_features * m.in_features, dtype=v.dtype).index_put(
            (m.index,), v).view(m.out_features, -1)
        (ref,) = torch.autograd.grad(torch.linalg.matrix_norm(X, ord="nuc"), v)
        if extra.abs().max() > 1e-9:
            penalised.append(name)
            torch.testing.assert_close(extra, lam * ref, rtol=1e-7, atol=1e-9)
    assert len(penalised) == 1
    # the official guard: a layer with at most nuclear_min_masked masked entries is skipped
    guarded = adapted(lambda_rank=lam, nuclear_min_dim=4, nuclear_min_masked=10_000)
    opt = torch.optim.SGD([p for p in guarded.parameters() if p.requires_grad], lr=1.0)
    adapt.attach_rules(guarded, opt)
    guarded.train()
    sum(o.square().sum() for o in run(guarded, xs).values()).backward()
    grads = {n: layer.adapter.values.grad.clone() for n, layer in guarded.items()}
    before = {n: layer.adapter.values.detach().clone() for n, layer in guarded.items()}
    opt.step()
    for name, layer in guarded.items():
        torch.testing.assert_close(before[name] - layer.adapter.values.detach(), grads[name],
                                   rtol=1e-12, atol=1e-14)


def test_progressive_reselection_happens_exactly_at_progressive_iter():
    model = adapted(progressive_iter=3)
    xs = inputs_for(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    adapt.attach_rules(model, opt)
    first = {n: layer.adapter.index.clone() for n, layer in model.items()}
    for step in range(1, 5):
        model.train()
        sum((o - 2).square().sum() for o in run(model, xs).values()).backward()
        opt.step()
        opt.zero_grad()
        for name, layer in model.items():
            m = layer.adapter
            if step < 3:
                assert torch.equal(m.index, first[name]) and m.reselected_at is None
            if step == 3:  # re-selected on the weight after the 3rd update (which it keeps)
                w_eff = layer.effective_weight()
                expected = torch.nonzero((w_eff.abs() < THR).reshape(-1)).reshape(-1)
                assert m.reselected_at == 3 and torch.equal(m.index, expected)
                assert not torch.equal(m.index, first[name])
                assert torch.equal(m.values.detach(), w_eff.reshape(-1)[expected])
                assert m.frozen_index.numel() > 0  # updates of positions that left M are kept
                assert any(p is m.values for g in opt.param_groups for p in g["params"])
                assert len(opt.state[m.values]) == 0  # fresh optimizer state for the new mask
    assert all(layer.adapter.reselected_at == 3 for layer in model.values())


def test_reselection_keeps_the_function_and_save_load_is_sparse(tmp_path, perturb):
    model = adapted()
    perturb(model, scale=0.2)
    xs = inputs_for(model)
    model.eval()
    with torch.no_grad():
        before = run(model, xs)
        for layer in model.values():
            layer.adapter.reselect_()
        after = run(model, xs)
    for name in SHAPES:
        torch.testing.assert_close(after[name], before[name], rtol=1e-12, atol=1e-12)
    assert_merge_roundtrip(model, xs)
    adapt.save_adapter(model, tmp_path / "s")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "s" / "rankwise_adapter.safetensors")
    for name, layer in model.items():
        assert saved[f"{name}.values"].numel() == layer.adapter.index.numel()
        assert saved[f"{name}.frozen_delta"].numel() == layer.adapter.frozen_index.numel()
        assert sum(t.numel() for k, t in saved.items() if k.startswith(name)) < \
            layer.base_layer.weight.numel()
    assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path / "t")


def test_bad_options():
    with pytest.raises(ValueError, match="threshold must be"):
        adapted(threshold=0)
    with pytest.raises(ValueError, match="progressive_iter must be"):
        adapted(progressive_iter=0)


def test_finetune_resume_across_the_reselection_is_bit_exact(tmp_path, make_llama):
    """Stop after the mask changed shape (step 4 > progressive_iter 3), resume: identical run."""
    from rankwise.finetune import FinetuneConfig, LMData, finetune

    g = torch.Generator().manual_seed(0)
    data = LMData(torch.randint(0, 64, (24, 12), generator=g),
                  torch.randint(0, 64, (48,), generator=g))
    args = dict(threshold=0.05, progressive_iter=3, lambda_rank=0.1, nuclear_min_dim=4,
                nuclear_min_masked=0)

    def run(out, resume=False, **kw):
        cfg = dict(model="tiny", task="python-docs", method="sara", method_args=args, steps=6,
                   batch_size=4, seq_len=12, lr=1e-2, warmup_steps=2, eval_every=3,
                   progress=False, out=str(out), save_every=2)
        return finetune(FinetuneConfig(**{**cfg, **kw}), base=make_llama(), data=data,
                        resume=resume)

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=4)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.resumed_from == 4
    layers_a, layers_b = adapt.adapter_layers(straight.model), adapt.adapter_layers(resumed.model)
    assert layers_a and all(la.adapter.reselected_at == 3 for la in layers_a.values())
    for name, la in layers_a.items():  # the resumed run loaded the re-selected masks
        assert torch.equal(la.adapter.index, layers_b[name].adapter.index)
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.history["losses"] == straight.history["losses"]
