"""The corpora embedded in the package: Python documentation prose and fortunes by topic.

Both are built from Debian packages by ``scripts/build_data.py`` and described in DATA.md:

* ``python-docs`` (language modelling): the Python 3.11 documentation, one string per
  document, split *by document* into train / validation / test (a stable hash of the path).
* ``fortunes`` (topic classification): quotes from the ``fortunes`` package labelled by their
  topic file, split into train / test by a stable hash of the quote.

Files live in ``rankwise/data/corpora/`` as xz-compressed JSONL; ``manifest.json`` holds their
sha256, which is checked the first time a file is read in a process (a corrupt install fails
loudly instead of silently changing a perplexity).
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from importlib.abc import Traversable
from typing import Any

import torch

__all__ = [
    "TopicData",
    "corpus_names",
    "corpus_records",
    "corpus_splits",
    "load_corpus",
    "load_topics",
    "manifest",
    "topic_names",
    "topic_splits",
]


def _corpora_dir() -> Traversable:
    return resources.files("rankwise.data") / "corpora"


@lru_cache(maxsize=1)
def _manifest() -> dict[str, Any]:
    path = _corpora_dir() / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: the embedded corpora were not installed; reinstall rankwise or "
            "rebuild them with `python scripts/build_data.py`"
        ) from None


def manifest() -> dict[str, Any]:
    """A copy of the embedded data's manifest (files, sha256, per-split counts, provenance)."""
    return json.loads(json.dumps(_manifest()))


def corpus_names() -> list[str]:
    """Names of the embedded language-modelling corpora (e.g. ``["python-docs"]``)."""
    return sorted(_manifest()["corpora"])


def topic_names() -> list[str]:
    """Names of the embedded topic-classification sets (e.g. ``["fortunes"]``)."""
    return sorted(_manifest()["topics"])


def _entry(kind: str, name: str) -> dict[str, Any]:
    entries = _manifest()[kind]
    if name not in entries:
        what = "corpus" if kind == "corpora" else "topic set"
        raise ValueError(f"unknown embedded {what} {name!r}: choose one of {sorted(entries)}")
    return entries[name]


def corpus_splits(name: str = "python-docs") -> list[str]:
    """Split names of an embedded corpus, in the order train, validation, test."""
    return _ordered(_entry("corpora", name)["splits"])


def topic_splits(name: str = "fortunes") -> list[str]:
    """Split names of an embedded topic set (train, test)."""
    return _ordered(_entry("topics", name)["splits"])


def _ordered(splits: dict[str, Any]) -> list[str]:
    order = {"train": 0, "validation": 1, "test": 2}
    return sorted(splits, key=lambda s: (order.get(s, 3), s))


@lru_cache(maxsize=8)
def _records(kind: str, name: str) -> tuple[dict[str, str], ...]:
    """All records of one embedded file, sha256-checked against the manifest (cached)."""
    entry = _entry(kind, name)
    path = _corpora_dir() / entry["file"]
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(
            f"{path} is corrupt (sha256 {digest[:12]}... != manifest {entry['sha256'][:12]}...): "
            "reinstall rankwise or rebuild the data with `python scripts/build_data.py`"
        )
    lines = lzma.decompress(blob).decode("utf-8").splitlines()
    return tuple(json.loads(line) for line in lines if line)


def corpus_records(name: str = "python-docs") -> list[dict[str, str]]:
    """Every record of an embedded corpus as ``{"doc", "split", "text"}`` dicts (copies)."""
    return [dict(r) for r in _records("corpora", name)]


def _check_split(split: str, valid: list[str], name: str) -> None:
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {name!r}: choose one of {valid}")


@lru_cache(maxsize=16)
def _corpus_split(name: str, split: str) -> tuple[str, ...]:
    return tuple(r["text"] for r in _records("corpora", name) if r["split"] == split)


def load_corpus(name: str = "python-docs", split: str = "train") -> list[str]:
    """One string per document of an embedded corpus split.

    Args:
        name: an embedded corpus (``corpus_names()``).
        split: ``"train"``, ``"validation"`` or ``"test"``; documents never cross splits.

    Returns:
        A new list (callers may modify it) of the split's documents, sorted by document path.
    """
    _check_split(split, corpus_splits(name), name)
    return list(_corpus_split(name, split))


@dataclass(frozen=True)
class TopicData:
    """Texts with integer topic labels.

    Attributes:
        texts: the quotes, one string each.
        labels: (n,) int64 tensor; ``labels[i]`` indexes ``label_names``.
        label_names: topic names, sorted; position = label id.

    Unpacks like a tuple: ``texts, labels, label_names = load_topics()``.
    """

    texts: list[str]
    labels: torch.Tensor
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.texts, self.labels, self.label_names))

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@lru_cache(maxsize=16)
def _topic_split(name: str, split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    names = _entry("topics", name)["label_names"]
    index = {topic: i for i, topic in enumerate(names)}
    rows = [r for r in _records("topics", name) if r["split"] == split]
    return tuple(r["text"] for r in rows), tuple(index[r["topic"]] for r in rows)


def load_topics(name: str = "fortunes", split: str = "train") -> TopicData:
    """An embedded topic-classification split as texts, labels and label names.

    Args:
        name: an embedded topic set (``topic_names()``).
        split: ``"train"`` or ``"test"``.
    """
    _check_split(split, topic_splits(name), name)
    texts, labels = _topic_split(name, split)
    label_names = list(_entry("topics", name)["label_names"])
    return TopicData(list(texts), torch.tensor(labels, dtype=torch.long), label_names)
