"""rankwise.io's publisher and recovery in isolation: exceptions, failed verification, a kill
between the two renames, live writers beside dead ones, deletion, input == output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fault_harness import leftovers, run_killed

from rankwise import io


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(target, files, **kwargs):
    with io.publish_dir(target, **kwargs) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _read(target):
    return {p.name: p.read_text() for p in sorted(target.iterdir())}


def test_exception_inside_leaves_the_old_directory_and_no_temp(tmp_path):
    out = tmp_path / "d"
    _write(out, {"a": "old"})
    with pytest.raises(ZeroDivisionError), io.publish_dir(out) as tmp:
        (tmp / "a").write_text("new")
        1 / 0  # noqa: B018
    assert _read(out) == {"a": "old"} and leftovers(tmp_path) == []


def test_failed_verification_publishes_nothing(tmp_path):
    out = tmp_path / "d"
    _write(out, {"a": "old"})

    def verify(tmp):
        raise ValueError("incomplete")

    with pytest.raises(ValueError, match="incomplete"):
        _write(out, {"a": "new"}, verify=verify)
    assert _read(out) == {"a": "old"} and leftovers(tmp_path) == []


def test_kill_between_the_two_renames_is_undone_by_recover(tmp_path):
    """State of a writer killed after moving the old copy away and before publishing the new one."""
    out = tmp_path / "d"
    _write(out, {"a": "old"})
    pid = _dead_pid()
    os.rename(out, tmp_path / f".d.rankwise-old-{pid}-0001")
    (tmp_path / f".d.rankwise-tmp-{pid}-0002").mkdir()
    (tmp_path / f".d.rankwise-tmp-{pid}-0002" / "a").write_text("half")
    io.recover(out)
    assert _read(out) == {"a": "old"} and leftovers(tmp_path) == []


def test_a_live_writers_temp_is_left_alone(tmp_path):
    out = tmp_path / "d"
    live = tmp_path / f".d.rankwise-tmp-{os.getppid()}-0003"
    live.mkdir()
    _write(out, {"a": "new"})
    assert live.is_dir()  # another process may be writing it right now


def test_merge_keeps_other_files_and_replace_drops_them(tmp_path):
    out = tmp_path / "d"
    _write(out, {"a": "1", "notes": "mine"})
    _write(out, {"a": "2"})
    assert _read(out) == {"a": "2", "notes": "mine"}
    _write(out, {"a": "3"}, merge=False)
    assert _read(out) == {"a": "3"}


def test_remove_dir_killed_anywhere_never_leaves_half_a_directory_under_its_name(tmp_path):
    from fault_harness import count_ops

    victim = tmp_path / "step-000001"

    def make():
        victim.mkdir(exist_ok=True)
        for i in range(5):
            (victim / f"f{i}").write_text(str(i))

    make()
    n = count_ops(lambda: io.remove_dir(victim))
    for k in range(1, n + 1):
        make()
        run_killed(lambda: io.remove_dir(victim), k)
        assert not victim.exists() or len(list(victim.iterdir())) == 5
    io.recover_all(tmp_path)
    assert leftovers(tmp_path) == []


def test_output_equal_to_or_inside_its_input_is_refused_before_work(tmp_path):
    src = tmp_path / "src"
    _write(src, {"a": "input"})
    for out in (src, src / "sub", tmp_path):
        with pytest.raises(ValueError, match="input"):
            _write(out, {"a": "x"}, sources=[src])
    assert _read(src) == {"a": "input"}


def test_squeeze_into_its_own_input_is_refused(tmp_path):
    from fault_harness import tiny_llama

    from rankwise import adapt
    from rankwise.compress.squeeze import squeeze_peft_adapter

    model = tiny_llama()
    adapt.adapt_(model, "lora", rank=4, target_modules=["q_proj"])
    src = adapt.export_peft(model, tmp_path / "peft")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(ValueError, match="is the input"):
        squeeze_peft_adapter(src, src, 2)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_stale_file_temp_of_a_dead_writer_is_removed_by_the_next_write(tmp_path):
    pid = _dead_pid()
    stale = tmp_path / f".state.json.{pid}.abc123.tmp"
    stale.write_text("{half")
    live = tmp_path / f".state.json.{os.getppid()}.def456.tmp"
    live.write_text("{writing")
    io.write_json(tmp_path / "state.json", {"ok": True})
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("content", ["[1, 2]", '{"format": 1, "stages": []}', "{ half"])
def test_malformed_pipeline_state_is_a_clear_error(tmp_path, content):
    from rankwise.pipeline.config import ShrinkConfig
    from rankwise.pipeline.state import STATE_DIR, PipelineState

    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "state.json").write_text(content)
    with pytest.raises(ValueError, match=r"state\.json (is malformed|is not valid JSON)"):
        PipelineState(tmp_path, ShrinkConfig(model="m"), resume=True)


def test_an_export_killed_between_its_renames_keeps_the_pipeline_state(tmp_path):
    """shrink's export publishes into OUT, which holds .rankwise-pipeline: a kill between the two
    renames moves the state away with the old copy; the resumed run puts it back first."""
    from rankwise.pipeline.config import ShrinkConfig
    from rankwise.pipeline.state import STATE_DIR, PipelineState

    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    io.write_json(out / STATE_DIR / "state.json", {"format": 1, "stages": {}, "config": {}})
    os.rename(out, tmp_path / f".out.rankwise-old-{_dead_pid()}-0004")
    PipelineState(out, ShrinkConfig(model="m"), resume=True)
    assert (out / STATE_DIR / "state.json").is_file() and leftovers(tmp_path) == []
