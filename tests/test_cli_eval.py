"""`rankwise eval`: run through rankwise.cli.main on tiny local model directories."""

from __future__ import annotations

import json

import pytest

import rankwise.cli as cli

WORDS = "the a of to and in is it you that for on with as are be this not or".split()


@pytest.fixture(autouse=True)
def _eval_registered(monkeypatch):
    if "eval" not in cli._SUBCOMMANDS:
        monkeypatch.setattr(cli, "_SUBCOMMANDS", (*cli._SUBCOMMANDS, "eval"))


@pytest.fixture
def small_topics(monkeypatch):
    """The fortunes topics cut to 120 train / 40 test texts: the CLI path, at unit-test cost."""
    import rankwise.data as data
    from rankwise.data import TopicData

    full = data.load_topics

    def load_topics(name="fortunes", split="train"):
        d = full(name, split)
        n = 120 if split == "train" else 40
        return TopicData(d.texts[:n], d.labels[:n], d.label_names)

    monkeypatch.setattr(data, "load_topics", load_topics)


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>"
    )


def _save(model, path):
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _save(LlamaForCausalLM(config), tmp_path / "llama")


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
        **kw,
    )


def test_eval_causal_lm_prints_and_writes_the_split_perplexity(llama_dir, tmp_path, capsys):
    from rankwise.data import load_corpus
    from rankwise.eval import perplexity
    from rankwise.models import load_model, load_tokenizer

    out = tmp_path / "ppl.json"
    argv = ["eval", llama_dir, "--seq-len", "32", "--max-tokens", "300", "--json", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity on python-docs/test:" in printed
    assert "scored the first 300 tokens" in printed and "--max-tokens 0" in printed
    result = json.loads(out.read_text())
    texts = load_corpus("python-docs", "test")
    expected = perplexity(
        load_model(llama_dir),
        load_tokenizer(llama_dir),
        texts,
        seq_len=32,
        max_tokens=300,
        progress=False,
    )
    assert result["perplexity"] == pytest.approx(expected, rel=1e-9)
    assert result["kind"] == "causal-lm" and result["tokens"] == 300 - 10  # 10 windows of 32


def test_eval_encoder_reports_nearest_centroid_topic_accuracy(tmp_path, capsys, small_topics):
    from transformers import BertModel

    from rankwise.eval import topic_accuracy
    from rankwise.models import load_model, load_tokenizer

    path = _save(BertModel(_bert_config()), tmp_path / "bert")
    out = tmp_path / "acc.json"
    assert cli.main(["eval", path, "--json", str(out)]) == 0
    assert "fortunes/test topic accuracy:" in capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = topic_accuracy(load_model(path), load_tokenizer(path), "fortunes", batch_size=32)
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert result["chance"] == pytest.approx(1 / 8)


def test_eval_classifier_uses_its_head(tmp_path, capsys, small_topics):
    from transformers import BertForSequenceClassification

    path = _save(BertForSequenceClassification(_bert_config(num_labels=8)), tmp_path / "clf")
    assert cli.main(["eval", path]) == 0
    assert "classification head" in capsys.readouterr().out
    wrong = _save(BertForSequenceClassification(_bert_config(num_labels=3)), tmp_path / "clf3")
    assert cli.main(["eval", wrong]) == 1
    assert "3 labels but fortunes has 8" in capsys.readouterr().err


def test_eval_errors_name_the_fix(llama_dir, tmp_path, capsys):
    from transformers import BertModel

    assert cli.main(["eval", "smolm2-135m"]) == 1
    assert "did you mean 'smollm2-135m'" in capsys.readouterr().err
    assert cli.main(["eval", llama_dir, "--max-tokens", "-1"]) == 1
    assert "negative" in capsys.readouterr().err
    bert = _save(BertModel(_bert_config()), tmp_path / "bert")
    assert cli.main(["eval", bert, "--corpus", "python-docs"]) == 1
    assert "--corpus fortunes" in capsys.readouterr().err


def test_eval_help_names_the_default_token_budget(capsys):
    from rankwise.eval import DEFAULT_EVAL_TOKENS

    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--help"])
    assert info.value.code == 0
    assert f"default: {DEFAULT_EVAL_TOKENS}" in capsys.readouterr().out
