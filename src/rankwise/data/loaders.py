"""Read the user's own text: .txt files, JSONL, Hugging Face datasets, and one dispatcher.

Every reader returns ``list[str]`` (one string per document) in a deterministic order, and
every failure names the file (and line) and what to do about it.
"""

from __future__ import annotations

import glob
import gzip
import json
import lzma
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from rankwise._optional import require
from rankwise.data.corpus import corpus_names, load_corpus, load_topics, topic_names

__all__ = ["from_hf_dataset", "load_texts", "read_jsonl", "read_text_files"]

PathLike = str | os.PathLike[str]
_GLOB_CHARS = ("*", "?", "[")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".ndjson")


def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _expand(item: PathLike) -> list[Path]:
    """Files named by one path, folder (its *.txt, recursively) or glob pattern."""
    text = os.fspath(item)
    path = Path(text)
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    if path.is_file():
        return [path]
    if _has_glob(text):
        return sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    raise FileNotFoundError(f"{text} does not exist: pass an existing file, folder or glob")


def read_text_files(paths_or_glob: PathLike | Iterable[PathLike], *, encoding: str = "utf-8") -> list[str]:
    """Read text files, one string per file.

    Args:
        paths_or_glob: a file, a folder (all ``*.txt`` below it), a glob pattern (``**`` allowed),
            or a list of any of these.
        encoding: text encoding of the files.

    Returns:
        File contents in sorted path order (per argument), so the result is deterministic.
    """
    items = [paths_or_glob] if isinstance(paths_or_glob, str | os.PathLike) else list(paths_or_glob)
    files = [f for item in items for f in _expand(item)]
    if not files:
        raise FileNotFoundError(f"no text files matched {paths_or_glob!r}: check the path or pattern")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding=encoding))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{f} is not valid {encoding} ({exc.reason} at byte {exc.start}): "
                             "pass encoding=... matching the file") from None
    return texts


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: PathLike, field: str = "text") -> list[str]:
    """The string ``field`` of every JSON object in a JSONL file (``.xz``/``.gz`` allowed).

    Blank lines are skipped. A line that is not JSON, not an object, lacks ``field`` or holds a
    non-string there raises ValueError naming the file and the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the path of a .jsonl file")
    texts = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg}): fix or remove that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with a {field!r} field, "
                                 f"got {type(record).__name__}")
            if field not in record:
                raise ValueError(f"{where}: no field {field!r} (fields: {sorted(record)}): "
                                 "pass field= naming the text field")
            value = record[field]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {field!r} holds {type(value).__name__}, not a string")
            texts.append(value)
    return texts


def from_hf_dataset(name_or_dataset: Any, split: str = "train", field: str = "text",
                    **load_kwargs: Any) -> list[str]:
    """Texts from a Hugging Face dataset (needs the optional ``datasets`` package for names).

    Args:
        name_or_dataset: a hub name / local path given to ``datasets.load_dataset``, or an
            already loaded ``Dataset`` / ``DatasetDict`` (anything with ``column_names``).
        split: the split to use (for names, and for a ``DatasetDict``).
        field: the text column.
        load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``name=`` for a config).
    """
    if isinstance(name_or_dataset, str | os.PathLike):
        datasets = require("datasets", "data", purpose="loading Hugging Face datasets")
        dataset = datasets.load_dataset(os.fspath(name_or_dataset), split=split, **load_kwargs)
    else:
        dataset = name_or_dataset
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
        if not hasattr(dataset, "keys"):  # not a DatasetDict either
            raise TypeError(f"expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
        if split not in dataset:
            raise ValueError(f"the dataset has no split {split!r}: choose one of {sorted(dataset.keys())}")
        dataset = dataset[split]
    columns = list(dataset.column_names)
    if field not in columns:
        raise ValueError(f"the dataset has no column {field!r} (columns: {columns}): pass field=")
    texts = list(dataset[field])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"row {bad} of column {field!r} is {type(texts[bad]).__name__}, not a string")
    return texts


def load_texts(source: Any, split: str = "train", *, field: str = "text") -> list[str]:
    """Texts from any source rankwise understands, one string per document.

    ``source`` may be: an embedded corpus name (``"python-docs"``, ``split`` applies) or topic
    set (``"fortunes"``: its texts); a ``.txt`` file, a folder of ``.txt`` files or a glob; a
    JSONL file (``field`` applies); ``"hf:NAME"`` or a loaded ``datasets`` object (``split`` and
    ``field`` apply).
    """
    if not isinstance(source, str | os.PathLike):
        return from_hf_dataset(source, split, field)
    text = os.fspath(source)
    if text in corpus_names():
        return load_corpus(text, split)
    if text in topic_names():
        return load_topics(text, split).texts
    if text.startswith("hf:"):
        return from_hf_dataset(text[3:], split, field)
    path = Path(text)
    if path.is_file() and path.name.endswith(_JSONL_SUFFIXES):
        return read_jsonl(path, field)
    if path.is_file() and path.suffix != ".txt":
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}: use .txt or .jsonl")
    if path.exists() or _has_glob(text):
        return read_text_files(path if path.exists() else text)
    raise ValueError(
        f"unknown text source {text!r}: use an embedded corpus {corpus_names() + topic_names()}, "
        "a .txt/.jsonl file, a folder of .txt files, a glob, or 'hf:NAME' for a Hugging Face dataset"
    )
