"""`rankwise.finetune`: exact resume, checkpoint contents, the classification model, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise import adapt
from rankwise.finetune import (
    ClassificationData,
    FinetuneConfig,
    LMData,
    TopicClassifier,
    finetune,
)
from rankwise.finetune import state as ckpt


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg)  # hidden/attention dropout 0.1: resume must replay the RNG


def _lm_data() -> LMData:
    g = torch.Generator().manual_seed(0)
    return LMData(torch.randint(0, 64, (24, 12), generator=g), torch.randint(0, 64, (48,), generator=g))


def _cls_data() -> ClassificationData:
    g = torch.Generator().manual_seed(0)

    def split(n):
        ids = torch.randint(1, 50, (n, 10), generator=g)
        mask = torch.ones(n, 10, dtype=torch.long)
        mask[: n // 2, 7:] = 0  # some padding
        return ids, mask, torch.randint(0, 3, (n,), generator=g)

    a, b = split(30), split(12)
    return ClassificationData(*a, *b, num_classes=3)


def _config(task: str, out=None, **kw) -> FinetuneConfig:
    base = dict(model="tiny", task=task, rank=2, steps=6, batch_size=4, seq_len=12, lr=1e-2,
                warmup_steps=2, eval_every=3, progress=False, out=str(out) if out else None)
    return FinetuneConfig(**{**base, **kw})


def _run(task, out=None, resume=False, **kw):
    base, data = (_llama(), _lm_data()) if task == "python-docs" else (_bert(), _cls_data())
    return finetune(_config(task, out, **kw), base=base, data=data, resume=resume)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("task", "method", "kw"), [
    ("python-docs", "lora", {"method_args": {"dropout": 0.1}}),  # dropout draws from the RNG
    ("python-docs", "sora", {}),                 # a rule (proximal gate step) every step
    ("python-docs", "pissa", {}),                # base-mutating: the residual is rebuilt
    ("fortunes", "lora", {}),                    # head + BERT dropout
    # IncreLoRA grows its rank (new tensors join the optimizer) at steps 2 and 4
    ("python-docs", "increlora", {"rank": 1, "method_args": {
        "target_rank": 2, "init_warmup": 1, "incre_interval": 2, "top_h": 2}}),
    # SaRA re-selects its trainable positions at step 2 (fresh optimizer state)
    ("python-docs", "sara", {"method_args": {"threshold": 0.05, "progressive_iter": 2,
                                             "nuclear_min_dim": 8, "nuclear_min_masked": 4}}),
    # DyLoRA's rank drawn for the next step travels in the rules state
    ("python-docs", "dylora", {"rank": 8}),
    # AdaLoRA's importance EMAs decide later masks: they travel in the rules state too
    ("python-docs", "adalora", {"rank": 6, "method_args": {"target_rank": 3, "tinit": 1, "tfinal": 2, "delta_t": 1}}),
])
def test_resume_is_bit_exact(tmp_path, task, method, kw):
    """N steps straight == k steps, stop, resume to N: identical parameters and losses."""
    straight = _run(task, tmp_path / "a", method=method, save_every=3, **kw)
    _run(task, tmp_path / "b", method=method, stop_after=4, save_every=2, **kw)
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "step-000004"
    resumed = _run(task, tmp_path / "b", resume=True, method=method, save_every=2, **kw)
    assert resumed.resumed_from == 4 and resumed.completed
    a, b = _trainable(straight.model), _trainable(resumed.model)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.history["losses"] == straight.history["losses"]
    assert resumed.history["evals"] == straight.history["evals"]
    assert resumed.metric == straight.metric
    # and training did move the parameters (a resume that trained nothing would also "match")
    fresh = _run(task, None, method=method, steps=6, stop_after=1, **kw)
    assert any(not torch.equal(a[n], p) for n, p in _trainable(fresh.model).items())


def test_checkpoint_is_safetensors_and_json(tmp_path):
    out = tmp_path / "run"
    _run("fortunes", out, save_every=2, keep_checkpoints=2)
    dirs = [p.name for _, p in ckpt.checkpoint_dirs(out)]
    assert dirs == ["step-000004", "step-000006"]  # keep=2 removed step 2
    last = out / "checkpoints" / "step-000006"
    assert sorted(p.name for p in last.iterdir()) == [
        "adapter", "manifest.json", "state.json", "state.safetensors", "trainable.safetensors"]
    meta = json.loads((last / "state.json").read_text())
    assert meta["format"] == ckpt.FORMAT and meta["step"] == 6
    from safetensors.torch import load_file

    head = load_file(str(last / "trainable.safetensors"))
    assert sorted(head) == ["head.bias", "head.weight"]
    state = load_file(str(last / "state.safetensors"))
    assert any(k.startswith("optimizer/state/") for k in state) and "rng/torch" in state
    # the final adapter loads onto a fresh base encoder; the head is stored beside it
    enc = _bert()
    adapt.load_adapter(enc, out / "adapter")
    assert len(adapt.adapter_layers(enc)) == 4  # 2 layers x (query, value)
    assert (out / "head.safetensors").is_file()
    assert json.loads((out / "result.json").read_text())["completed"] is True


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    out = tmp_path / "run"
    _run("python-docs", out, stop_after=2, save_every=2)
    stale = out / "checkpoints" / "step-000004"  # killed mid-write: no state.json yet
    stale.mkdir()
    (stale / "state.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(out).name == "step-000002"
    resumed = _run("python-docs", out, resume=True, save_every=2)
    assert resumed.resumed_from == 2 and resumed.completed


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no checkpoint"):
        _run("python-docs", out, resume=True)
    _run("python-docs", out, stop_after=2)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        _run("python-docs", out)
    with pytest.raises(ValueError, match=r"different settings \(lr: checkpoint 0.01 vs now 0.02"):
        _run("python-docs", out, resume=True, lr=2e-2)
    with pytest.raises(ValueError, match="method: checkpoint 'lora' vs now 'dora'"):
        _run("python-docs", out, resume=True, method="dora")
    # run-control fields may change
    assert _run("python-docs", out, resume=True, eval_every=2, save_every=5).completed


def test_resume_onto_the_wrong_base_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path / "run"
    _run("python-docs", out, stop_after=2)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=64))
    with pytest.raises(ValueError, match="saved for a different base model"):
        finetune(_config("python-docs", out), base=other, data=_lm_data(), resume=True)


def test_classifier_trains_head_and_adapters_only():
    result = _run("fortunes", steps=2, stop_after=None)
    names = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= names
    assert all(n.startswith("head.") or ".adapter." in n for n in names)
    n_lora = 2 * 2 * 2 * (16 + 16)  # layers x (query, value) x r (in + out)
    assert result.trainable_parameters == n_lora + 16 * 3 + 3


def test_classifier_pooling_ignores_padding():
    """Mean pooling over the attention mask: extra pad positions change nothing."""
    model = TopicClassifier(_bert().eval(), 3).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0]])
    with torch.no_grad():
        a = model(ids, torch.ones(1, 4, dtype=torch.long))["logits"]
        b = model(padded, torch.tensor([[1, 1, 1, 1, 0, 0]]))["logits"]
        hidden = model.encoder(input_ids=ids).last_hidden_state.mean(1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, model.head(hidden), rtol=1e-5, atol=1e-6)


def test_rule_methods_run_their_rules():
    """SoRA's gate gets its proximal step every optimizer step (rules attached by the loop)."""
    result = _run("python-docs", method="sora", steps=3)
    methods = [layer.adapter for layer in adapt.adapter_layers(result.model).values()]
    assert methods and all(m.rule_steps == 3 for m in methods)


