"""Checkpoints: pickle-free round trips, bit-exact resume for every method, clear refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rankwise.io import load_tensors
from rankwise.train.checkpoint import (
    checkpoint_dirs,
    flatten_state,
    latest_checkpoint,
    read_checkpoint_meta,
    unflatten_state,
)
from rankwise.train.loop import METHODS, PretrainConfig, PretrainData, pretrain

V, L = 64, 16
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 64}
PERIODIC = {"relora": 4, "sst": 3, "maestro": 4, "trp": 2, "galore": 4, "fira": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> PretrainData:
    gen = torch.Generator().manual_seed(0)
    sentences = torch.randint(4, V, (8, 12), generator=gen)
    stream = sentences[torch.randint(0, 8, (300,), generator=gen)].reshape(-1)
    train = stream[: stream.numel() // L * L].view(-1, L)
    return PretrainData(train, sentences.reshape(-1), V)


def config(method: str, out, **kw) -> PretrainConfig:
    base = {"model_overrides": TINY, "steps": 11, "seq_len": L, "batch_size": 4,
            "progress": False, "eval_every": 4, "export": False, "out": str(out),
            "period": PERIODIC.get(method)}
    return PretrainConfig(method=method, **{**base, **kw})


# ----------------------------------------------------------------------------- structure
def test_flatten_round_trips_types_and_values():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
                  7: {"codes": torch.tensor([1, -2], dtype=torch.int8), "n": 4}},
        "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "proj": None, "opts": {"k": [1, 2]},
                          "flag": True, "name": "lowrank", "params": [0, 7]}],
        "rng": torch.get_rng_state(),
        "queue": [(1, 2), (0, 5)],
        "nan": math.inf,
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    tree, tensors = flatten_state(state)
    json.dumps(tree)  # the structure is plain JSON
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert set(back["state"]) == {0, 7}  # int keys survive
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples survive
    assert back["queue"] == [(1, 2), (0, 5)] and back["nan"] == math.inf
    for got, want in [(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"]),
                      (back["state"][7]["codes"], state["state"][7]["codes"]),
                      (back["rng"], state["rng"]), (back["empty"], state["empty"])]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert back["state"][0]["step"].shape == () and back["state"][7]["n"] == 4


def test_flatten_refuses_what_json_and_safetensors_cannot_hold():
    with pytest.raises(TypeError, match="cannot store set at a/b in a checkpoint"):
        flatten_state({"a": {"b": {1, 2}}})


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("method", METHODS)
def test_n_steps_resume_m_steps_equals_uninterrupted(method, data, tmp_path):
    straight = pretrain(config(method, tmp_path / "a"), data=data)
    first = pretrain(config(method, tmp_path / "b", stop_after=5), data=data)
    assert not first.completed and first.steps == 5
    resumed = pretrain(config(method, tmp_path / "b"), data=data, resume=True)
    assert resumed.resumed_from == 5 and resumed.completed
    assert resumed.losses == straight.losses  # bit-equal floats, all 11 steps
    assert resumed.val == straight.val and resumed.schedule_runs == straight.schedule_runs
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    for name in ("model.safetensors", "state.safetensors"):  # weights, optimizer, schedules, RNG
        ta, tb = load_tensors(a / name), load_tensors(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key
    # no pickles anywhere: safetensors and JSON only (plus the loss-curve picture)
    assert {p.suffix for p in (tmp_path / "b").rglob("*") if p.is_file()} == {
        ".json", ".safetensors", ".png"}


def test_checkpoint_holds_optimizer_state_and_rng(data, tmp_path):
    pretrain(config("galore", tmp_path, stop_after=3, save_every=3), data=data)
    path = latest_checkpoint(tmp_path)
    meta = read_checkpoint_meta(path)
    assert meta["method"] == "galore" and meta["step"] == 3
    tensors = load_tensors(path / "state.safetensors")
    assert tensors["rng/torch"].dtype == torch.uint8
    assert any(k.startswith("optimizer/state/") and k.endswith("proj_basis") for k in tensors)
    assert meta["state"]["extra"]["data"] == {"rows": data.train.shape[0], "samples": 12}


def test_checkpoint_files_get_umask_permissions_not_tempfiles_private_ones(data, tmp_path):
    """mkdtemp (0700), mkstemp and safetensors' writer (0600) make private entries; a saved
    checkpoint must look like any folder the user made (0755 / 0644 under umask 022)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        pretrain(config("galore", tmp_path, stop_after=2, save_every=2), data=data)
    finally:
        os.umask(old)
    path = latest_checkpoint(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    files = list(path.iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ----------------------------------------------------------------------------- refusals
def test_resume_refuses_another_method(data, tmp_path):
    pretrain(config("sltrain", tmp_path, stop_after=2), data=data)
    with pytest.raises(ValueError, match=r"written by method 'sltrain' but this run asks for "
                                         r"'relora': resume with --method sltrain"):
        pretrain(config("relora", tmp_path), data=data, resume=True)


def test_resume_refuses_other_settings_but_accepts_run_control_changes(data, tmp_path):
    pretrain(config("sltrain", tmp_path, stop_after=2, rank=4), data=data)
    with pytest.raises(ValueError, match=r"different configuration \(rank: checkpoint 4 vs now 8"):
        pretrain(config("sltrain", tmp_path, rank=8), data=data, resume=True)
    with pytest.raises(ValueError, match="lr: checkpoint"):
        pretrain(config("sltrain", tmp_path, rank=4, lr=1e-2), data=data, resume=True)
    done = pretrain(config("sltrain", tmp_path, rank=4, eval_every=5, save_every=3),
                    data=data, resume=True)
    assert done.completed and done.resumed_from == 2


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(data, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint in .* to resume from"):
        pretrain(config("full", tmp_path), data=data, resume=True)
    pretrain(config("full", tmp_path, stop_after=2), data=data)
    with pytest.raises(ValueError, match="already holds a checkpoint .*step-000002"):
        pretrain(config("full", tmp_path), data=data)


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(data, tmp_path):
    pretrain(config("full", tmp_path, save_every=2, keep_checkpoints=2), data=data)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [10, 11]
    half = tmp_path / "checkpoints" / "step-000099"  # a crash before state.json was written
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-000011"


def test_corrupt_checkpoint_gives_a_clear_error(data, tmp_path):
    pretrain(config("full", tmp_path, stop_after=2), data=data)
    (latest_checkpoint(tmp_path) / "state.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"state.json does not match the checksum"):
        pretrain(config("full", tmp_path), data=data, resume=True)


def test_resume_refuses_other_training_data(data, tmp_path):
    pretrain(config("full", tmp_path, stop_after=2), data=data)
    fewer = PretrainData(data.train[:-3], data.val, V)
    with pytest.raises(ValueError, match="was trained on .* rows of tokens, this run has"):
        pretrain(config("full", tmp_path), data=fewer, resume=True)


@pytest.mark.parametrize("method", METHODS)
def test_dense_export_computes_what_the_trained_model_computes(method, data, tmp_path):
    from transformers import LlamaForCausalLM

    from rankwise.train.checkpoint import export_dense
    from rankwise.train.loop import build_model, setup_method

    cfg = config(method, tmp_path / "run")
    model = build_model(cfg, V)
    opt, sched = setup_method(cfg, model)
    x = data.train[:4]
    for step in range(3):
        model(input_ids=x, labels=x).loss.backward()
        sched.before_step()
        opt.step()
        opt.zero_grad()
        sched(step + 1)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
    export_dense(model, tmp_path / "final")
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert all(type(m) is torch.nn.Linear for n, m in dense.named_modules() if n.endswith("proj"))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=x).logits, before, rtol=1e-4, atol=1e-4)
