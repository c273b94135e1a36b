#!/usr/bin/env python3
"""Rebuild rankwise's embedded corpora from the Debian packages they come from.

Three data sets ship inside the package (src/rankwise/data/corpora/), see DATA.md:

* ``python_docs.jsonl.xz``: the Python 3.11 documentation's reST sources (Debian package
  ``python3.11-doc``), one record ``{"doc", "split", "text"}`` per document, lightly cleaned
  towards prose (see ``clean_rest``), split by document into train/validation/test.
* ``fortunes.jsonl.xz``: quotes from the ``fortunes`` package for topic classification, one
  record ``{"topic", "split", "text"}`` per quote.
* ``devils_dictionary.jsonl.xz``: Ambrose Bierce's *The Devil's Dictionary* (1911, public
  domain; Debian package ``dict-devil``), one record ``{"doc", "split", "text"}`` per entry,
  split by entry into train/validation/test: literary English prose and verse, a held-out
  domain for language models calibrated or healed on the Python docs.

plus ``manifest.json`` (sha256, sizes, counts, provenance). The output is deterministic: the
same packages give the same bytes (sorted records and keys, xz with fixed settings, no
timestamps). Usage::

    python scripts/build_data.py                 # apt-get download the .debs into a temp dir
    python scripts/build_data.py --deb-dir /tmp/deb
    python scripts/build_data.py --deb-dir /tmp/deb --check   # verify the shipped files
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = {"python-docs": "python3.11-doc", "fortunes": "fortunes", "devils-dictionary": "dict-devil"}
# The versions the shipped files were built from (Debian 12 "bookworm" main). Another version
# (e.g. a newer security update) builds different bytes: allowed only with --any-version.
PINNED = {"python3.11-doc": "3.11.2-6+deb12u8", "fortunes": "1:1.99.1-7.3", "dict-devil": "1.0-13.1"}
DOCS_ROOT = "usr/share/doc/python3.11/html/_sources"
FORTUNES_ROOT = "usr/share/games/fortunes"
DEVIL_ROOT = "usr/share/dictd"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "rankwise" / "data" / "corpora"

# Python docs: documents dropped (legal boilerplate, a table of contents, an empty changelog
# stub and include-snippets), and the length below which a cleaned document is dropped (index
# pages that are only a toctree).
DOCS_EXCLUDE = ("license", "copyright", "contents", "whatsnew/changelog")
DOCS_EXCLUDE_PREFIX = ("includes/",)
DOCS_MIN_CHARS = 500
# Split by a stable hash of the document id: bucket = sha256(salt + id) mod 100.
DOCS_SALT = "rankwise-python-docs-v1:"
DOCS_SPLITS = (("train", 90), ("validation", 95), ("test", 100))  # bucket < bound

# Fortunes: topics chosen to be distinguishable by content (not style-only sets such as
# "platitudes"/"wisdom", nor overlapping ones such as "linux"/"linuxcookie" vs "computers"),
# quotes kept when MIN..MAX characters long, at most CAP per topic (the smallest hashes).
FORTUNE_TOPICS = (
    "computers", "education", "law", "men-women", "politics", "science", "songs-poems",
    "startrek",
)
FORTUNE_MIN_CHARS, FORTUNE_MAX_CHARS, FORTUNE_CAP = 10, 2000, 300
FORTUNE_SALT = "rankwise-fortunes-v1:"
FORTUNE_SPLITS = (("train", 80), ("test", 100))

# The Devil's Dictionary: one record per entry (dictd entries; the 00-database-* headers, which
# hold the edition's notice, are metadata, not entries), split by the entry's headword.
DEVIL_SALT = "rankwise-devils-dictionary-v1:"
DEVIL_SPLITS = (("train", 80), ("validation", 90), ("test", 100))
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

XZ_PRESET = 9 | lzma.PRESET_EXTREME


# --------------------------------------------------------------------------- reST cleaning
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")
_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[[#\w-]*\]\s+(.*)$")
_OPTION = re.compile(r"^\s+:[\w -]+:(\s|$)")
_ADORNMENT = re.compile(r"^([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*[+=|:\- ]*[-=]{3,}[+=|:\- ]*$")
_ROLE = re.compile(r"(?::[\w.+-]+)+:`([^`]+)`")
_TITLED = re.compile(r"^(.*?)\s*<[^<>]+>$", re.S)
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?(?!\w)")
_LITERAL = re.compile(r"``(.+?)``", re.S)
_FOOTREF = re.compile(r"\s*\[#[\w-]*\]_")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*", re.S)
_EMPH = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_DEFAULT_ROLE = re.compile(r"`([^`]+)`")

# Directives whose whole block is metadata for Sphinx, not text: dropped with their body.
_DROP = {
    "index", "module", "moduleauthor", "sectionauthor", "highlight", "toctree", "currentmodule",
    "include", "literalinclude", "testsetup", "testcleanup", "raw", "audit-event",
    "audit-event-table", "image", "figure", "tabularcolumns", "only", "ifconfig", "program",
    "c:namespace", "c:namespace-push", "c:namespace-pop", "py:module", "py:currentmodule",
    "availability", "limited-api-list", "miscnews", "sidebar", "rubric", "default-role",
    "productionlist", "csv-table", "role", "versionadded-removed",
}
# Directives rendered as a label followed by their argument (what the HTML shows).
_LABELS = {
    "versionadded": "New in version", "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version",
    "note": "Note:", "warning": "Warning:", "important": "Important:", "tip": "Tip:",
    "caution": "Caution:", "attention": "Attention:", "danger": "Danger:", "hint": "Hint:",
    "seealso": "See also:", "impl-detail": "CPython implementation detail:",
}
# Directives whose body is code: kept verbatim.
_CODE = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "parsed-literal"}


def _role(match: re.Match[str]) -> str:
    """`:role:`content`` -> what Sphinx displays: the title, or the target (`~a.b` -> `b`)."""
    content = match.group(0)
    name = content[: content.index("`")]
    text = match.group(1)
    titled = _TITLED.match(text)
    if titled and titled.group(1):
        return titled.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    if name in (":pep:", ":PEP:"):
        return f"PEP {text}"
    if name in (":rfc:", ":RFC:"):
        return f"RFC {text}"
    return text


def clean_inline(text: str) -> str:
    """Strip inline reST markup from a prose paragraph: roles, links, literals, emphasis.

    Inline literals and role texts are set aside first so that `*` or backticks inside code
    are never taken for markup.
    """
    saved: list[str] = []

    def keep(value: str) -> str:
        saved.append(value)
        return f"\x00{len(saved) - 1}\x00"

    text = _LITERAL.sub(lambda m: keep(m.group(1)), text)
    text = _ROLE.sub(lambda m: keep(_role(m)), text)
    text = _LINK.sub(r"\1", text)
    text = _FOOTREF.sub("", text)
    text = _REF.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _DEFAULT_ROLE.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\*", "*").replace("\\_", "_").replace("\\|", "|")
    text = text.rstrip()
    if text.endswith("::"):  # "Example::" -> "Example:", "Example ::" -> "Example"
        text = text[:-2]
        text = text.rstrip() if text.endswith(" ") or not text.strip() else text + ":"
    text = re.sub("\x00(\\d+)\x00", lambda m: saved[int(m.group(1))], text)
    return "\n".join(line.rstrip() for line in text.split("\n"))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _skip_block(lines: list[str], i: int, base: int) -> int:
    """Index of the first line after the indented block that starts at `i` (indent > base)."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    return i


