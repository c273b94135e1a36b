"""IncreLoRA (Zhang et al., arXiv 2308.12043): rank growth by importance up to the target, the
optimizer gets the new tensors, growth without advance learning keeps the output, the score
formula, counts / merge / save after growth, exact resume.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import (
    assert_merge_roundtrip,
    assert_save_load_equal,
    inputs_for,
    layers_model,
    run,
)

from rankwise import adapt

SHAPES = {"a": (9, 7), "b": (6, 8), "c": (7, 7), "d": (8, 6)}


def adapted(**kw):
    model = layers_model(SHAPES)
    opts = {"rank": 1, "target_rank": 4, "add_rank": 1, "top_h": 2, "init_warmup": 0,
            "incre_interval": 1, "dropout": 0.0}
    adapt.adapt_(model, "increlora", target_modules=list(SHAPES), **(opts | kw))
    return model


def loss(model, xs):
    return sum(o.square().sum() for o in run(model, xs).values())


def test_growth_by_importance_up_to_the_target_and_the_optimizer_sees_it(perturb):
    model = adapted(add_rank=2, top_h=3, target_rank=4)  # target 16, start 4, steps of 2
    perturb(model, scale=0.2)
    xs = inputs_for(model)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adapt.attach_rules(model, opt)
    methods = [layer.adapter for layer in model.values()]
    held = {id(p) for p in opt.param_groups[0]["params"]}
    for t in range(6):
        before = [m.ranknum for m in methods]
        loss(model, xs).backward()
        opt.step()
        grown = [i for i, m in enumerate(methods) if m.ranknum > before[i]]
        total = sum(m.ranknum for m in methods)
        assert total <= 16
        if t >= 1 and sum(before) < 16:  # t > init_warmup = 0
            h = min(3, (16 - sum(before)) // 2)
            assert len(grown) == h and all(methods[i].ranknum == before[i] + 2 for i in grown)
            ranked = sorted(range(4), key=lambda i: -methods[i].ipt * methods[i].unc)
            assert sorted(grown) == sorted(ranked[:h])
            params = opt.param_groups[0]["params"]
            new = [p for p in params if id(p) not in held]
            assert len(opt.param_groups) == 1  # joined the layer's group: schedulers keep working
            assert len(new) == 3 * h  # per grown layer: activated E + the new reserve's A, B
            # in model order: an optimizer rebuilt from the loaded model matches its state_dict
            assert params == [p for p in model.parameters() if p.requires_grad]
            held = {id(p) for p in params}
            owned = {id(p) for p in model.parameters() if p.requires_grad}
            assert {id(p) for p in new} <= owned
            assert all(p not in opt.state for p in new)  # fresh, no stale state
            for i in grown:  # the activated E is trainable and in the new group
                assert any(p is methods[i].E[-1] for p in new)
        else:
            assert not grown
        opt.zero_grad()
    assert sum(m.ranknum for m in methods) == 16 and all(m.finished for m in methods)
    assert all((m.E_res == 0).all() for m in methods)
    every = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters() if p.requires_grad} <= every
    assert "E_res" not in dict(model.named_parameters())  # the reserve E is never trainable


def test_growth_never_overshoots_when_add_rank_does_not_divide(perturb):
    model = adapted(add_rank=3, top_h=4, target_rank=4)  # 16 − 4 = 12 → at most 4 growths of 3
    perturb(model, scale=0.2)
    xs = inputs_for(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adapt.attach_rules(model, opt)
    model2 = adapted(rank=2, add_rank=3, top_h=4, target_rank=4)  # 16 − 8 = 8: two growths fit
    perturb(model2, scale=0.2)
    opt2 = torch.optim.SGD([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    adapt.attach_rules(model2, opt2)
    model2.train()
    for _ in range(4):
        for mdl, o in ((model, opt), (model2, opt2)):
            loss(mdl, xs).backward()
            o.step()
            o.zero_grad()
    assert sum(layer.adapter.ranknum for layer in model.values()) == 16
    total2 = sum(layer.adapter.ranknum for layer in model2.values())
    assert total2 == 14 and all(layer.adapter.finished for layer in model2.values())


@pytest.mark.parametrize("keep_output", [True, False])
def test_growth_without_advance_learning_adds_nothing_to_the_output(perturb, keep_output):
    model = adapted(advance_learn=False, keep_output=keep_output, top_h=4)
    perturb(model, scale=0.2)
    xs = inputs_for(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    adapt.attach_rules(model, opt)
    model.train()
    for _ in range(2):  # step 0 scores, step 1 grows (lr 0: only the growth changes things)
        with torch.no_grad():
            model.eval()
            before = run(model, xs)
            deltas = {n: layer.adapter.delta_weight() for n, layer in model.items()}
            model.train()
        loss(model, xs).backward()
        opt.step()
        opt.zero_grad()
    assert all(layer.adapter.ranknum == 2 for layer in model.values())
    model.eval()
    with torch.no_grad():
        for name, out in run(model, xs).items():
            if keep_output:
                torch.testing.assert_close(out, before[name])
            else:  # official: ΔW divides by N, so the old part is rescaled by N_old/N_new
                torch.testing.assert_close(model[name].adapter.delta_weight(),
                                           deltas[name] * (1 + 1e-5) / (2 + 1e-5))


def test_score_is_the_hand_formula(perturb):
    model = adapted()
    perturb(model, scale=0.3)
    xs = inputs_for(model)
    layer = model["a"]
    layer.adapter.rules_attached = True
    layer.train()
    out = layer(xs["a"])
    out.square().sum().backward()
    delta = layer.adapter.delta_weight().detach()
    grad = (2 * out.detach()).T @ xs["a"]  # ∂L/∂ΔW for L = Σ y²
    expected = (delta * grad).abs().sum() / delta.numel() ** 0.5
    assert layer.adapter.score == pytest.approx(float(expected), rel=1e-9)


def test_counts_merge_and_save_after_growth(tmp_path, perturb):
    model = adapted(add_rank=2, top_h=2)
    xs = inputs_for(model)
    model.train()
    with pytest.raises(RuntimeError, match="attach_rules"):
        run(model, xs)
    model.eval()
    trainable = sum(1 * (o + i + 1) + 2 * (o + i) for o, i in SHAPES.values())
    assert adapt.trainable_parameter_count(model) == trainable
    stored = sum(p.numel() for layer in model.values() for p in layer.adapter.state_dict().values())
    assert stored == sum(1 * (o + i + 1) + 2 * (o + i + 1) for o, i in SHAPES.values())
    perturb(model, scale=0.2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    adapt.attach_rules(model, opt)
    model.train()
    for _ in range(3):
        loss(model, xs).backward()
        opt.step()
        opt.zero_grad()
    ranks = {n: layer.adapter.ranknum for n, layer in model.items()}
    assert sorted(ranks.values()) != [1, 1, 1, 1]
    assert adapt.trainable_parameter_count(model) == sum(
        ranks[n] * (o + i + 1) + 2 * (o + i) for n, (o, i) in SHAPES.items())
    assert_merge_roundtrip(model, xs)
    loaded = assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path)
    assert {n: layer.adapter.ranknum for n, layer in loaded.items()} == ranks


def test_bad_options():
    with pytest.raises(ValueError, match="add_rank has no default"):
        adapted(target_rank=5, add_rank=None)
    with pytest.raises(ValueError, match="target_rank must be"):
        adapted(rank=3, target_rank=2)


def test_hf_trainer_with_the_rules_callback(tmp_path, make_llama):
    from transformers import Trainer, TrainingArguments

    model = make_llama()
    adapt.adapt_(model, "increlora", rank=1, target_rank=2, init_warmup=0, incre_interval=1,
                 top_h=2, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 8),
                                                                        generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[adapt.rules_callback()])
    trainer.train()
    methods = [layer.adapter for layer in adapt.adapter_layers(model).values()]
    assert sum(m.ranknum for m in methods) == 2 * len(methods) and all(m.finished for m in methods)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    assert all(id(m.E[-1]) in held for m in methods)
    assert any(float(m.E[-1].detach().abs().sum()) > 1e-5 for m in methods)  # trained after growth


def test_exact_resume_after_growth(tmp_path, perturb):
    """Grown adapter + optimizer state + rules state: a resumed run equals the original."""
    import copy

    def train(model, opt, xs, steps):
        for _ in range(steps):
            loss(model, xs).backward()
            opt.step()
            opt.zero_grad()

    model = adapted(add_rank=1, top_h=1, target_rank=3)
    perturb(model, scale=0.2)
    xs = inputs_for(model)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rules = adapt.attach_rules(model, opt)
    train(model, opt, xs, 4)  # 3 growths of 1 rank so far
    adapt.save_adapter(model, tmp_path)
    opt_state, rules_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(rules.state_dict())
    fresh = adapt.load_adapter(layers_model(SHAPES), tmp_path).train()
    opt2 = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(opt_state)
    adapt.attach_rules(fresh, opt2).load_state_dict(rules_state)
    train(model, opt, xs, 8)  # growth continues after the resume, then finishes
    train(fresh, opt2, xs, 8)
    assert all(layer.adapter.finished for layer in fresh.values())
    for name in SHAPES:
        assert fresh[name].adapter.ranknum == model[name].adapter.ranknum
        assert (fresh[name].adapter.ipt, fresh[name].adapter.unc) == (model[name].adapter.ipt,
                                                                      model[name].adapter.unc)
        for key, value in model[name].adapter.state_dict().items():
            torch.testing.assert_close(fresh[name].adapter.state_dict()[key], value, rtol=0, atol=0)


def test_a_full_module_is_not_grown_past_min_out_in(perturb):
    shapes = {"s": (3, 8), "a": (9, 7)}
    model = layers_model(shapes)
    adapt.adapt_(model, "increlora", target_modules=list(shapes), rank=1, target_rank=3,
                 add_rank=1, top_h=1, init_warmup=0, incre_interval=1, dropout=0.0)
    perturb(model, scale=0.2)
    xs = inputs_for(model)
    xs["s"] = 100 * xs["s"]  # "s" scores far higher: it is chosen while it has room
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    adapt.attach_rules(model, opt)
    ranks = []
    for _ in range(6):
        loss(model, xs).backward()
        opt.step()
        opt.zero_grad()
        ranks.append((model["s"].adapter.ranknum, model["a"].adapter.ranknum))
    assert ranks[:5] == [(1, 1), (2, 1), (3, 1), (3, 2), (3, 3)]
    assert all(layer.adapter.finished for layer in model.values())
