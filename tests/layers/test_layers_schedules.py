"""The LayerSchedule mechanism: plain loops, Trainer callbacks, exact resume, composition."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rankwise.layers._base import convert_
from rankwise.layers.schedules import Schedules, schedule_for


def make_model(method: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6))
    convert_(model, method, seed=0, **kw)
    return model


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=gen) for _ in range(n)]


def train(model, opt, sched, data, maestro=False):
    for x in data:
        loss = model(x).pow(2).mean()
        if maestro:
            with sched.truncated():
                loss = loss + model(x).pow(2).mean()
        loss.backward()
        sched.before_step()
        opt.step()
        sched()
        opt.zero_grad()


CASES = [
    ("relora", {"rank": 2, "dropout": 0.0}, {"relora": {"every": 2}}),
    ("sst", {"rank": 2}, {"sst": {"every": 2, "svd_every": 4}}),
    ("trp", {}, {"trp": {"every": 2, "energy": 0.9, "lam": 1e-3}}),
    ("maestro", {}, {"maestro": {"every": 3, "lam": 1e-3, "threshold": 0.3}}),
    ("sltrain", {"rank": 2, "density": 0.2}, {"refactor": {"every": 2}}),
]


@pytest.mark.parametrize(("method", "layer_kw", "options"), CASES, ids=[c[0] for c in CASES])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(method, layer_kw, options):
    data = batches(7)
    maestro = method == "maestro"

    def fresh():
        model = make_model(method, **layer_kw)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
        return model, opt, schedule_for(model, opt, **options)

    model, opt, sched = fresh()
    train(model, opt, sched, data, maestro)
    assert all(runs for runs in sched.runs.values())  # every schedule acted at least once

    model_a, opt_a, sched_a = fresh()
    train(model_a, opt_a, sched_a, data[:4], maestro)
    saved = (
        copy.deepcopy(model_a.state_dict()),
        copy.deepcopy(opt_a.state_dict()),
        copy.deepcopy(sched_a.state_dict()),
    )
    model_b, opt_b, sched_b = fresh()
    model_b.load_state_dict(saved[0])
    opt_b.load_state_dict(saved[1])
    sched_b.load_state_dict(saved[2])
    train(model_b, opt_b, sched_b, data[4:], maestro)
    assert sched_b.runs == sched.runs
    for (name, p), q in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_trainer_callback_runs_the_schedule(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(cfg)
    layers = convert_(model, "relora", rank=2, dropout=0.0)
    sched = schedule_for(model, relora={"every": 2})
    ids = torch.randint(0, 32, (8, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[sched.callback()]).train()
    assert sched.runs == {"ReLoRASchedule": [2, 4]}
    assert all(int(layer.restarts) == 2 for layer in layers.values())


def test_callback_hooks_order_with_a_fake_trainer_state():
    model = make_model("trp")
    sched = schedule_for(model, trp={"every": 1, "lam": 0.5})
    cb = sched.callback()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cb.on_train_begin(None, SimpleNamespace(), None, optimizer=opt)
    assert sched.optimizer is opt
    model(torch.randn(3, 8)).sum().backward()
    g = model[2].weight.grad.clone()
    cb.on_pre_optimizer_step(None, SimpleNamespace(), None)
    assert not torch.equal(model[2].weight.grad, g)  # the subgradient landed before the step
    cb.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert sched.runs == {"TRPSchedule": [1]}


def test_errors_name_the_problem_and_the_fix():
    model = make_model("sst", rank=2)
    with pytest.raises(ValueError, match="convert it first.*'relora'"):
        from rankwise.layers.relora import ReLoRASchedule

        ReLoRASchedule(model)
    with pytest.raises(ValueError, match="no 'trp' layers"):
        schedule_for(model, trp={"every": 1})
    with pytest.raises(ValueError, match="no schedule for \\['galore'\\]"):
        schedule_for(model, galore={})
    with pytest.raises(ValueError, match="optimizer does not hold"):
        schedule_for(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(ValueError, match="positive int"):
        schedule_for(model, sst={"every": 0})
    sst = schedule_for(model)
    with pytest.raises(ValueError, match="resume with the same method"):
        sst.load_state_dict({"ReLoRASchedule": {}})
    assert isinstance(
        schedule_for(make_model("monarch", nblocks=2)), Schedules
    )  # nothing to schedule
