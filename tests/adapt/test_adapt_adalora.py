"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512; ΔW = P Λ Q with importance-masked Λ):
cubic budget schedule, global masking of the lowest-importance triplets, importance EMA,
orthogonality penalty ‖PᵀP − I‖ + ‖QQᵀ − I‖, no silent degradation without the rules.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import inputs_for, layers_model, run

from rankwise import adapt
from rankwise.adapt.methods.adalora import budget_schedule

SHAPES = {"a": (9, 7), "b": (6, 8), "c": (7, 7)}


def adapted(**kw):
    model = layers_model(SHAPES)
    adapt.adapt_(model, "adalora", target_modules=list(SHAPES),
                 **({"rank": 4, "target_rank": 2} | kw))
    return model


def loss(model, xs):
    return sum(o.square().sum() for o in run(model, xs).values())


def test_budget_schedule_is_cubic_between_the_phases():
    kw = {"total": 10, "tinit": 2, "tfinal": 3, "init_budget": 24, "target_budget": 16}
    assert [budget_schedule(t, **kw) for t in (0, 1, 2)] == [24, 24, 24]
    assert budget_schedule(7, **kw) == 16 and budget_schedule(9, **kw) == 16  # t ≥ T − tfinal
    # t = 3: 16 + 8·(1 − 1/5)³ = 20.096; t = 5: 16 + 8·0.4³ = 16.512
    assert budget_schedule(3, **kw) == 20 and budget_schedule(5, **kw) == 16
    assert budget_schedule(4, **kw) == 17  # 16 + 8·0.6³ = 17.728


def test_masking_follows_the_budget_and_drops_the_lowest_scores(perturb):
    T, tinit, tfinal = 12, 2, 3
    model = adapted(tinit=tinit, tfinal=tfinal, orth_reg_weight=0.1)
    perturb(model, scale=0.5)
    xs = inputs_for(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    adapt.attach_rules(model, opt, total_steps=T)
    methods = [layer.adapter for layer in model.values()]
    for t in range(T):
        loss(model, xs).backward()
        opt.step()
        masked = sum(int((m.E.detach() == 0).sum()) for m in methods)
        b = budget_schedule(t, total=T, tinit=tinit, tfinal=tfinal, init_budget=12,
                            target_budget=6)
        if t <= tinit:
            assert masked == 0
        else:
            assert masked >= 12 - b
        if tinit < t < T - tfinal:  # every triplet scoring ≤ the (b0 − b)-th smallest is masked
            scores = torch.cat([m.triplet_scores() for m in methods])
            zero = torch.cat([m.E.detach() == 0 for m in methods])
            threshold = scores.sort().values[12 - b - 1]
            assert zero[scores <= threshold].all() and (scores <= threshold).sum() >= 12 - b
        opt.zero_grad()
    final = [m.E.detach().clone() for m in methods]
    assert sum(int((e == 0).sum()) for e in final) >= 6
    assert all(m.fixed_mask is not None for m in methods)


def test_final_phase_reapplies_the_fixed_pattern(perturb):
    model = adapted(tfinal=2)
    perturb(model, scale=0.5)
    xs = inputs_for(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    adapt.attach_rules(model, opt, total_steps=5)
    for _ in range(5):
        loss(model, xs).backward()
        opt.step()
        opt.zero_grad()
    m = model["a"].adapter
    keep = m.fixed_mask
    assert (m.E.detach()[~keep] == 0).all() and int((~torch.cat(
        [layer.adapter.fixed_mask for layer in model.values()])).sum()) >= 6


def test_importance_ema_matches_a_hand_computation():
    model = adapted(beta1=0.8, beta2=0.6)
    m = model["a"].adapter
    seq = []
    with torch.no_grad():
        for k in range(2):
            for p in (m.A, m.E, m.B):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + k),
                                     dtype=p.dtype)
            seq.append({n: (p * p.grad).abs() for n, p in (("A", m.A), ("E", m.E), ("B", m.B))})
            m.update_importance()
    for n in ("A", "E", "B"):
        s0, s1 = seq[0][n], seq[1][n]
        i0, u0 = 0.2 * s0, 0.4 * (s0 - 0.2 * s0).abs()
        i1 = 0.8 * i0 + 0.2 * s1
        u1 = 0.6 * u0 + 0.4 * (s1 - i1).abs()
        torch.testing.assert_close(m.ipt[n], i1)
        torch.testing.assert_close(m.unc[n], u1)
    score = {n: m.ipt[n] * m.unc[n] for n in m.ipt}
    torch.testing.assert_close(m.triplet_scores(), score["E"] + score["A"].mean(1)
                               + score["B"].mean(0))


