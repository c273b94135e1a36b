"""rankwise.eval: strided perplexity against an explicit reference, closed forms, pooling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from rankwise.eval import (
    _windows,
    accuracy,
    classification_accuracy,
    embed,
    embedding_similarity,
    evaluate_split,
    nearest_centroid_accuracy,
    perplexity,
    strided_nll,
)

WORDS = "the a cat dog sat ran on under mat log big small red blue one two and or".split()


def word_tokenizer():
    """A whitespace word-level fast tokenizer, built offline: [PAD]=0, [UNK]=1, </s>=2, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>"
    )


def tiny_llama(vocab: int = 64, positions: int = 128) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(vocab: int) -> BertModel:
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def reference_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    """The recipe of the transformers docs, written out: labels -100 except each window's last
    `stride` new tokens, the model's own mean loss times its number of scored tokens."""
    nll, count, prev_end = 0.0, 0, 0
    n = ids.numel()
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + seq_len, n)
            trg = end - prev_end
            window = ids[begin:end].unsqueeze(0)
            labels = window.clone()
            labels[:, :-trg] = -100
            loss = model(window, labels=labels).loss
            scored = int((labels[:, 1:] != -100).sum())
            nll += loss.double().item() * scored
            count += scored
            prev_end = end
            if end == n:
                break
    return math.exp(nll / count)


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(100, 16, 16), (101, 16, 5), (40, 40, 40)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_explicit_window_loop(n, seq_len, stride, batch_size):
    model = tiny_llama()
    ids = torch.randint(0, 64, (n,))
    ours = perplexity(
        model, None, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=False
    )
    assert ours == pytest.approx(reference_perplexity(model, ids, seq_len, stride), rel=1e-5)


def test_non_overlapping_windows_sum_token_nll_not_window_means():
    # 37 tokens in windows of 16: 16 + 16 + 5. Averaging per-window means would weight the
    # 4 scored tokens of the last window like 15; the token-level sum must not.
    model = tiny_llama()
    ids = torch.randint(0, 64, (37,))
    total, count = strided_nll(model, ids, seq_len=16, progress=False)
    assert count == 15 + 15 + 4
    with torch.no_grad():
        ref = sum(
            F.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum").double().item()
            for w in ids.split(16)
        )
    assert total == pytest.approx(ref, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(2, 64), data=st.data())
def test_strided_windows_score_each_token_exactly_once(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len))
    hits = torch.zeros(n, dtype=torch.long)
    for begin, end, start in _windows(n, seq_len, stride):
        assert 0 <= begin < end <= n and end - begin <= seq_len and start >= 1
        hits[begin + start : end] += 1
        if begin > 0 and stride < seq_len:  # every later target sees >= seq_len - stride context
            assert start >= min(seq_len - stride, end - begin - 1)
    assert hits[0] == 0  # the first token has no context
    if stride < seq_len:
        assert torch.all(hits[1:] == 1)
    else:  # non-overlapping: all but each window's first token
        assert hits.sum() == n - len(_windows(n, seq_len, stride))
        assert hits.max() <= 1


class Uniform(torch.nn.Module):
    """Logits that are zero everywhere: every token has probability 1 / vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


class Successor(torch.nn.Module):
    """Puts almost all mass on (token + 1) mod vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return 50.0 * F.one_hot((ids + 1) % self.vocab, self.vocab).float()


@pytest.mark.parametrize("stride", [None, 7])
def test_uniform_model_has_perplexity_equal_to_vocab_size(stride):
    ids = torch.randint(0, 97, (200,))
    ppl = perplexity(Uniform(97), None, ids, seq_len=32, stride=stride, progress=False)
    assert ppl == pytest.approx(97.0, rel=1e-6)  # float32 log-softmax


def test_nan_logits_are_an_error_not_a_perplexity():
    class Broken(Uniform):
        def forward(self, ids):
            return torch.full((*ids.shape, self.vocab), float("nan"))

    with pytest.raises(ValueError, match="NaN logits"):
        perplexity(Broken(10), None, torch.randint(0, 10, (40,)), seq_len=8, progress=False)


def test_a_model_that_knows_the_sequence_has_perplexity_one():
    ids = torch.arange(300) % 50
    assert perplexity(Successor(50), None, ids, seq_len=32, progress=False) == pytest.approx(
        1.0, abs=1e-9
    )


def test_texts_become_one_eos_separated_stream_cut_at_max_tokens():
    tok = word_tokenizer()
    texts = ["the cat sat on the mat", "a dog ran", "one two"]
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor(ids)
    model = tiny_llama(vocab=len(tok))
    kw = {"seq_len": 4, "progress": False}
    assert perplexity(model, tok, texts, **kw) == perplexity(model, None, ids, **kw)
    assert perplexity(model, tok, texts, max_tokens=7, **kw) == perplexity(
        model, None, ids[:7], **kw
    )
    assert perplexity(model, tok, texts[0], **kw) == perplexity(model, None, ids[:7], **kw)