def clean_rest(text: str) -> str:
    """reST source -> prose-like text (documented in DATA.md).

    Drops Sphinx metadata directives (index, module, toctree, ...), comments and link targets,
    section adornment lines and table rules; renders admonitions and version notes as their
    labels ("Note:", "New in version 3.2."), API directives as their signature line; strips
    inline roles, links, literals and emphasis to the displayed text (per paragraph, so markup
    that spans lines is handled). Literal (code) blocks and doctest lines are kept verbatim.
    Runs of blank lines collapse to one.
    """
    lines = text.replace("\r\n", "\n").replace("\t", "    ").split("\n")
    out: list[str] = []
    para: list[str] = []  # prose lines waiting for inline cleaning

    def flush() -> None:
        if para:
            out.extend(clean_inline("\n".join(para)).split("\n"))
            para.clear()

    i = 0
    literal_base: int | None = None  # indent of the paragraph that opened a literal block
    while i < len(lines):
        line = lines[i].rstrip()
        if literal_base is not None:
            if not line.strip() or _indent(line) > literal_base:
                out.append(line)
                i += 1
                continue
            literal_base = None
        if not line.strip():
            flush()
            out.append("")
            i += 1
            continue
        base = _indent(line)
        directive = _DIRECTIVE.match(line)
        if directive:
            flush()
            name, arg = directive.group(2), directive.group(3).strip()
            j = i + 1
            while j < len(lines) and _OPTION.match(lines[j]) and _indent(lines[j]) > base:
                j += 1
            if name in _DROP:
                i = _skip_block(lines, j, base)
                continue
            if name in _CODE:
                literal_base, i = base, j
                continue
            if name == "deprecated-removed" and len(arg.split()) == 2:
                arg = "{}, will be removed in version {}".format(*arg.split())
            label = _LABELS.get(name)
            header = " ".join(p for p in (label, clean_inline(arg) if label else arg) if p)
            if name.startswith(("version", "deprecated")):
                header = header.rstrip(".") + "."
            if header.strip():
                out.append(" " * base + header)
            i = j
            continue
        footnote = _FOOTNOTE.match(line)
        if footnote:
            flush()
            para.append(" " * base + footnote.group(2))
            i += 1
            continue
        if _EXPLICIT.match(line):  # comment, link target or substitution definition
            flush()
            i = _skip_block(lines, i + 1, base)
            continue
        if _ADORNMENT.match(line) or _TABLE_RULE.match(line):
            flush()
            i += 1
            continue
        if line.lstrip().startswith(">>>"):  # doctest block: verbatim up to the blank line
            flush()
            while i < len(lines) and lines[i].strip():
                out.append(lines[i].rstrip())
                i += 1
            continue
        para.append(line)
        if line.endswith("::"):
            flush()
            literal_base = base
        i += 1
    flush()
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    return text.strip("\n") + "\n"


