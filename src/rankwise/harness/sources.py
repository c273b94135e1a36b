"""Datasets for lm-evaluation-harness tasks, built offline from rankwise's text sources.

A task YAML names one of these as its `custom_dataset` (lm-eval calls it with the task's
`dataset_kwargs` and `metadata` as keyword arguments) instead of a hub `dataset_path`, so
nothing is downloaded:

    custom_dataset: !function rankwise.harness.sources.documents
    dataset_kwargs: {source: python-docs, splits: [test]}

Each returns a `datasets.DatasetDict` keyed by split.
"""

from __future__ import annotations

from typing import Any

__all__ = ["documents", "topics"]


def documents(source: str = "python-docs", splits: Any = ("test",), **_: Any) -> Any:
    """One row {"text": document} per document of a corpus split, folder, file or glob.

    `source` is anything `rankwise.data.load_texts` reads: an embedded corpus name (then each
    split in `splits` is loaded), a directory of .txt files, a file or a glob (one split, named
    by the first entry of `splits`).
    """
    from datasets import Dataset, DatasetDict

    from rankwise.data import corpus_names, load_texts

    splits = [splits] if isinstance(splits, str) else list(splits)
    if source in corpus_names():
        return DatasetDict({s: Dataset.from_dict({"text": load_texts(source, s)}) for s in splits})
    return DatasetDict({splits[0]: Dataset.from_dict({"text": load_texts(source)})})


def topics(source: str = "fortunes", splits: Any = ("train", "test"), **_: Any) -> Any:
    """Rows {"text", "label" (int), "choices" (topic names)} of a topic corpus, per split."""
    from datasets import Dataset, DatasetDict

    from rankwise.data import load_topics

    splits = [splits] if isinstance(splits, str) else list(splits)
    out = {}
    for split in splits:
        data = load_topics(source, split)
        out[split] = Dataset.from_dict({
            "text": list(data.texts),
            "label": [int(x) for x in data.labels],
            "choices": [list(data.label_names)] * len(data.texts),
        })
    return DatasetDict(out)