def test_config_validation():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        _config("python-docs", rank=0)
    with pytest.raises(ValueError, match="unknown task"):
        _config("cats")
    with pytest.raises(ValueError, match="not in method_args"):
        _config("python-docs", method_args={"rank": 4})
    with pytest.raises(ValueError, match="lr must be"):
        _config("python-docs", lr=0.0)


def test_head_has_its_own_learning_rate():
    from rankwise.finetune import build_model
    from rankwise.finetune.loop import param_groups

    config = _config("fortunes", lr=1e-3, head_lr=1e-2)
    model = build_model(config, _bert(), num_classes=3)
    adapt.adapt_(model, "lora", rank=2, target_modules=["query", "value"])
    model.head.requires_grad_(True)
    groups = param_groups(model, config)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(model.head.weight), id(model.head.bias)}
    assert len(groups[0]["params"]) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    # without head_lr the head follows lr; a causal LM has one group
    assert [g["lr"] for g in param_groups(model, _config("fortunes", lr=1e-3))] == [1e-3, 1e-3]


def test_ctrl_c_stops_between_steps_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT during step 3 finishes that step, checkpoints it, and --resume goes on exactly."""
    import signal

    from rankwise.finetune import loop

    straight = _run("python-docs", tmp_path / "a", method_args={"dropout": 0.1})
    real = loop.task_batch
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run as a background job

    def batch_then_interrupt(data, step, *args):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives in the middle of step index 2
        return real(data, step, *args)

    monkeypatch.setattr(loop, "task_batch", batch_then_interrupt)
    stopped = _run("python-docs", tmp_path / "b", method_args={"dropout": 0.1})
    monkeypatch.setattr(loop, "task_batch", real)
    assert stopped.steps == 3 and not stopped.completed
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "step-000003"
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    resumed = _run("python-docs", tmp_path / "b", resume=True, method_args={"dropout": 0.1})
    a, b = _trainable(straight.model), _trainable(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.history["losses"] == straight.history["losses"]


@pytest.mark.parametrize("optimizer", ["adamw", "galore_adamw"])
def test_full_finetuning_resumes_exactly_with_either_optimizer(tmp_path, optimizer):
    """Method full trains every weight (no adapter); a rankwise preset replaces AdamW; resume is
    bit-exact and the finished run writes the whole model."""
    kw = {"method": "full", "optimizer": optimizer, "rank": 4}
    straight = _run("python-docs", tmp_path / "a", **kw)
    _run("python-docs", tmp_path / "b", stop_after=3, **kw)
    resumed = _run("python-docs", tmp_path / "b", resume=True, **kw)
    a, b = _trainable(straight.model), _trainable(resumed.model)
    assert len(a) == len(list(straight.model.parameters()))  # every weight trained
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.history["losses"] == straight.history["losses"]
    assert not (tmp_path / "a" / "adapter").exists()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(torch.equal(saved[n], a[n]) for n in a)


def test_full_finetuning_options_are_checked():
    with pytest.raises(ValueError, match="fsdp shards full fine-tuning"):
        _config("python-docs", fsdp=True)
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        _config("python-docs", method="full", optimizer="adamx")
