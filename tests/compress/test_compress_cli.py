"""`rankwise compress` round trip: compress a saved model directory, reload it, generate."""

from __future__ import annotations

import argparse

import pytest
import torch

from rankwise.cli import compress as cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama with the bundled MiniLM WordPiece tokenizer (any tokenizer with its vocab works)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.models import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_compress_save_load_generate(tmp_path, model_dir, capsys):
    from rankwise.compress import load_compressed
    from rankwise.models import load_tokenizer

    out = tmp_path / "out"
    args = _parser().parse_args(["compress", str(model_dir), "--method", "svd-llm", "--ratio", "0.2",
                                 "--out", str(out), "--calib-samples", "4", "--calib-seq-len", "64",
                                 "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "targeted layers" in text and "whole model" in text and f"rankwise eval {out}" in text
    model = load_compressed(out)
    tok = load_tokenizer(out)
    ids = tok("def main():", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 4


def test_cli_rejects_a_bad_ratio_before_loading(tmp_path):
    args = _parser().parse_args(["compress", "no-such-model", "--ratio", "1.5", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        args.func(args)
