"""lm-evaluation-harness on rankwise models, offline: its scores equal ours on the same tokens."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from harness_helpers import bpe_tokenizer, tiny_llama

pytest.importorskip("lm_eval", reason="lm-eval is in the `harness` extra (make test installs it)")

from rankwise.eval import perplexity, strided_nll  # noqa: E402
from rankwise.harness import evaluate, local_tasks  # noqa: E402

TEXTS = [
    "The for statement iterates over the items of any sequence, in order.\n",
    "A function definition binds the function name to a function object.\nReturn values "
    "are passed back to the caller.\n",
    "Exceptions are raised with raise and handled with try and except clauses.\n",
]
TASK_YAML = """\
task: my_notes
custom_dataset: !function rankwise.harness.sources.documents
dataset_kwargs:
  source: {folder}
  splits: [test]
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function rankwise.harness.metrics.rolling_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def lm():
    tok = bpe_tokenizer()
    return tiny_llama(len(tok)), tok


@pytest.fixture(scope="module")
def user_task(tmp_path_factory):
    """A user's own task, defined the documented way: a YAML over a folder of .txt files."""
    root = tmp_path_factory.mktemp("harness")
    (root / "notes").mkdir()
    for i, text in enumerate(TEXTS):
        (root / "notes" / f"{i}.txt").write_text(text)
    (root / "tasks").mkdir()
    (root / "tasks" / "my_notes.yaml").write_text(TASK_YAML.format(folder=root / "notes"))
    return root / "tasks"


def test_rolling_loglikelihoods_equal_our_nll_and_perplexities_agree(lm, user_task):
    model, tok = lm
    result = evaluate(model, "my_notes", tokenizer=tok, include=[user_task], max_length=64)["my_notes"]
    assert result["documents"] == len(TEXTS)
    total, tokens = 0.0, 0
    for text, harness_ll in zip(TEXTS, result["doc_loglikelihoods"], strict=True):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) < 64  # one window: the harness scores every token after an EOS prefix
        nll, n = strided_nll(model, torch.tensor([tok.eos_token_id, *ids]), seq_len=len(ids) + 1,
                             progress=False)
        assert n == len(ids)
        assert harness_ll == pytest.approx(-nll, rel=1e-5)
        total, tokens = total + nll, tokens + n
    assert result["tokens"] == tokens
    assert result["token_perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-6)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert result["bits_per_byte"] == pytest.approx(total / n_bytes / math.log(2), rel=1e-6)
    # rankwise.eval.perplexity scores the same stream with its own boundary convention (each
    # text followed by EOS, no score for a window's first token): close, not identical
    ours = perplexity(model, tok, TEXTS, seq_len=64, progress=False)
    print(f"harness token perplexity {result['token_perplexity']:.3f}, ours {ours:.3f}",
          file=sys.stderr)
    assert ours == pytest.approx(result["token_perplexity"], rel=0.1)


def _choice_loglikelihood(model, tok, context: str, choice: str) -> float:
    """log p(choice | context) tokenised as lm-eval does (encode the whole, split at context)."""
    whole = tok(context + choice, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def test_fortunes_multiple_choice_picks_the_most_likely_topic(lm):
    from rankwise.data import load_topics

    model, tok = lm
    result = evaluate(model, ["rankwise_fortunes"], tokenizer=tok, limit=4)["rankwise_fortunes"]
    data = load_topics("fortunes", "test")
    hits = hits_norm = 0
    for text, label in zip(data.texts[:4], data.labels[:4].tolist(), strict=True):
        lls = [_choice_loglikelihood(model, tok, text.strip() + "\nTopic:", " " + name)
               for name in data.label_names]
        norm = [ll / len((" " + n).encode()) for ll, n in zip(lls, data.label_names, strict=True)]
        hits += max(range(len(lls)), key=lls.__getitem__) == label
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == label
    assert result["documents"] == 4
    assert result["acc"] == hits / 4 and result["acc_norm"] == hits_norm / 4


def test_unknown_task_lists_the_local_ones(lm):
    model, tok = lm
    assert {"rankwise_python_docs", "rankwise_fortunes"} <= set(local_tasks())
    with pytest.raises(ValueError, match=r"unknown harness task.*'hellaswag'.*rankwise_fortunes"):
        evaluate(model, "hellaswag", tokenizer=tok)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        evaluate(model, "rankwise_fortunes")


def test_cli_eval_harness_on_a_model_directory(lm, user_task, tmp_path, capsys):
    from rankwise.cli import main

    model, tok = lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "m"), "--harness", "my_notes", "--harness-include",
                 str(user_task), "--seq-len", "64", "--limit", "2", "--json", str(out)]) == 0
    assert "my_notes (2 documents, lm-evaluation-harness)" in capsys.readouterr().out
    saved = json.loads(out.read_text())["harness"]["my_notes"]
    assert saved["documents"] == 2 and saved["token_perplexity"] > 1
