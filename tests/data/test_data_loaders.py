"""Readers for the user's own text and the load_texts dispatcher."""

from __future__ import annotations

import json
import lzma

import pytest

import rankwise._optional
from rankwise.data import (
    from_hf_dataset,
    load_corpus,
    load_texts,
    load_topics,
    read_jsonl,
    read_text_files,
)


@pytest.fixture
def txt_dir(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file ✓\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not text\n", encoding="utf-8")
    return tmp_path


def test_read_text_files_folder_glob_and_list(txt_dir):
    assert read_text_files(txt_dir) == ["first file ✓\n", "second file\n", "nested\n"]
    assert read_text_files(str(txt_dir / "*.txt")) == ["first file ✓\n", "second file\n"]
    assert read_text_files([txt_dir / "b.txt", txt_dir / "notes.md"]) == ["second file\n", "not text\n"]


def test_read_text_files_errors_name_the_problem(txt_dir):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text_files(txt_dir / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no text files"):
        read_text_files(str(txt_dir / "*.csv"))
    (txt_dir / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt.*encoding="):
        read_text_files(txt_dir / "latin.txt")
    assert read_text_files(txt_dir / "latin.txt", encoding="latin-1") == ["café"]


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_reads_the_field_and_skips_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ['{"text": "a", "id": 1}', "", '{"text": "b\\nc"}'])
    assert read_jsonl(path) == ["a", "b\nc"]
    body = json.dumps({"body": "zipped"}) + "\n"
    xz = tmp_path / "d.jsonl.xz"
    xz.write_bytes(lzma.compress(body.encode()))
    assert read_jsonl(xz, field="body") == ["zipped"]


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (['{"text": "ok"}', '{"text": "ok"}', "{not json"], r"line 3: not valid JSON"),
        (['{"text": "ok"}', '{"body": "x", "id": 2}'], r"line 2: no field 'text' \(fields: \['body', 'id'\]\)"),
        (['{"text": 5}'], r"line 1: field 'text' holds int"),
        (['["a list"]'], r"line 1: expected a JSON object"),
    ],
)
def test_read_jsonl_errors_name_the_line(tmp_path, lines, pattern):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=pattern) as info:
        read_jsonl(path)
    assert "bad.jsonl" in str(info.value)


class _FakeDataset:
    """The slice of datasets.Dataset that from_hf_dataset uses."""

    def __init__(self, columns):
        self._columns = columns

    @property
    def column_names(self):
        return list(self._columns)

    def __getitem__(self, key):
        return list(self._columns[key])


class _FakeDatasetDict(dict):
    @property
    def column_names(self):
        return {k: v.column_names for k, v in self.items()}


def test_from_hf_dataset_objects():
    ds = _FakeDataset({"text": ["x", "y"], "label": [0, 1]})
    assert from_hf_dataset(ds) == ["x", "y"]
    dd = _FakeDatasetDict(train=ds, test=_FakeDataset({"text": ["z"]}))
    assert from_hf_dataset(dd, split="test") == ["z"]
    assert load_texts(dd, split="test") == ["z"]
    with pytest.raises(ValueError, match=r"no split 'dev'.*\['test', 'train'\]"):
        from_hf_dataset(dd, split="dev")
    with pytest.raises(ValueError, match=r"no column 'body'.*field="):
        from_hf_dataset(ds, field="body")
    with pytest.raises(ValueError, match="row 1 of column 'label' is int"):
        from_hf_dataset(_FakeDataset({"label": ["a", 1]}), field="label")


def test_from_hf_dataset_by_name_needs_the_optional_package(monkeypatch):
    monkeypatch.setattr(rankwise._optional, "is_available", lambda package: False)
    with pytest.raises(ImportError, match=r"datasets.*rankwise\[data\]"):
        from_hf_dataset("some/dataset")
    with pytest.raises(ImportError, match=r"datasets"):
        load_texts("hf:some/dataset")


def test_load_texts_dispatches_on_the_source(txt_dir, tmp_path):
    assert load_texts("python-docs", "test") == load_corpus("python-docs", "test")
    assert load_texts("fortunes", "test") == load_topics("fortunes", "test").texts
    assert load_texts(txt_dir) == read_text_files(txt_dir)
    assert load_texts(txt_dir / "a.txt") == ["first file ✓\n"]
    assert load_texts(str(txt_dir / "s*" / "*.txt")) == ["nested\n"]
    jsonl = _write_jsonl(tmp_path / "x.jsonl", ['{"t": "one"}'])
    assert load_texts(jsonl, field="t") == ["one"]
    with pytest.raises(ValueError, match=r"unsupported file type '\.md'"):
        load_texts(txt_dir / "notes.md")
    with pytest.raises(ValueError, match=r"unknown text source 'wikitext'.*python-docs.*hf:NAME"):
        load_texts("wikitext")
