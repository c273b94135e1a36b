"""The embedded corpora: integrity, split rules, disjointness, and the loaders' contracts."""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest
import torch

from rankwise.data import (
    TopicData,
    corpus_names,
    corpus_records,
    corpus_splits,
    load_corpus,
    load_topics,
    manifest,
    topic_names,
)

CORPORA = resources.files("rankwise.data") / "corpora"


def _bucket(key: str, salt: str) -> int:
    """The split rule DATA.md documents: sha256(salt + key) as an integer, mod 100."""
    return int(hashlib.sha256((salt + key).encode("utf-8")).hexdigest(), 16) % 100


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_manifest_sha256_and_sizes_match_the_shipped_files():
    m = manifest()
    entries = {**m["corpora"], **m["topics"]}
    assert set(entries) == {"python-docs", "fortunes", "devils-dictionary"}
    total = 0
    for entry in entries.values():
        blob = (CORPORA / entry["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        assert len(blob) == entry["bytes"]
        total += len(blob)
    assert total <= 10 * 1024 * 1024


def test_python_docs_splits_are_disjoint_by_document_and_cover_everything():
    records = corpus_records("python-docs")
    docs = [r["doc"] for r in records]
    assert len(docs) == len(set(docs)), "a document appears twice"
    assert corpus_splits("python-docs") == ["train", "validation", "test"]
    by_split = {s: load_corpus("python-docs", s) for s in corpus_splits("python-docs")}
    # Every record is in exactly the split it names, and the splits together are the corpus.
    assert sum(len(v) for v in by_split.values()) == len(records)
    for split, texts in by_split.items():
        assert texts == [r["text"] for r in records if r["split"] == split]
        counts = manifest()["corpora"]["python-docs"]["splits"][split]
        assert counts["records"] == len(texts)
        assert counts["characters"] == sum(map(len, texts))
    # Enough held-out text for a perplexity: >= 200k characters each.
    assert sum(map(len, by_split["validation"])) >= 200_000
    assert sum(map(len, by_split["test"])) >= 200_000


def test_python_docs_split_is_the_documented_hash_of_the_path():
    for r in corpus_records("python-docs"):
        b = _bucket(r["doc"], "rankwise-python-docs-v1:")
        expected = "train" if b < 90 else "validation" if b < 95 else "test"
        assert r["split"] == expected, r["doc"]


def test_python_docs_text_is_cleaned_prose():
    text = "\n".join(load_corpus("python-docs", "validation"))
    assert ".. index::" not in text and ".. toctree::" not in text
    assert text.count(":func:`") == 0 and text.count(":class:`") == 0
    assert "datetime" in text  # library/datetime is a validation document (hash rule above)


def test_fortunes_has_six_topics_of_200_quotes_and_disjoint_splits():
    train, test = load_topics("fortunes", "train"), load_topics("fortunes", "test")
    assert train.label_names == test.label_names == sorted(train.label_names)
    per_topic = torch.bincount(torch.cat([train.labels, test.labels]),
                               minlength=train.num_labels)
    assert train.num_labels >= 6 and (per_topic >= 200).all(), per_topic
    assert not {_norm(t) for t in train.texts} & {_norm(t) for t in test.texts}
    assert len(set(map(_norm, train.texts))) == len(train.texts)  # no duplicates
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3  # ~80/20
    for data in (train, test):
        assert data.labels.dtype == torch.long and data.labels.shape == (len(data.texts),)
        assert int(data.labels.min()) >= 0 and int(data.labels.max()) < data.num_labels
        assert all(isinstance(t, str) and t.strip() for t in data.texts)


def test_fortunes_split_is_the_documented_hash_of_the_quote():
    for split in ("train", "test"):
        for text in load_topics("fortunes", split).texts:
            expected = "train" if _bucket(_norm(text), "rankwise-fortunes-v1:") < 80 else "test"
            assert expected == split


def test_topic_data_unpacks_like_a_tuple():
    data = load_topics()
    texts, labels, names = data
    assert isinstance(data, TopicData)
    assert texts == data.texts and labels is data.labels and names == data.label_names


def test_loaders_return_fresh_lists():
    first = load_corpus("python-docs", "test")
    first.clear()
    assert load_corpus("python-docs", "test")
    topics = load_topics("fortunes", "test")
    topics.texts.clear()
    assert load_topics("fortunes", "test").texts


def test_unknown_names_and_splits_list_the_valid_ones():
    assert corpus_names() == ["devils-dictionary", "python-docs"] and topic_names() == ["fortunes"]
    with pytest.raises(ValueError, match=r"python-docs"):
        load_corpus("wikitext")
    with pytest.raises(ValueError, match=r"'train', 'validation', 'test'"):
        load_corpus("python-docs", "dev")
    with pytest.raises(ValueError, match=r"'train', 'test'"):
        load_topics("fortunes", "validation")
    with pytest.raises(ValueError, match=r"fortunes"):
        load_topics("news")


def test_devils_dictionary_is_split_by_entry_with_a_test_split_for_perplexity():
    records = corpus_records("devils-dictionary")
    texts = [r["text"] for r in records]
    assert len(texts) == len(set(texts)), "an entry appears twice"
    # entries sharing a headword (several senses) share its split: the split is the headword's
    assert corpus_splits("devils-dictionary") == ["train", "validation", "test"]
    for r in records:
        assert r["split"] == ("train" if _bucket(r["doc"], "rankwise-devils-dictionary-v1:") < 80 else
                              "validation" if _bucket(r["doc"], "rankwise-devils-dictionary-v1:") < 90 else "test")
        assert r["text"][:1].isupper() and r["text"] == r["text"].strip()  # "HEADWORD, n.  ..."
    assert sum(map(len, load_corpus("devils-dictionary", "test"))) > 30_000
