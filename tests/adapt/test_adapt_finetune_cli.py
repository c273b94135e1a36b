"""`rankwise finetune` from the command line: both tasks, resume, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.cli import main


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny Llama and a tiny BERT saved with the bundled MiniLM tokenizer."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from rankwise.models import load_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer("minilm-l6")
    tok.eos_token = tok.sep_token  # packed documents end with [SEP]
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32))
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"python-docs": root / "llama", "fortunes": root / "bert"}


def _argv(model_dir, task, out, *extra):
    small = ["--train-tokens", "2048", "--eval-tokens", "256"] if task == "python-docs" else \
        ["--eval-samples", "32"]
    return ["finetune", str(model_dir), "--task", task, "--rank", "2", "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--no-progress",
            "--out", str(out), *small, *extra]


@pytest.mark.parametrize("task", ["python-docs", "fortunes"])
def test_cli_trains_both_tasks_and_resumes_exactly(tiny_dirs, tmp_path, task, capsys):
    model_dir = tiny_dirs[task]
    assert main(_argv(model_dir, task, tmp_path / "a", "--arg", "dropout=0.1")) == 0
    text = capsys.readouterr().out
    metric = "perplexity" if task == "python-docs" else "accuracy"
    assert "done" in text and metric in text and "trainable parameters" in text
    assert main(_argv(model_dir, task, tmp_path / "b", "--arg", "dropout=0.1",
                      "--stop-after", "2")) == 0
    assert "stopped at step 2/4" in capsys.readouterr().out
    assert main(_argv(model_dir, task, tmp_path / "b", "--arg", "dropout=0.1", "--resume")) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    a = json.loads((tmp_path / "a" / "result.json").read_text())
    b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert a["history"]["losses"] == b["history"]["losses"] and a["metric"] == b["metric"]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "adapter" / "rankwise_adapter.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "rankwise_adapter.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(("extra", "message"), [
    (["--rank", "0"], "rank must be an integer >= 1"),
    (["--rank", "33"], "rank 33 exceeds min(m, n) = 32"),
    (["--target-modules", "no_such_layer"], "matched no module"),
    (["--target-modules", "embed_tokens", "--method", "vera"], "cannot adapt a embedding layer"),
    (["--target-modules", "input_layernorm"], "which is not one of Linear/Conv1D"),
    (["--method", "no-such-method"], "unknown method 'no-such-method'"),
    (["--arg", "colour=3"], "has no option(s) ['colour']"),
])
def test_cli_bad_input_gives_a_clear_error(tiny_dirs, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(_argv(tiny_dirs["python-docs"], "python-docs", out, *extra)) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not (out / "checkpoints").exists()  # nothing is written on failure


def test_cli_resume_with_another_model_is_refused(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_argv(tiny_dirs["python-docs"], "python-docs", out, "--stop-after", "1")) == 0
    capsys.readouterr()
    assert main(_argv(tiny_dirs["fortunes"], "python-docs", out, "--resume")) == 1
    assert "different settings (model:" in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_cli_smoke_on_minilm_fortunes(tmp_path, capsys):
    """The issue's command on the real MiniLM-L6, a few steps."""
    out = tmp_path / "m"
    assert main(["finetune", "minilm-l6", "--method", "lora", "--rank", "8", "--task", "fortunes",
                 "--steps", "3", "--batch-size", "8", "--eval-samples", "64", "--no-progress",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trainable parameters 76,808" in text  # 12 x 8 x (384 + 384) + head 384 x 8 + 8
    result = json.loads((out / "result.json").read_text())
    assert result["completed"] and 0.0 <= result["metric"] <= 1.0
    assert len(result["history"]["losses"]) == 3


def test_cli_ctrl_c_saves_once_and_exits_130(tiny_dirs, tmp_path, capsys, monkeypatch):
    """SIGINT in the middle of a step: that step finishes, one checkpoint, exit code 130."""
    import signal

    from rankwise.finetune import loop

    real = loop.task_batch

    def batch(data, step, *args):
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return real(data, step, *args)

    monkeypatch.setattr(loop, "task_batch", batch)
    out = tmp_path / "o"
    assert main(_argv(tiny_dirs["python-docs"], "python-docs", out)) == 130
    assert "interrupted: saved step 2" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert json.loads((out / "result.json").read_text())["interrupted"] is True


def test_cli_logs_tensorboard_and_draws_the_loss_curve(tiny_dirs, tmp_path):
    """--log-dir: the TensorBoard scalars are the losses, lrs and metrics of result.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = tmp_path / "o", tmp_path / "tb"
    assert main(_argv(tiny_dirs["python-docs"], "python-docs", out, "--log-dir", str(logs),
                      "--eval-every", "2")) == 0
    result = json.loads((out / "result.json").read_text())
    acc = EventAccumulator(str(logs))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx(result["history"]["losses"], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx(result["history"]["lrs"])
    evals = acc.Scalars("eval/perplexity")
    assert [e.step for e in evals] == [e["step"] for e in result["history"]["evals"]] == [2, 4]
    assert [e.value for e in evals] == pytest.approx(
        [e["perplexity"] for e in result["history"]["evals"]], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_s"))
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
