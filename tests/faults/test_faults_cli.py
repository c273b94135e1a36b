"""Errors before work, on the command line: one line naming the problem and the fix, a
non-zero exit code, and nothing loaded, trained or overwritten first."""

from __future__ import annotations

import pytest

from rankwise.cli import main


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any command starts its work (loads a model, trains, shrinks)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the command started work before refusing its output")

    monkeypatch.setattr("rankwise.models.load_model", forbidden)
    monkeypatch.setattr("rankwise.finetune.finetune", forbidden)
    monkeypatch.setattr("rankwise.train.loop.pretrain", forbidden)
    monkeypatch.setattr("rankwise.pipeline.shrink", forbidden)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _bad_outs(tmp_path, model_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff")
    return {
        "a file": (afile, "is a file"),
        "under a file": (afile / "out", "which is a file"),
        "read-only": ("/proc/rankwise-faults/out", "not writable"),
        "the input": (model_dir, "is the input"),
        "inside the input": (model_dir / "out", "is the input"),
        "around the input": (tmp_path, "contains the input"),
        "someone else's files": (foreign, "did not write"),
    }


CASES = ["a file", "under a file", "read-only", "the input", "inside the input", "around the input",
         "someone else's files"]


@pytest.mark.parametrize("case", CASES)
def test_compress_refuses_bad_out_before_loading(tmp_path, model_dir, capsys, no_work, case):
    out, needle = _bad_outs(tmp_path, model_dir)[case]
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["compress", str(model_dir), "--out", str(out), "--no-progress"]) == 1
    _one_line_error(capsys, "rankwise compress: error:", needle)
    assert sorted(p.name for p in model_dir.iterdir()) == before


@pytest.mark.parametrize("command", ["finetune", "pretrain", "shrink"])
@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_training_commands_refuse_unwritable_out_before_any_step(tmp_path, model_dir, capsys, no_work,
                                                                 command, case):
    out, needle = _bad_outs(tmp_path, model_dir)[case]
    argv = {"finetune": ["finetune", "minilm-l6", "--method", "lora", "--task", "fortunes", "--out", str(out)],
            "pretrain": ["pretrain", "--method", "full", "--out", str(out)],
            "shrink": ["shrink", str(model_dir), "--ratio", "0.2", "--out", str(out)]}[command]
    assert main(argv) == 1
    _one_line_error(capsys, f"rankwise {command}: error:", needle)


def test_peft_out_without_eora_is_refused(tmp_path, model_dir, capsys, no_work):
    assert main(["compress", str(model_dir), "--out", str(tmp_path / "o"), "--peft-out", str(tmp_path / "p")]) == 1
    _one_line_error(capsys, "--peft-out", "--method eora")


def test_peft_base_never_overwrites_someone_elses_directory(tmp_path, model_dir, capsys, no_work):
    base = tmp_path / "o-base"
    base.mkdir()
    (base / "mine.txt").write_text("keep")
    assert main(["compress", str(model_dir), "--method", "eora", "--out", str(tmp_path / "o"),
                 "--peft-out", str(tmp_path / "p")]) == 1
    _one_line_error(capsys, "--peft-base", "did not write")
    assert (base / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize(("exc", "code", "needle"), [
    (OSError(28, "No space left on device"), 1, "free disk space"),
    (PermissionError(13, "Permission denied"), 1, "permissions"),
    (MemoryError(), 1, "out of memory"),
    (RuntimeError("projector has no subspace yet:\n call update first"), 1, "RANKWISE_DEBUG=1"),
    (ZeroDivisionError("division by zero"), 70, "this is a bug"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_every_failure_is_one_line_with_an_exit_code(tmp_path, model_dir, capsys, monkeypatch, exc, code, needle):
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr("rankwise.models.load_model", boom)
    monkeypatch.delenv("RANKWISE_DEBUG", raising=False)
    assert main(["compress", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress"]) == code
    _one_line_error(capsys, needle)
    assert not (tmp_path / "o").exists()


def test_rankwise_debug_shows_the_traceback_of_a_bug(tmp_path, model_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("rankwise.models.load_model", boom)
    monkeypatch.setenv("RANKWISE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["compress", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress"])
