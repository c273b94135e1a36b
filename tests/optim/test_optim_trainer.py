"""Use with Hugging Face: Trainer(optimizers=(opt, sched)) on a tiny Llama, and GradNormLoRP's
weight-normalised model."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import rankwise.optim as ro


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_hf_trainer_runs_two_steps_and_saves_a_weights_only_checkpoint(tmp_path):
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    model = _tiny_llama()
    opt = ro.create("galore_adamw", model, rank=4, update_proj_gap=1, lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=2)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (8, 16), generator=gen)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, before["model.layers.0.self_attn.q_proj.weight"])
    assert int(opt.state[q]["proj_count"]) == 2  # refreshed at both steps (gap 1)
    saved = torch.load(os.path.join(tmp_path, "checkpoint-2", "optimizer.pt"),
                       weights_only=True)
    assert any("proj_basis" in st for st in saved["state"].values())


def test_param_groups_follow_the_attn_mlp_rule_on_llama():
    model = _tiny_llama()
    groups = ro.param_groups(model, rank=4)
    projected = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in projected}
    assert names and all(("self_attn" in n or "mlp" in n) and n.endswith("weight") for n in names)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "model.embed_tokens.weight" not in names


def test_weight_norm_keeps_outputs_and_routes_magnitudes_to_adamw():
    """GradNormLoRP tests 1, 3, 4: init equals the dense model; V is projected and the
    magnitude g gets AdamW; merging reproduces outputs."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.Linear(8, 6))
    model.add_module("mlp", nn.Linear(6, 5))
    x = torch.randn(4, 8)
    dense = model(x).detach()
    names = ro.apply_weight_norm(model)
    assert names == ["attn", "mlp"]
    torch.testing.assert_close(model(x), dense, atol=1e-6, rtol=0)
    opt = ro.create("gradnormlorp", model, rank=2)
    projected, plain = opt.param_groups
    assert all(p.ndim == 2 and min(p.shape) > 1 for p in projected["params"])
    assert any(p.shape == (6, 1) for p in plain["params"])  # the magnitudes
    model(x).square().sum().backward()
    opt.step()
    out = model(x).detach()
    ro.merge_weight_norm(model)
    assert isinstance(model.attn.weight, nn.Parameter)
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=0)


def test_weight_norm_gradients_match_finite_differences():
    """GradNormLoRP test 2 (fp64): autograd through W = g V / ||V||_row."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    ro.apply_weight_norm(nn.ModuleDict({"attn": lin}))
    x = torch.randn(5, 4, dtype=torch.float64)
    params = [lin.parametrizations.weight.original0, lin.parametrizations.weight.original1]

    def f(g, v):
        w = g * v / v.norm(dim=1, keepdim=True)
        return (x @ w.T).sin().sum()

    leaves = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(f, leaves)  # the explicit formula vs finite differences
    ref = torch.autograd.grad(f(*leaves), leaves)
    ((x @ lin.weight.T) + 0 * lin.bias).sin().sum().backward()  # the module's weight
    for p, expected in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, expected)


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_mini", "frugal"])
def test_presets_decrease_the_loss_on_a_tiny_llama(name):
    model = _tiny_llama()
    opt = ro.create(name, model, rank=4, update_proj_gap=5, lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.3
