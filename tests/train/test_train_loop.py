"""The pretraining loop: every method trains, is really applied, and the run is well defined.

Tiny Llama (hidden 32, 2 layers, vocab 64) on a synthetic stream of 8 repeated "sentences":
a model that learns anything lowers its loss on it within 30 steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankwise.train.loop import (
    METHODS,
    TARGET_MODULES,
    PretrainConfig,
    PretrainData,
    batch_rows,
    build_model,
    lr_multiplier,
    parameter_counts,
    pretrain,
    setup_method,
)

V, L = 64, 16
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops on a shared 2-core machine run fastest single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_data(seed: int = 0) -> PretrainData:
    gen = torch.Generator().manual_seed(seed)
    sentences = torch.randint(4, V, (8, 12), generator=gen)
    stream = sentences[torch.randint(0, 8, (400,), generator=gen)].reshape(-1)
    train = stream[: stream.numel() // L * L].view(-1, L)
    val = sentences[torch.randint(0, 8, (20,), generator=gen)].reshape(-1)
    return PretrainData(train, val, V)


def tiny_config(method: str, **kw) -> PretrainConfig:
    base = {"model_overrides": TINY, "steps": 30, "seq_len": L, "batch_size": 4,
            "progress": False, "eval_every": 10}
    return PretrainConfig(method=method, **{**base, **kw})


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_on_the_same_token_budget(method):
    result = pretrain(tiny_config(method), data=tiny_data())
    assert result.completed and result.steps == 30
    assert result.tokens == 30 * 4 * L  # the same budget for every method
    assert len(result.losses) == 30 and all(math.isfinite(x) for x in result.losses)
    # a uniform guess over 64 tokens costs log 64 = 4.16 nats; learning the 8 sentences lowers it
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5
    assert [v["step"] for v in result.val] == [10, 20, 30]
    assert result.val_perplexity == result.val[-1]["perplexity"] < V
    assert result.memory["weights"] > 0 and result.memory["optimizer"] > 0
    assert result.tokens_per_s > 0


def _setup(method: str, **kw):
    config = tiny_config(method, **kw)
    model = build_model(config, V)
    opt, sched = setup_method(config, model)
    return config, model, opt, sched


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGET_MODULES}


def test_layer_methods_replace_exactly_the_attention_and_mlp_projections():
    for method, cls_name in [("relora", "ReLoRALinear"), ("sltrain", "SLTrainLinear"),
                             ("lost", "LOSTLinear"), ("sst", "SSTLinear"),
                             ("maestro", "MaestroLinear"), ("trp", "TRPLinear")]:
        _, model, opt, _ = _setup(method)
        targets = _targets(model)
        assert len(targets) == 2 * 7
        assert {type(m).__name__ for m in targets.values()} == {cls_name}
        assert type(model.lm_head).__name__ == "Linear"  # the head stays dense
        assert isinstance(opt, torch.optim.AdamW)
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_sltrain_and_lora_parameter_counts_match_their_closed_forms():
    r, density = 8, 0.1
    _, model, _, _ = _setup("sltrain", rank=r, density=density)
    counts = parameter_counts(model)
    shapes = [(32, 32)] * 4 + [(64, 32), (64, 32), (32, 64)]  # q k v o, gate up down (out, in)
    expected = 2 * sum(r * (m + n) + int(density * m * n) for m, n in shapes)
    assert counts["attn_mlp"] == counts["attn_mlp_trainable"] == expected  # no biases in Llama
    _, model, _, _ = _setup("lora", rank=r)
    counts = parameter_counts(model)
    dense = 2 * sum(m * n for m, n in shapes)
    assert counts["attn_mlp_trainable"] == 2 * sum(r * (m + n) for m, n in shapes)
    assert counts["attn_mlp"] == dense + counts["attn_mlp_trainable"]
    assert counts["trainable"] == counts["total"] - dense  # embeddings and norms train


def test_lora_keeps_its_random_base_frozen_while_embeddings_train():
    config = tiny_config("lora", steps=5)
    reference = build_model(config, V)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    model = build_model(config, V)
    opt, sched = setup_method(config, model)
    x = tiny_data().train[:4]
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, layer in _targets(model).items():
        assert torch.equal(layer.base_layer.weight, before[name + ".weight"])
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_galore_and_fira_keep_low_rank_optimizer_state_for_the_projections():
    x, r = tiny_data().train[:4], 4
    for method in ("full", "galore", "fira"):
        _, model, opt, _ = _setup(method, **({} if method == "full" else {"rank": r}))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        for layer in _targets(model).values():
            m, n = layer.weight.shape
            held = sum(t.numel() for t in opt.state[layer.weight].values() if t.ndim > 0)
            # AdamW: two (m, n) moments; GaLore family: projector a x r + moments b x r each
            want = 2 * m * n if method == "full" else r * (min(m, n) + 2 * max(m, n))
            assert held == want, (method, m, n)


def test_periodic_actions_run_on_schedule():
    result = pretrain(tiny_config("relora", steps=12, period=4), data=tiny_data())
    assert result.schedule_runs == {"ReLoRASchedule": [4, 8, 12]}
    result = pretrain(tiny_config("sst", steps=12, period=3), data=tiny_data())
    assert result.schedule_runs == {"SSTSchedule": [3, 6, 9, 12]}
    result = pretrain(tiny_config("trp", steps=3), data=tiny_data())
    assert result.schedule_runs == {"TRPSchedule": [1, 2, 3]}  # the official period: every step


def test_lr_schedule_warms_up_decays_and_relora_rewarms_from_zero():
    config = tiny_config("full", steps=100, warmup_steps=10, lr=1e-3)
    mults = [lr_multiplier(config, t) for t in range(100)]
    assert mults[0] == 0.0 and mults[5] == pytest.approx(0.5) and mults[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(mults[10:], mults[11:], strict=False))  # cosine decays
    assert mults[-1] == pytest.approx(0.1, abs=1e-3)  # to min_lr_ratio
    relora = tiny_config("relora", steps=100, warmup_steps=10, period=20)
    r = [lr_multiplier(relora, t) for t in range(100)]
    for k in (20, 40, 60, 80):  # the update right after each restart runs at lr 0
        assert r[k] == 0.0 and r[k + 2] == pytest.approx(mults[k + 2], rel=1e-9)
    config = tiny_config("full", steps=10, warmup_steps=2, lr=2e-3)
    result = pretrain(config, data=tiny_data())  # the loop applies exactly this schedule
    assert result.lrs == pytest.approx([2e-3 * lr_multiplier(config, t) for t in range(10)])


def test_batches_visit_every_row_once_per_epoch():
    n, batch = 12, 4
    rows = torch.cat([batch_rows(s, batch, n, seed=3) for s in range(2 * n // batch)])
    first, second = rows[:n], rows[n:]
    assert sorted(first.tolist()) == list(range(n)) == sorted(second.tolist())
    assert not torch.equal(first, second)  # a fresh permutation per epoch
    assert torch.equal(batch_rows(4, batch, n, seed=3), rows[16:20])  # a function of the step


def test_runs_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = pretrain(tiny_config("relora", steps=6, period=3), data=tiny_data())  # dropout 0.1
    assert torch.equal(torch.rand(3), expected)
    b = pretrain(tiny_config("relora", steps=6, period=3), data=tiny_data())
    assert a.losses == b.losses
    c = pretrain(tiny_config("relora", steps=6, period=3, seed=1), data=tiny_data())
    assert c.losses != a.losses


def test_maestro_trains_with_its_truncated_forward():
    result = pretrain(tiny_config("maestro", steps=4, period=2), data=tiny_data())
    assert result.schedule_runs == {"MaestroSchedule": [2, 4]}
    # full width d = min(out, in): 2 factors per layer instead of one dense matrix
    assert result.parameters["attn_mlp"] == 2 * (4 * 32 * 64 + 3 * 32 * 96)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "sltrain", "density": 0.0}, "strictly between 0 and 1"),
        ({"method": "sltrain", "density": 1.0}, "strictly between 0 and 1"),
        ({"method": "lost", "density": 1.5}, "strictly between 0 and 1"),
        ({"method": "sltrain", "density": float("nan")}, "strictly between 0 and 1"),
        ({"method": "sltrain", "rank": 33}, r"rank 33 exceeds .* = 32 .*choose rank <= 32"),
        ({"method": "galore", "rank": 0}, "positive int"),
        ({"method": "full", "rank": 4}, "has no rank"),
        ({"method": "relora", "density": 0.1}, "has no density"),
        ({"method": "adam"}, "unknown method 'adam'"),
        ({"method": "full", "stop_after": 30}, "stop_after 30 must be below steps"),
        ({"method": "full", "warmup_steps": 30}, "warmup_steps 30 must lie in"),
        ({"method": "relora", "period": 1}, "period must be >= 2"),
        ({"method": "full", "size": "llama-1b"}, "unknown model size"),
    ],
)
def test_bad_config_raises_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_data_with_ids_beyond_the_vocabulary_is_refused():
    data = tiny_data()
    with pytest.raises(ValueError, match="token ids must lie in"):
        PretrainData(data.train, data.val, V - 10)
