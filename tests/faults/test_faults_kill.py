"""kill -9 (and Ctrl-C) at many points of every directory writer: the old result or the new
one is always intact and loadable, never neither, and the next run leaves no temporary files."""

from __future__ import annotations

import json

import pytest
import torch
from fault_harness import (
    calib_ids,
    compressed_llama,
    count_ops,
    kill_points,
    leftovers,
    run_killed,
    same_state,
    tiny_llama,
)


@pytest.fixture(scope="module")
def two_compressed():
    return compressed_llama(0), compressed_llama(1)


def _check_kills(tmp_path, write_old, write_new, load, old_value, new_value, *, points=8, interrupt=False):
    """Kill `write_new` over a directory holding `write_old`'s result at sampled points."""
    write_old()
    n = count_ops(write_new)
    assert n >= 4
    outcomes = set()
    for k in kill_points(n, points):
        write_old()  # start every trial from the old result
        outcomes.add(run_killed(write_new, k, interrupt=interrupt))
        got = load()
        assert same_state(got, old_value) or same_state(got, new_value), f"neither old nor new after a kill at op {k}/{n}"
    assert "killed" in outcomes or "interrupted" in outcomes
    write_new()  # the next run cleans what the killed ones left
    assert same_state(load(), new_value)
    assert leftovers(tmp_path) == []


def test_kill_save_compressed_keeps_old_or_new(tmp_path, two_compressed):
    from rankwise.compress import load_compressed, save_compressed

    a, b = two_compressed
    out = tmp_path / "model"
    _check_kills(tmp_path, lambda: save_compressed(a, out), lambda: save_compressed(b, out),
                 lambda: load_compressed(out).state_dict(), a.state_dict(), b.state_dict())


def test_interrupt_save_compressed_leaves_old_and_no_temp(tmp_path, two_compressed):
    """Ctrl-C (KeyboardInterrupt) anywhere in a save: the old model stays, nothing is left over
    even before the next run (the exception path cleans up)."""
    from rankwise.compress import load_compressed, save_compressed

    a, b = two_compressed
    out = tmp_path / "model"
    save_compressed(a, out)
    n = count_ops(lambda: save_compressed(b, out))
    for k in kill_points(n, 6, seed=1)[:-1]:
        assert run_killed(lambda: save_compressed(b, out), k, interrupt=True) in ("interrupted", f"done:{n}")
        got = load_compressed(out).state_dict()
        assert same_state(got, a.state_dict()) or same_state(got, b.state_dict())
        assert leftovers(tmp_path) == []


def _adapted(seed):
    from rankwise import adapt

    model = tiny_llama(0)
    adapt.adapt_(model, "lora", rank=2, target_modules=["q_proj", "v_proj"], seed=seed)
    for layer in adapt.adapter_layers(model).values():
        for p in layer.adapter.parameters():
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


def _adapter_state(model):
    from rankwise import adapt

    return {f"{n}.{k}": v for n, layer in adapt.adapter_layers(model).items()
            for k, v in layer.adapter.state_dict().items()}


def test_kill_save_adapter_keeps_old_or_new(tmp_path):
    from rankwise import adapt

    a, b = _adapted(1), _adapted(2)
    out = tmp_path / "adapter"

    def load():
        return _adapter_state(adapt.load_adapter(tiny_llama(0), out))

    _check_kills(tmp_path, lambda: adapt.save_adapter(a, out), lambda: adapt.save_adapter(b, out), load,
                 _adapter_state(a), _adapter_state(b))


def test_kill_export_peft_keeps_old_or_new(tmp_path):
    from rankwise import adapt

    a, b = _adapted(1), _adapted(2)
    out = tmp_path / "peft"

    def load():
        return _adapter_state(adapt.import_peft(tiny_llama(0), out))

    _check_kills(tmp_path, lambda: adapt.export_peft(a, out), lambda: adapt.export_peft(b, out), load,
                 _adapter_state(a), _adapter_state(b), points=6)