# --------------------------------------------------------------------------- building
def bucket(key: str, salt: str) -> int:
    """Stable bucket in [0, 100) of `key`: sha256 of salt + key, mod 100."""
    return int(hashlib.sha256((salt + key).encode("utf-8")).hexdigest(), 16) % 100


def split_of(key: str, salt: str, bounds: tuple[tuple[str, int], ...]) -> str:
    b = bucket(key, salt)
    return next(name for name, bound in bounds if b < bound)


def build_python_docs(root: Path) -> list[dict[str, str]]:
    records = []
    for path in sorted(root.rglob("*.rst.txt")):
        doc = path.relative_to(root).as_posix()[: -len(".rst.txt")]
        if doc in DOCS_EXCLUDE or doc.startswith(DOCS_EXCLUDE_PREFIX):
            continue
        text = clean_rest(path.read_text(encoding="utf-8"))
        if len(text) < DOCS_MIN_CHARS:
            continue
        records.append({"doc": doc, "split": split_of(doc, DOCS_SALT, DOCS_SPLITS), "text": text})
    return records


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file on lines that are exactly '%'; strip each quote's edges."""
    quotes, current = [], []
    for line in text.split("\n"):
        if line.rstrip() == "%":
            quotes.append("\n".join(current))
            current = []
        else:
            current.append(line.rstrip())
    quotes.append("\n".join(current))
    return [q.strip("\n") for q in quotes if q.strip()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def build_fortunes(root: Path) -> list[dict[str, str]]:
    by_topic = {}
    for topic in FORTUNE_TOPICS:
        raw = (root / topic).read_bytes().decode("utf-8", errors="replace")
        by_topic[topic] = [q for q in parse_fortunes(raw)
                           if FORTUNE_MIN_CHARS <= len(q) <= FORTUNE_MAX_CHARS]
    # Drop quotes that occur in more than one topic (ambiguous label); dedupe within a topic.
    owners: dict[str, set[str]] = {}
    for topic, quotes in by_topic.items():
        for q in quotes:
            owners.setdefault(_norm(q), set()).add(topic)
    records = []
    for topic, quotes in by_topic.items():
        seen: set[str] = set()
        kept = []
        for q in quotes:
            key = _norm(q)
            if len(owners[key]) == 1 and key not in seen:
                seen.add(key)
                kept.append(q)
        kept.sort(key=lambda q: hashlib.sha256((FORTUNE_SALT + _norm(q)).encode()).hexdigest())
        for q in kept[:FORTUNE_CAP]:
            split = split_of(_norm(q), FORTUNE_SALT, FORTUNE_SPLITS)
            records.append({"split": split, "text": q, "topic": topic})
    # A stable pseudo-random order, so the first rows of a split mix all topics.
    records.sort(key=lambda r: hashlib.sha256((r["topic"] + "\n" + r["text"]).encode()).hexdigest())
    return records


def dictd_number(text: str) -> int:
    """A dictd index number (offset or length): base 64, most significant digit first."""
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def parse_dictd(index: str, data: bytes) -> list[tuple[str, str]]:
    """(headword, text) of every entry of a dictd dictionary, in index order; an entry that
    several headwords share, or whose text repeats another's, appears once (the first); the
    00-database-* headers are skipped."""
    seen: set[int] = set()
    texts: set[str] = set()
    entries = []
    for line in index.splitlines():
        if not line.strip():
            continue
        word, offset, length = line.split("\t")[:3]
        start = dictd_number(offset)
        if word.startswith("00database") or start in seen:
            continue
        seen.add(start)
        raw = data[start: start + dictd_number(length)].decode("utf-8")
        text = "\n".join(x.rstrip() for x in raw.strip("\n").split("\n"))
        if text not in texts:
            texts.add(text)
            entries.append((word, text))
    return entries


def build_devils_dictionary(root: Path) -> list[dict[str, str]]:
    data = gzip.decompress((root / "devil.dict.dz").read_bytes())  # dictzip is gzip-compatible
    index = (root / "devil.index").read_text(encoding="utf-8")
    return sorted(({"doc": word, "split": split_of(word, DEVIL_SALT, DEVIL_SPLITS), "text": text}
                   for word, text in parse_dictd(index, data)), key=lambda r: r["doc"])


def encode_jsonl_xz(records: list[dict[str, str]]) -> bytes:
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    return lzma.compress(lines.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=XZ_PRESET)


def _counts(records: list[dict[str, str]], key: str | None = None) -> dict:
    counts: dict = {}
    for r in records:
        split = counts.setdefault(r["split"], {"records": 0, "characters": 0})
        split["records"] += 1
        split["characters"] += len(r["text"])
        if key:
            split.setdefault(key, {})
            split[key][r[key]] = split[key].get(r[key], 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- Debian plumbing
def find_deb(deb_dir: Path, package: str, any_version: bool) -> Path:
    """The package's .deb in `deb_dir`, checked against the pinned version."""
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if not found:
        raise SystemExit(f"no {package}_*.deb in {deb_dir}: download it with "
                         f"`apt-get download {package}={PINNED[package]}` or omit --deb-dir")
    pinned = [d for d in found if deb_field(d, "Version") == PINNED[package]]
    if pinned:
        return pinned[0]
    if not any_version:
        raise SystemExit(f"{found[-1].name} is not the pinned version {PINNED[package]}: the "
                         "output would differ from the shipped files; pass --any-version to "
                         "build from it anyway (then update PINNED and DATA.md)")
    return found[-1]


def download(deb_dir: Path, any_version: bool) -> None:
    """apt-get download the pinned versions (or the candidates, with --any-version)."""
    for package, version in PINNED.items():
        cmd = ["apt-get", "download", f"{package}={version}"]
        if subprocess.run(cmd, cwd=deb_dir).returncode == 0:
            continue
        if not any_version:
            raise SystemExit(f"apt cannot download {package}={version} (run `apt-get update`; "
                             "the version may have left the mirror): pass --deb-dir with that "
                             ".deb, or --any-version to build from the current one")
        subprocess.run(["apt-get", "download", package], cwd=deb_dir, check=True)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True,
                          capture_output=True, text=True).stdout.strip()


def unpack(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


def build(deb_dir: Path, work: Path, any_version: bool = False) -> dict[str, bytes]:
    """Build every output file's bytes (name -> bytes) from the .debs in `deb_dir`."""
    files: dict[str, bytes] = {}
    manifest: dict = {"format": 1, "corpora": {}, "topics": {}}
    specs = (
        ("python-docs", "python_docs.jsonl.xz", DOCS_ROOT, build_python_docs, None, "corpora"),
        ("fortunes", "fortunes.jsonl.xz", FORTUNES_ROOT, build_fortunes, "topic", "topics"),
        ("devils-dictionary", "devils_dictionary.jsonl.xz", DEVIL_ROOT, build_devils_dictionary, None,
         "corpora"),
    )
    for name, filename, subdir, builder, key, kind in specs:
        deb = find_deb(deb_dir, PACKAGES[name], any_version)
        records = builder(unpack(deb, work / name) / subdir)
        blob = encode_jsonl_xz(records)
        files[filename] = blob
        manifest[kind][name] = {
            "file": filename,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "splits": _counts(records, key),
            "source": {"distribution": "Debian 12 (bookworm)", "package": PACKAGES[name],
                       "version": deb_field(deb, "Version"),
                       "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest()},
        }
    manifest["topics"]["fortunes"]["label_names"] = sorted(FORTUNE_TOPICS)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    files["manifest.json"] = text.encode("utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb-dir", type=Path, help="folder holding the .deb files "
                        "(default: apt-get download them into a temporary folder)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--any-version", action="store_true",
                        help="accept package versions other than the pinned ones")
    parser.add_argument("--check", action="store_true",
                        help="rebuild and compare with the files in --out; write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        deb_dir = args.deb_dir
        if deb_dir is None:
            deb_dir = work / "debs"
            deb_dir.mkdir()
            download(deb_dir, args.any_version)
        files = build(deb_dir, work / "unpacked", args.any_version)
    if args.check:
        bad = [n for n, b in files.items()
               if not (args.out / n).is_file() or (args.out / n).read_bytes() != b]
        for n in bad:
            print(f"differs: {args.out / n}", file=sys.stderr)
        print("ok" if not bad else f"{len(bad)} file(s) differ")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, b in files.items():
        tmp_path = args.out / f".{n}.tmp"
        tmp_path.write_bytes(b)
        tmp_path.replace(args.out / n)
        print(f"wrote {args.out / n} ({len(b):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
