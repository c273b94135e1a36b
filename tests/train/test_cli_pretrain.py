"""`rankwise pretrain` through rankwise.cli.main, with a tiny word tokenizer and a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

import rankwise.cli as cli

WORDS = ("the a of to and in is it def return class import for if self none true false value "
         "list dict str int print function module object").split()
TINY = ["--model-override", "hidden_size=32", "--model-override", "num_hidden_layers=2",
        "--model-override", "num_attention_heads=2", "--model-override", "num_key_value_heads=2",
        "--model-override", "intermediate_size=64"]


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    if "pretrain" not in cli._SUBCOMMANDS:
        monkeypatch.setattr(cli, "_SUBCOMMANDS", (*cli._SUBCOMMANDS, "pretrain"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return str(path)


def _args(method, out, tokenizer_dir, *extra):
    return ["pretrain", "--method", method, "--size", "llama-10m", "--steps", "6", "--seq-len",
            "16", "--batch-size", "2", "--out", str(out), "--tokenizer", tokenizer_dir,
            "--eval-tokens", "64", "--no-progress", *TINY, *extra]


def test_pretrain_stop_resume_export(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(_args("sltrain", out, tokenizer_dir, "--stop-after", "3")) == 0
    assert "stopped at step 3/6" in capsys.readouterr().out
    assert not (out / "final").exists()
    assert cli.main(_args("sltrain", out, tokenizer_dir, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "done, resumed from step 3" in printed and "validation perplexity" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["completed"] and result["steps"] == 6 and result["tokens"] == 6 * 2 * 16
    assert len(result["losses"]) == 6 and result["config"]["method"] == "sltrain"

    # the export is a plain dense Llama that scores the validation text as the trained model did
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankwise.data import load_corpus, token_stream
    from rankwise.eval import perplexity

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    tok = AutoTokenizer.from_pretrained(out / "final")
    val = token_stream(load_corpus("python-docs", "validation"), tok, max_tokens=64)
    ppl = perplexity(model, None, val, seq_len=16, batch_size=2, progress=False)
    assert ppl == pytest.approx(result["val_perplexity"], rel=1e-4)


def test_resume_with_another_method_is_refused(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(_args("sltrain", out, tokenizer_dir, "--stop-after", "2", "--no-export")) == 0
    capsys.readouterr()
    assert cli.main(_args("relora", out, tokenizer_dir, "--resume")) == 1
    err = capsys.readouterr().err
    assert "written by method 'sltrain' but this run asks for 'relora'" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--density", "1.2"], "strictly between 0 and 1"),
        (["--density", "0"], "strictly between 0 and 1"),
        (["--rank", "40"], "rank 40 exceeds"),
        (["--model-override", "hidden_size"], "expects KEY=VALUE"),
    ],
)
def test_bad_input_exits_with_a_clear_message(tmp_path, tokenizer_dir, capsys, extra, message):
    assert cli.main(_args("sltrain", tmp_path / "x", tokenizer_dir, *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("rankwise pretrain: error:") and message in err
    assert not (tmp_path / "x").exists()  # refused before any work


@pytest.mark.parametrize(("command", "config_path"), [
    ("pretrain", "rankwise.train.config:PretrainConfig"),
    ("finetune", "rankwise.finetune.config:FinetuneConfig"),
])
def test_cli_flags_are_generated_from_the_config_fields(command, config_path):
    """Every CLI field of the config is a flag whose default and help are the field's own, so a
    default cannot be written twice (e.g. --eval-tokens, --keep-checkpoints)."""
    import dataclasses
    import importlib

    from rankwise.cli import build_parser

    module, _, name = config_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    actions = {a.dest: a for a in sub._actions}
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    assert {"eval_tokens", "keep_checkpoints", "log_dir", "steps"} <= {f.name for f in fields}
    for f in fields:
        action = actions[f.name]
        assert "--" + f.name.replace("_", "-") in action.option_strings, f.name
        if f.default is not dataclasses.MISSING and not action.required:
            assert action.default == f.default, f.name
        assert f.metadata["help"].split("(")[0].strip()[:20] in action.help, f.name


def test_pretrain_ctrl_c_saves_once_and_exits_130(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import signal

    from rankwise.train import loop

    real = loop.batch_rows

    def rows(step, *args):
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return real(step, *args)

    monkeypatch.setattr(loop, "batch_rows", rows)
    out = tmp_path / "run"
    assert cli.main(_args("full", out, tokenizer_dir, "--save-every", "4")) == 130
    assert "interrupted: saved step 2" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert (out / "loss.png").is_file() and not (out / "final").exists()
