"""Publish an output directory atomically: build it in a temp sibling, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rankwise.io import default_mode

__all__ = ["check_target", "published_dir"]


def check_target(out: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse a non-empty `out` unless `overwrite` (before any work starts)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: pass a directory path for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty: pass another --out, or "
                         "--overwrite (overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def published_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp directory beside `out`; on success it replaces `out` in one rename.

    A run killed half-way leaves only a hidden `.NAME.*.tmp` sibling, never a partial `out`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        tmp.chmod(default_mode(directory=True))
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
