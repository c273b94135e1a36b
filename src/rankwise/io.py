"""Atomic writes, checksums and safetensors + JSON I/O: the one place rankwise touches disk.

Promises (docs/reliability.md):
- a file is written to a temporary sibling, fsynced and renamed onto its name (`atomic_path`);
- a directory is built in a temporary sibling, verified, and published by one rename; an older
  copy is renamed away first and deleted only once the new one is in place (`publish_dir`).
  A run killed at any point leaves the old directory or the new one; the next publish (or
  `recover`) restores or deletes whatever a killed run left beside it;
- every marker JSON records the SHA-256 and size of each file it vouches for (`digest_files`),
  and loaders check them (`verify_files`) before trusting the bytes;
- nothing is ever unpickled: tensors are safetensors, structure is JSON.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MANIFEST = "rankwise_manifest.json"  # checksums beside files in a format rankwise does not own (PEFT)
HASH = "sha256"  # measured 2.6x faster than blake2b on a CPU with SHA extensions (docs/reliability.md)
_SIBLING = re.compile(r"^\.(?P<name>.+)\.rankwise-(?P<role>tmp|old|gone|trash)-(?P<pid>\d+)-[0-9a-f]+$")
_FILE_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def default_mode(*, directory: bool = False) -> int:
    """The permissions a plain open() / mkdir() would give under the current umask (tempfile's
    mkstemp and mkdtemp make private 0600 / 0700 entries, wrong for a saved model)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` atomically.

    The temporary name carries the writer's pid, so the next write of the same file removes a
    temporary left by a killed writer.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        m = _FILE_TMP.match(stale.name)
        if m and m["name"] == target.name and not _alive(int(m["pid"])):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and safetensors' writer, which replaces the file) create 0600 files: give the
        # result the permissions a plain open() would, after the writer is done with it.
        os.chmod(tmp_path, default_mode())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON, with an error that names the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the file is corrupt: rewrite it") from exc


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save tensors as safetensors atomically (contiguous, detached copies on CPU)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a corrupt or truncated file raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({exc}); it is corrupt or truncated: "
            "re-create it from its source"
        ) from exc


# ----------------------------------------------------------------------------- checksums
def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex), read in 4 MiB chunks."""
    h = hashlib.new(HASH)
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def digest_files(root: str | os.PathLike[str], *, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """`{relative path: {"sha256": hex, "bytes": size}}` of every file under `root` (sorted)."""
    root = Path(root)
    skip = set(exclude)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skip:
            out[rel] = {HASH: file_digest(path), "bytes": path.stat().st_size}
    return out


def verify_files(
    root: str | os.PathLike[str],
    recorded: Any,
    *,
    marker: str,
    full: bool = True,
    only: Callable[[str], bool] | None = None,
) -> None:
    """Check the files `recorded` by `digest_files` (sizes; with `full`, SHA-256 too).

    The whole record is validated (types, no path leaving `root`); `only(name)` limits which
    files are then checked (those a loader reads).

    Raises:
        ValueError: a malformed record, a missing file, or one whose bytes changed; the message
            names the file and says how to recover.
    """
    root = Path(root)
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get(HASH), str)
        and isinstance(v.get("bytes"), int) for k, v in recorded.items()
    ):
        raise ValueError(f"{root / marker}: its 'files' record is malformed; the file is corrupt: re-save the directory")
    escaping = [rel for rel in recorded if Path(rel).is_absolute() or ".." in Path(rel).parts]
    if escaping:
        raise ValueError(f"{root / marker}: its 'files' record names {escaping[0]!r}, outside the directory; "
                         "the file is corrupt or was edited: re-save the directory")
    for rel, rec in recorded.items():
        if only is not None and not only(rel):
            continue
        path = root / rel
        if not path.is_file():
            raise ValueError(f"{path} is missing (listed in {marker}): the directory is incomplete; re-save it")
        if path.stat().st_size != rec["bytes"] or (full and file_digest(path) != rec[HASH]):
            raise ValueError(
                f"{path} does not match the checksum recorded in {marker}: the file is corrupt or "
                "truncated, or was changed after saving; re-create the directory from its source"
            )


def verify_manifest(root: str | os.PathLike[str]) -> None:
    """Check the files listed in `root`/rankwise_manifest.json, when there is one (after `recover`
    puts back a copy that a killed publish left renamed away)."""
    recover(root)
    path = Path(root) / MANIFEST
    if path.is_file():
        manifest = read_json(path)
        verify_files(root, manifest.get("files") if isinstance(manifest, dict) else None, marker=MANIFEST)


# ----------------------------------------------------------------------------- outputs
def check_output(
    target: str | os.PathLike[str],
    *,
    sources: Iterable[str | os.PathLike[str] | None] = (),
    flag: str = "the output",
) -> Path:
    """Refuse, before any work, an output directory that cannot be written or would clobber input.

    Checks: `target` is not a file and no path component above it is a file; it is not one of
    `sources`, inside one, or above one; its first existing ancestor is writable.

    Raises:
        ValueError: naming the problem and the fix.
    """
    target = Path(target)
    real = Path(os.path.realpath(target))
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        s = Path(os.path.realpath(src))
        if real == s or s in real.parents:
            raise ValueError(f"{flag} {target} is the input {src} or inside it: writing there would destroy "
                             "the input; choose another directory")
        if real in s.parents:
            raise ValueError(f"{flag} {target} contains the input {src}: replacing it would destroy the "
                             "input; choose another directory")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {target} is a file, not a directory: choose a directory path")
    probe = real
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {target} is under {probe}, which is a file: choose a directory path")
    if not _writable(probe):
        raise ValueError(f"cannot write {flag} {target}: {probe} is not writable (permission denied or a "
                         "read-only file system); choose a writable directory")
    return target


def _writable(directory: Path) -> bool:
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:  # root passes os.access; a read-only mount or /proc still refuses
        fd, name = tempfile.mkstemp(prefix=f".rankwise-probe-{os.getpid()}-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _sibling(target: Path, role: str) -> Path:
    return target.parent / f".{target.name}.rankwise-{role}-{os.getpid()}-{secrets.token_hex(4)}"


def recover_all(parent: str | os.PathLike[str]) -> None:
    """`recover` every name in `parent` that a killed writer left siblings of."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    names = {m["name"] for e in parent.iterdir() if (m := _SIBLING.match(e.name))}
    for name in sorted(names):
        recover(parent / name)


def recover(target: str | os.PathLike[str]) -> None:
    """Finish or undo what a killed `publish_dir` / `remove_dir` left beside `target` (writers
    of live processes are left alone): restore the old copy when `target` is missing (killed
    between the two renames), carry entries over, delete temporaries and half-deleted copies.
    Cheap when there is nothing to do."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for folder in (target.parent, target):  # writability probes of killed processes
        for probe in folder.glob(".rankwise-probe-*") if folder.is_dir() else ():
            pid = probe.name.split("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                probe.unlink(missing_ok=True)
    stale = []
    for entry in target.parent.glob(f".{glob.escape(target.name)}.rankwise-*"):
        m = _SIBLING.match(entry.name)
        if m and m["name"] == target.name and not _alive(int(m["pid"])):
            stale.append((m["role"], entry))
    for role, entry in sorted(stale, key=lambda x: x[0] in ("tmp", "trash")):  # old copies first
        if role in ("old", "gone") and not target.exists():
            os.rename(entry, target)
            logger.warning("restored %s from an interrupted write", target)
            continue
        if role == "old" and entry.is_dir():
            _carry(entry, target)
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _carry(old: Path, new: Path) -> None:
    """Move the entries of `old` that `new` lacks into `new` (files the writer did not replace)."""
    for entry in old.iterdir():
        if not (new / entry.name).exists() and not _SIBLING.match(entry.name):
            os.rename(entry, new / entry.name)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (files written by atomic_path already are;
    tokenizers and Hugging Face writers are not)."""
    for path in [*root.rglob("*"), root]:
        _fsync_dir(path)


@contextlib.contextmanager
def publish_dir(
    target: str | os.PathLike[str],
    *,
    merge: bool = True,
    verify: Callable[[Path], None] | None = None,
    sources: Iterable[str | os.PathLike[str] | None] = (),
) -> Iterator[Path]:
    """Build a directory in a temporary sibling of `target` and publish it by one rename.

    Yields the temporary directory to fill. When the block ends, `verify(tmp)` runs (when
    given), the files are fsynced, an existing `target` is renamed away, the temporary is renamed
    onto `target`, and only then is the old copy deleted. With `merge`, entries of the old copy
    that the new one lacks (e.g. files a user or another stage put there) are moved into it, as a
    write into an existing directory would keep them. An exception, or a kill, leaves `target`
    as it was (the next call, or `recover`, cleans up).

    Raises:
        ValueError: `target` is a file, under a file, not writable, or clobbers one of `sources`.
    """
    target = Path(target)
    check_output(target, sources=sources)
    if target.is_symlink():  # publish where the link points; the link itself stays
        target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir(mode=default_mode(directory=True))
    tmp.chmod(default_mode(directory=True))
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = _sibling(target, "old" if merge else "gone")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            if merge and old.is_dir():
                _carry(old, target)
            shutil.rmtree(old)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete a directory so that no reader ever sees half of it: rename it away, then delete."""
    path = Path(path)
    if not path.exists():
        return
    trash = _sibling(path, "trash")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
