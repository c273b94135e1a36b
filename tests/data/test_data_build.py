"""scripts/build_data.py: the reST cleaner, fortune parsing and deterministic encoding."""

from __future__ import annotations

import importlib.util
import json
import lzma
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_data.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REST = """\
:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode.

.. index:: single: JSON

Use :func:`~json.encoder.dumps` and :ref:`the table <py-to-json>` with ``*args``, see
`JSON <https://json.org>`_ and :pep:`8` [#note]_. This is **important** and *nice*.

.. note::
   A note body.

.. versionadded:: 3.2

.. function:: dumps(obj, *, indent=None, **kw)

   Serialize *obj*. Example::

      x = `a` + :b:`c`   # code is kept verbatim

   Done.

.. This is a comment
   spanning two lines.

>>> print(:x:`y`)
"""


def test_clean_rest_strips_markup_and_keeps_code(build):
    out = build.clean_rest(REST)
    lines = out.split("\n")
    assert lines[0] == "json --- JSON encoder"
    assert "=====" not in out and ".. " not in out and "synopsis" not in out
    assert "single: JSON" not in out and "comment" not in out and "spanning" not in out
    assert ("Use dumps and the table with *args, see\nJSON and PEP 8. "
            "This is important and nice.") in out
    assert "Note:\n   A note body." in out
    assert "New in version 3.2." in out
    assert "dumps(obj, *, indent=None, **kw)" in out
    assert "   Serialize obj. Example:\n" in out
    assert "      x = `a` + :b:`c`   # code is kept verbatim" in out  # literal block untouched
    assert "   Done." in out
    assert ">>> print(:x:`y`)" in out  # doctest untouched
    assert "\n\n\n" not in out and out.endswith("\n")


def test_parse_fortunes_splits_on_percent_lines(build):
    text = "first quote\n\t-- someone\n%\n\n%\nsecond\n%  \nthird 100% sure\n"
    assert build.parse_fortunes(text) == ["first quote\n\t-- someone", "second", "third 100% sure"]


def test_jsonl_xz_encoding_is_deterministic_and_round_trips(build):
    records = [{"split": "train", "text": "ünïcode\nline", "doc": "a/b"}, {"doc": "c", "split": "test", "text": "x"}]
    blob = build.encode_jsonl_xz(records)
    assert blob == build.encode_jsonl_xz([dict(r) for r in records])
    lines = lzma.decompress(blob).decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert lines[0].startswith('{"doc": "a/b", "split"')  # sorted keys


def test_split_buckets_follow_the_bounds(build):
    bounds = (("train", 90), ("validation", 95), ("test", 100))
    keys = [f"doc{i}" for i in range(2000)]
    splits = [build.split_of(k, "salt:", bounds) for k in keys]
    assert splits == [build.split_of(k, "salt:", bounds) for k in keys]  # stable
    share = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert 0.87 < share["train"] < 0.93 and 0.03 < share["validation"] < 0.07


def test_dictd_numbers_and_entries_follow_the_index(build):
    # dictd numbers are base 64 ("A"=0 ... "/"=63), most significant digit first.
    assert build.dictd_number("A") == 0 and build.dictd_number("/") == 63
    assert build.dictd_number("BA") == 64 and build.dictd_number("Bk") == 64 + 36
    data = b"HEADER\nALPHA, n.  First.  \n\n  verse  \nBETA, n.  Second.\n"
    def num(v):
        digits = ""
        while True:
            digits = build._B64[v % 64] + digits
            v //= 64
            if not v:
                return digits
    a, b = data.index(b"ALPHA"), data.index(b"BETA")
    index = "\n".join([f"00databaseinfo\t{num(0)}\t{num(7)}", f"alpha\t{num(a)}\t{num(b - a)}",
                       f"alpha2\t{num(a)}\t{num(b - a)}", f"beta\t{num(b)}\t{num(len(data) - b)}"])
    entries = build.parse_dictd(index, data)
    # headers skipped, a shared entry once under its first headword, edges and trailing spaces stripped
    assert entries == [("alpha", "ALPHA, n.  First.\n\n  verse"), ("beta", "BETA, n.  Second.")]