def test_perplexity_rejects_bad_settings():
    model = tiny_llama(positions=32)
    ids = torch.randint(0, 64, (50,))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, None, ids, seq_len=8, stride=9, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        perplexity(model, None, ids, seq_len=64, progress=False)
    with pytest.raises(TypeError, match="tokenizer"):
        perplexity(model, None, ["some text"], progress=False)
    with pytest.raises(TypeError, match="integer"):
        perplexity(model, None, ids.float(), progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, None, ids[:1], seq_len=8, progress=False)


def test_evaluate_split_scores_the_first_max_tokens_of_the_corpus():
    from rankwise.data import load_corpus

    tok = word_tokenizer()
    model = tiny_llama(vocab=len(tok))
    result = evaluate_split(
        model, tok, "python-docs", "test", seq_len=32, max_tokens=200, progress=False
    )
    assert result["stream_tokens"] == 200 and result["tokens"] == 200 - math.ceil(200 / 32)
    direct = perplexity(
        model, tok, load_corpus("python-docs", "test"), seq_len=32, max_tokens=200, progress=False
    )
    assert result["perplexity"] == pytest.approx(direct, rel=1e-12)


def test_accuracy_from_logits_and_from_predictions():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[3.0, 0, 0], [0, 2, 0], [1, 0, 0], [0, 5, 1]])  # third one wrong
    assert accuracy(logits, labels) == 0.75
    assert accuracy(torch.tensor([0, 1, 2, 0]), [0, 1, 2, 1]) == 0.75
    with pytest.raises(ValueError, match="shape"):
        accuracy(torch.tensor([0, 1]), labels)


def test_classification_accuracy_batched_equals_one_text_at_a_time():
    from transformers import LlamaForSequenceClassification

    tok = word_tokenizer()
    config = tiny_llama(vocab=len(tok)).config
    config.num_labels, config.pad_token_id = 3, tok.pad_token_id
    model = LlamaForSequenceClassification(config).eval()
    texts = ["the cat", "a big red dog ran on the log", "one", "two and one or blue", "small mat"]
    with torch.no_grad():
        preds = torch.stack(
            [model(**tok(t, return_tensors="pt")).logits[0].argmax() for t in texts]
        )
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert classification_accuracy(model, tok, texts, labels, batch_size=2) == accuracy(
        preds, labels
    )


def test_mean_pooling_ignores_padding_and_matches_a_manual_mean():
    tok = word_tokenizer()
    model = tiny_bert(len(tok))
    short = "the cat sat"
    alone = embed(model, tok, [short], normalize=False)
    padded = embed(
        model, tok, [short, "a big red dog ran on the log under the mat"], normalize=False
    )
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        hidden = model(**tok(short, return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(alone[0], hidden.mean(0), atol=1e-5, rtol=1e-5)
    unit = embed(model, tok, [short, "one two"])
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))


def test_embeddings_keep_input_order_when_batched_by_length():
    tok = word_tokenizer()
    model = tiny_bert(len(tok))
    texts = ["a big red dog ran on the log", "one", "the cat sat on the mat", "two and"]
    batched = embed(model, tok, texts, batch_size=2)
    single = torch.cat([embed(model, tok, [t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_similarity_with_itself_is_one_and_drops_when_perturbed():
    tok = word_tokenizer()
    model = tiny_bert(len(tok))
    texts = ["the cat sat", "a dog ran on the log", "one two"]
    same = embedding_similarity(model, model, tok, texts)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    other = tiny_bert(len(tok))  # different random weights
    diff = embedding_similarity(model, other, tok, texts)
    assert diff["min_cosine"] <= diff["mean_cosine"] < 0.999


def test_causal_lm_embeddings_use_the_backbone_last_hidden_state():
    tok = word_tokenizer()
    model = tiny_llama(vocab=len(tok))
    with torch.no_grad():
        hidden = model.model(**tok("the cat sat", return_tensors="pt")).last_hidden_state[0]
    got = embed(model, tok, ["the cat sat"], pooling="last", normalize=False)[0]
    torch.testing.assert_close(got, hidden[-1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        embed(model, tok, ["x"], pooling="median")


def test_nearest_centroid_accuracy_on_separated_clusters():
    centers = torch.eye(4) * 10
    train = torch.cat([centers + 0.1 * torch.randn(4, 4) for _ in range(5)])
    train_labels = torch.arange(4).repeat(5)
    test = torch.cat([centers, centers[:1] * 0 + centers[1]])  # last point: class 1's center
    test_labels = torch.tensor([0, 1, 2, 3, 0])  # ...labelled 0, so exactly 4 of 5 are right
    assert nearest_centroid_accuracy(train, train_labels, test, test_labels) == pytest.approx(0.8)