def test_orthogonality_penalty_and_its_gradient():
    model = adapted(orth_reg_weight=0.5)
    methods = [layer.adapter for layer in model.values()]
    from rankwise.adapt.rules import group_regularizer

    eye = torch.eye(4, dtype=torch.float64)
    expected = 0.5 * torch.stack([torch.linalg.matrix_norm(t) for m in methods for t in
                                  (m.A @ m.A.T - eye, m.B.T @ m.B - eye)]).mean()
    torch.testing.assert_close(group_regularizer(methods).double(), expected.detach())
    with torch.no_grad():  # orthonormal rows of A and columns of B: zero penalty
        for m in methods:
            m.A.copy_(torch.linalg.qr(m.A.T)[0].T)
            m.B.copy_(torch.linalg.qr(m.B)[0])
    assert float(group_regularizer(methods).detach()) < 1e-6
    # the rule adds ∇R to the gradients: one SGD step on a zero loss moves A by −lr·∇R
    model = adapted(orth_reg_weight=0.5)
    methods = [layer.adapter for layer in model.values()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapt.attach_rules(model, opt, total_steps=4)
    A0 = methods[0].A.detach().clone()
    ref = [m.A.detach().clone().requires_grad_(True) for m in methods]
    refB = [m.B.detach().clone() for m in methods]
    (0.5 * torch.stack([torch.linalg.matrix_norm(t) for a, b in zip(ref, refB, strict=True)
                        for t in (a @ a.T - eye, b.T @ b - eye)]).mean()).backward()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    torch.testing.assert_close(methods[0].A.detach(), A0 - 0.1 * ref[0].grad)


def test_count_and_delta_are_the_svd_form_and_no_silent_lora(perturb):
    model = adapted()
    xs = inputs_for(model)
    assert adapt.trainable_parameter_count(model) == sum(4 * (o + i + 1) for o, i in SHAPES.values())
    perturb(model)
    m = model["a"].adapter
    torch.testing.assert_close(m.delta_weight(), (8.0 / (4 + 1e-5)) * m.B @ torch.diag(m.E) @ m.A)
    model.train()
    with pytest.raises(RuntimeError, match="attach_rules"):
        run(model, xs)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapt.attach_rules(model, opt)  # no total_steps anywhere
    loss(model, xs).backward()
    with pytest.raises(ValueError, match="total_steps"):
        opt.step()
    with pytest.raises(ValueError, match="target_rank must be"):
        adapted(target_rank=5)
    with pytest.raises(ValueError, match="no budgeting phase"):
        adapted(total_step=5, tinit=3, tfinal=2)


def test_hf_trainer_with_the_rules_callback(tmp_path, make_llama):
    from transformers import Trainer, TrainingArguments

    model = make_llama()
    adapt.adapt_(model, "adalora", rank=4, target_rank=2, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 8),
                                                                        generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[adapt.rules_callback()]).train()
    methods = [layer.adapter for layer in adapt.adapter_layers(model).values()]
    assert all(m.rule_steps == 4 for m in methods)
    # budget at t = 3 of T = 4: ⌊8 + 8·(1/4)³⌋ = 8 of 16 triplets kept
    assert sum(int((m.E.detach() == 0).sum()) for m in methods) >= 8


def test_exact_resume_with_the_rules_state(tmp_path, perturb):
    """Save adapter + optimizer + rules state mid-schedule; the resumed run equals the original."""
    import copy

    def train(model, opt, xs, steps):
        for _ in range(steps):
            loss(model, xs).backward()
            opt.step()
            opt.zero_grad()

    model = adapted(tinit=1, tfinal=3)  # EMAs updated before and after the resume (t < 6)
    perturb(model, scale=0.5)
    xs = inputs_for(model)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rules = adapt.attach_rules(model, opt, total_steps=9)
    train(model, opt, xs, 4)
    adapt.save_adapter(model, tmp_path)
    opt_state, rules_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(rules.state_dict())
    fresh = adapt.load_adapter(layers_model(SHAPES), tmp_path).train()
    opt2 = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(opt_state)
    rules2 = adapt.attach_rules(fresh, opt2, total_steps=9)
    with pytest.raises(ValueError, match="lacks layers"):
        rules2.load_state_dict({"step": 4, "layers": {}})
    rules2.load_state_dict(rules_state)
    assert rules2.step == 4 and fresh["a"].adapter.rule_steps == 4
    train(model, opt, xs, 5)
    train(fresh, opt2, xs, 5)
    for name in SHAPES:
        for key, value in model[name].adapter.state_dict().items():
            torch.testing.assert_close(fresh[name].adapter.state_dict()[key], value, rtol=0, atol=0)
        for key, value in model[name].adapter.unc.items():  # the EMAs carried over the resume
            torch.testing.assert_close(fresh[name].adapter.unc[key], value, rtol=0, atol=0)
