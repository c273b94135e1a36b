"""Content hash of a large file, memoised so that repeated lookups do not re-read it.

Used to key caches on what a file holds rather than where it lives or when it was touched
(rankwise.models keys converted GGUF models this way, so every environment that installs the
same file shares one converted copy).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["file_sha256"]

_MEMO: dict[tuple[str, int, int, int], str] = {}


def file_sha256(
    path: str | os.PathLike[str], *, memo_dir: str | os.PathLike[str] | None = None
) -> str:
    """Hex SHA-256 of the file at `path`.

    Memoised in this process, and on disk under `memo_dir` when given, by the file's identity
    (resolved path, size, mtime, inode). The memo is only a shortcut: a file whose identity
    changed (touched, replaced, copied elsewhere) is hashed again, and what it holds still
    decides the result. A memo that cannot be written (read-only cache) is skipped.
    """
    path = Path(path)
    stat = path.stat()
    ident = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if ident in _MEMO:
        return _MEMO[ident]
    memo = Path(memo_dir) / hashlib.sha256(repr(ident).encode()).hexdigest()[:32] if memo_dir else None
    value = _read_memo(memo)
    if value is None:
        value = _hash(path)
        if memo is not None:
            _write_memo(memo, value)
    _MEMO[ident] = value
    return value


def _hash(path: Path) -> str:
    from rankwise.io import file_digest  # one hashing routine for checksums and cache keys

    return file_digest(path)


def _read_memo(memo: Path | None) -> str | None:
    if memo is None:
        return None
    try:
        value = memo.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def _write_memo(memo: Path, value: str) -> None:
    """Write atomically (temp sibling + rename): a reader sees the whole digest or none."""
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(value + "\n", encoding="ascii")
        os.replace(tmp, memo)
    except OSError as exc:
        logger.debug("could not memoise the hash in %s: %s", memo, exc)
        tmp.unlink(missing_ok=True)