def _trained(seed):
    from rankwise.train.checkpoint import save_checkpoint

    model = tiny_llama(seed, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    class Config:
        method = "full"

        def to_dict(self):
            return {"method": "full"}

    return model, opt, Config(), save_checkpoint


def test_kill_checkpoint_save_and_prune_keeps_a_complete_latest(tmp_path):
    """Steps 1 and 2 exist (keep=2); saving step 3 also deletes step 1. Killed anywhere, the
    newest checkpoint `checkpoint_dirs` reports is complete and passes its checksum check."""
    import shutil

    from rankwise.train.checkpoint import checkpoint_dirs, read_checkpoint_meta

    model, opt, config, save = _trained(0)
    out = tmp_path / "run"

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        for step in (1, 2):
            save(out, step=step, model=model, optimizer=opt, schedules=None, config=config, keep=2)

    def step3():
        save(out, step=3, model=model, optimizer=opt, schedules=None, config=config, keep=2)

    setup()
    n = count_ops(step3)
    for k in kill_points(n, 10, seed=2):
        setup()
        run_killed(step3, k)
        found = checkpoint_dirs(out)
        assert found and found[-1][0] in (2, 3)
        for _, path in found:
            assert read_checkpoint_meta(path)["step"] == int(path.name.split("-")[1])
    step3()
    assert [s for s, _ in checkpoint_dirs(out)] == [2, 3]
    assert leftovers(tmp_path) == []


def test_kill_export_dense_keeps_old_or_new(tmp_path):
    from safetensors.torch import load_file

    from rankwise.train.checkpoint import export_dense

    a, b = tiny_llama(0, layers=1), tiny_llama(1, layers=1)
    out = tmp_path / "final"

    def load():
        return load_file(str(out / "model.safetensors"))

    sa = {k: v for k, v in a.state_dict().items() if k != "lm_head.weight"}
    sb = {k: v for k, v in b.state_dict().items() if k != "lm_head.weight"}
    _check_kills(tmp_path, lambda: export_dense(a, out), lambda: export_dense(b, out), load, sa, sb, points=6)


def test_kill_publish_dir_carries_user_files(tmp_path):
    """A merge publish over a directory holding someone else's file (the shrink state, notes):
    after any kill and the next run, that file is still there."""
    from rankwise.io import publish_dir, recover

    out = tmp_path / "d"

    def write(text):
        def go():
            with publish_dir(out) as tmp:
                (tmp / "a.txt").write_text(text)
                (tmp / "b.txt").write_text(text)
        return go

    def load():
        recover(out)
        assert (out / "notes.txt").read_text() == "mine"
        return {"a": torch.tensor([ord(c) for c in (out / "a.txt").read_text()])}

    def old():
        write("old")()
        (out / "notes.txt").write_text("mine")

    _check_kills(tmp_path, old, write("new"), load, {"a": torch.tensor([111, 108, 100])},
                 {"a": torch.tensor([110, 101, 119])}, points=12)


def test_kill_write_json_keeps_old_or_new_and_cleans_temp(tmp_path):
    """File-level writes (pipeline state.json): old or new content; the next write removes the
    temporary a killed writer left."""
    from rankwise.io import write_json

    path = tmp_path / "state.json"
    n = count_ops(lambda: write_json(path, {"v": 2}))
    for k in range(1, n + 1):
        write_json(path, {"v": 1})
        run_killed(lambda: write_json(path, {"v": 2}), k)
        assert json.loads(path.read_text())["v"] in (1, 2)
    write_json(path, {"v": 3})
    assert leftovers(tmp_path) == []


def test_kill_eora_peft_export_keeps_each_directory_old_or_new(tmp_path):
    """`rankwise compress --method eora --peft-out`: the adapter and its base model directory
    are each the old or the new one after a kill (they are published one after the other)."""
    from fault_harness import calib_ids

    from rankwise import adapt
    from rankwise.compress import compensate_, export_peft, load_compressed

    def make(seed):
        model = tiny_llama(seed)
        compensate_(model, "int4", 2, calibration=calib_ids(), progress=False, target_modules=["q_proj"])
        return model

    a, b = make(0), make(1)
    peft, base = tmp_path / "peft", tmp_path / "base"

    def load_pair():
        model = load_compressed(base)
        return model.state_dict(), _adapter_state(adapt.import_peft(model, peft))

    def state_of(model):
        export_peft(model, tmp_path / "ref" / "p", base_directory=tmp_path / "ref" / "b")
        out = load_compressed(tmp_path / "ref" / "b").state_dict(), _adapter_state(
            adapt.import_peft(load_compressed(tmp_path / "ref" / "b"), tmp_path / "ref" / "p"))
        return out

    (base_a, ad_a), (base_b, ad_b) = state_of(a), state_of(b)
    export_peft(a, peft, base_directory=base)
    n = count_ops(lambda: export_peft(b, peft, base_directory=base))
    for k in kill_points(n, 8, seed=3):
        export_peft(a, peft, base_directory=base)
        run_killed(lambda: export_peft(b, peft, base_directory=base), k)
        model = load_compressed(base)
        assert same_state(model.state_dict(), base_a) or same_state(model.state_dict(), base_b)
        got = _adapter_state(adapt.import_peft(model, peft))
        assert same_state(got, ad_a) or same_state(got, ad_b)
    export_peft(b, peft, base_directory=base)
    assert same_state(load_pair()[1], ad_b) and leftovers(tmp_path) == []


def test_kill_squeeze_keeps_old_or_new(tmp_path):
    from rankwise import adapt
    from rankwise.compress.squeeze import squeeze_peft_adapter

    src = adapt.export_peft(_adapted(1), tmp_path / "src")
    out = tmp_path / "squeezed"

    def load():
        return _adapter_state(adapt.import_peft(tiny_llama(0), out))

    squeeze_peft_adapter(src, out, 1)
    one = load()
    squeeze_peft_adapter(src, out, 2)
    two = load()
    _check_kills(tmp_path, lambda: squeeze_peft_adapter(src, out, 1), lambda: squeeze_peft_adapter(src, out, 2),
                 load, one, two, points=6)


def _streamed(source, out, ratio):
    from rankwise.compress import compress_streaming

    compress_streaming(source, out, "svd_llm", ratio, calibration=calib_ids(), device="cpu", progress=False)


def test_kill_streaming_compression_keeps_old_or_new(tmp_path):
    """The streaming writer publishes through rankwise.io.publish_dir held open for the whole
    stream: killed anywhere (while blocks stream, assembling, or publishing), the directory is
    the old model or the new one, and the next stream leaves no temporary behind."""
    from rankwise.compress import load_compressed

    source = tmp_path / "src"
    tiny_llama(0).save_pretrained(source)
    out = tmp_path / "model"
    _streamed(source, tmp_path / "ref-a", 0.2)
    _streamed(source, tmp_path / "ref-b", 0.4)
    a, b = (load_compressed(tmp_path / f"ref-{x}").state_dict() for x in "ab")
    _check_kills(tmp_path, lambda: _streamed(source, out, 0.2), lambda: _streamed(source, out, 0.4),
                 lambda: load_compressed(out).state_dict(), a, b, points=6)


def test_streaming_writer_killed_between_its_renames_is_recovered(tmp_path):
    """SIGKILL right after the old directory is renamed away and before the new one is renamed
    in: OUT is missing; the next load restores the old model (rankwise.io.recover), and the next
    stream publishes the new one with nothing left over."""
    import os
    import signal

    from rankwise.compress import load_compressed

    source = tmp_path / "src"
    tiny_llama(0).save_pretrained(source)
    out = tmp_path / "model"
    _streamed(source, tmp_path / "ref", 0.4)
    _streamed(source, out, 0.2)
    old = load_compressed(out).state_dict()
    new = load_compressed(tmp_path / "ref").state_dict()

    def killed_after_first_rename():
        rename = os.rename

        def hooked(src, dst, *args, **kwargs):
            rename(src, dst, *args, **kwargs)
            if str(src) == str(out):  # the old copy is away, the new one not yet in
                os.kill(os.getpid(), signal.SIGKILL)

        os.rename = hooked
        _streamed(source, out, 0.4)

    assert run_killed(killed_after_first_rename, 0) == "killed"
    assert not out.exists() and leftovers(tmp_path) != []
    assert same_state(load_compressed(out).state_dict(), old)  # recovered on load
    assert leftovers(tmp_path) == []
    _streamed(source, out, 0.4)
    assert same_state(load_compressed(out).state_dict(), new) and leftovers(tmp_path) == []
