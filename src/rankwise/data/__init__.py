"""Data: embedded corpora, readers for the user's text, token packing and calibration batches.

    from rankwise.data import load_corpus, load_topics, pack_tokens, calibration_batch
    docs = load_corpus("python-docs", "validation")        # list[str], one per document
    texts, labels, names = load_topics("fortunes", "train")  # 8 topics
    blocks = pack_tokens(docs, tokenizer, seq_len=512)       # (n, 512) int64
    calib = calibration_batch(tokenizer, n=32, seq_len=256, seed=0)

Provenance, licences and cleaning of the embedded data: DATA.md at the repository root.
"""

from rankwise.data.corpus import (
    TopicData,
    corpus_names,
    corpus_records,
    corpus_splits,
    load_corpus,
    load_topics,
    manifest,
    topic_names,
    topic_splits,
)
from rankwise.data.loaders import from_hf_dataset, load_texts, read_jsonl, read_text_files
from rankwise.data.packing import PackedLMDataset, calibration_batch, pack_tokens, token_stream

__all__ = [
    "PackedLMDataset",
    "TopicData",
    "calibration_batch",
    "corpus_names",
    "corpus_records",
    "corpus_splits",
    "from_hf_dataset",
    "load_corpus",
    "load_texts",
    "load_topics",
    "manifest",
    "pack_tokens",
    "read_jsonl",
    "read_text_files",
    "token_stream",
    "topic_names",
    "topic_splits",
]
