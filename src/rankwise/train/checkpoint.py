"""Atomic, pickle-free pretraining checkpoints with bit-exact resume.

A checkpoint is one directory `OUT/checkpoints/step-000120/`:

    model.safetensors   the model's state_dict (a tied tensor is stored under each of its names)
    state.safetensors   every other tensor: optimizer moments and projectors, schedule RNGs,
                        torch's RNG state (uint8), named by their path ("optimizer/state/3/exp_avg")
    state.json          the structure around those tensors (optimizer param groups, step counters,
                        schedule queues), the method, the step, the run's config,
                        the data position and the history so far

Nothing is pickled and nothing is read with torch.load: the structure is JSON in which a tensor
is the placeholder {"__tensor__": name}, a tuple {"__tuple__": [...]} and a dict with non-string
keys (the optimizer's int parameter ids) {"__items__": [[key, value], ...]}, so
`unflatten_state(*flatten_state(x))` rebuilds `x` with the same types.

    manifest.json       written last: SHA-256 and size of every other file (state.json included,
                        so a changed step or config is caught), checked by read_checkpoint_meta

The directory is built under a temporary name and published by one rename
(rankwise.io.publish_dir), so a crash never leaves a half checkpoint that `latest_checkpoint`
would pick up. Older checkpoints beyond `keep` are renamed away before they are deleted, and
`checkpoint_dirs` only counts a directory whose manifest lists files that are all there, so an
interrupted deletion never passes for a complete checkpoint: `--resume` takes the previous one.

`load_checkpoint` refuses a checkpoint written by another method or another configuration
(run-control fields such as `out` or `save_every` excepted) with a ValueError saying what
differs and how to proceed. `export_dense` writes a finished run as a plain dense Hugging
Face model directory (every method folded back into nn.Linear).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.io import (
    digest_files,
    load_tensors,
    publish_dir,
    read_json,
    recover_all,
    remove_dir,
    save_tensors,
    verify_files,
    write_json,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT", "checkpoint_dirs", "export_dense", "flatten_state", "get_rng_state",
    "checkpoint_to_resume", "latest_checkpoint", "load_checkpoint", "read_checkpoint_meta",
    "save_checkpoint", "set_rng_state", "unflatten_state", "write_checkpoint_dir"
]

FORMAT = "rankwise.pretrain-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
_verified: dict[str, tuple[Any, ...]] = {}  # path -> file stats at the last full check


# ----------------------------------------------------------------------------- structure <-> JSON
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, numbers, str, None, tensors) into JSON + tensors.

    Returns:
        (tree, tensors): `tree` is JSON-able with {"__tensor__": name} placeholders; `tensors`
        maps those names to detached CPU clones.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path.lstrip("/") or "tensor"
            while name in tensors:
                name += "~"
            tensors[name] = x.detach().to("cpu").clone()
            return {"__tensor__": name}
        if isinstance(x, bool) or x is None or isinstance(x, str):
            return x
        if isinstance(x, int | float):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}/{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, f"{path}/key"), enc(v, f"{path}/{k}")]
                                  for k, v in x.items()]}
        raise TypeError(
            f"cannot store {type(x).__name__} at {path.lstrip('/') or '<root>'} in a checkpoint: "
            "states must hold tensors, numbers, strings, None, lists, tuples and dicts only"
        )

    return enc(obj, prefix.rstrip("/")), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            name = tree["__tensor__"]
            if name not in tensors:
                raise ValueError(f"checkpoint is missing tensor {name!r}: it is corrupt")
            return tensors[name]
        if set(tree) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if set(tree) == {"__items__"}:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors)
                    for k, v in tree["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    return tree


# ----------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """torch's CPU RNG (uint8 tensor) and CUDA's when in use (the loop draws from nothing else:
    schedules keep their own generators, data order is a function of the step)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- paths
def checkpoint_dirs(out: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """[(step, directory)] of the complete checkpoints under `out`/checkpoints, oldest first.

    Complete: its manifest is readable and every file it lists is there (a directory from before
    manifests: its state.json is there). Bytes are checked when it is read (read_checkpoint_meta).
    """
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    recover_all(root)  # a re-save of a step killed between its renames: put the old copy back
    found = [(int(m.group(1)), c) for c in root.iterdir() if (m := _STEP_DIR.match(c.name)) and _complete(c)]
    return sorted(found)


def _complete(path: Path) -> bool:
    if not (path / MANIFEST).is_file():
        return (path / "state.json").is_file()  # written before manifests existed
    try:
        missing = [f for f in read_json(path / MANIFEST)["files"] if not (path / f).is_file()]
    except (ValueError, OSError, KeyError, TypeError):
        missing = ["manifest.json (unreadable)"]
    if missing:
        logger.warning("skipping incomplete checkpoint %s (%s is missing)", path, missing[0])
    return not missing


def latest_checkpoint(out: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory under `out`, or None."""
    found = checkpoint_dirs(out)
    return found[-1][1] if found else None


def checkpoint_to_resume(out: str | os.PathLike[str] | None, resume: bool, *, resume_flag: str = "resume",
                         out_flag: str = "out") -> Path | None:
    """The checkpoint a run resumes from (None for a fresh run), refusing the two mistakes that
    would lose work: resuming with nothing to resume, and a fresh run over existing checkpoints.
    `resume_flag` / `out_flag` name the options in the messages (CLI or Python spelling)."""
    if out is None:
        if resume:
            raise ValueError(f"{resume_flag} needs {out_flag}, the directory holding the checkpoints")
        return None
    found = latest_checkpoint(out)
    if resume and found is None:
        raise ValueError(f"no checkpoint in {out} to resume from: run without {resume_flag}")
    if not resume and found is not None:
        raise ValueError(f"{out} already holds a checkpoint ({found.name}): add {resume_flag} to "
                         f"continue it, or choose a new {out_flag} directory")
    return found


def read_checkpoint_meta(
    path: str | os.PathLike[str], *, fmt: str = FORMAT, version: int = VERSION, kind: str = "pretraining"
) -> dict[str, Any]:
    """state.json of a checkpoint directory, checked for format `fmt` and `version`, after every
    file's checksum is checked against the manifest (a changed byte raises ValueError naming it)."""
    path = Path(path)
    _verify(path)
    meta = read_json(path / "state.json")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"{path} is not a rankwise {kind} checkpoint (no {fmt} marker)")
    if meta.get("version") != version:
        raise ValueError(f"{path} has checkpoint version {meta.get('version')}, this rankwise "
                         f"reads version {version}: resume with the rankwise that wrote it")
    if not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool) or meta["step"] < 0:
        raise ValueError(f"{path}/state.json has step {meta.get('step')!r}, not an int >= 0: the file is corrupt")
    return meta


def _verify(path: Path) -> None:
    """Full checksum check (once per process while the files are unchanged; none before manifests)."""
    if not (path / MANIFEST).is_file():
        return
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if _verified.get(str(path)) == stats:
        return
    manifest = read_json(path / MANIFEST)
    try:
        verify_files(path, manifest.get("files") if isinstance(manifest, dict) else None, marker=MANIFEST)
    except ValueError as exc:
        raise ValueError(f"{exc} (checkpoint {path}: delete it to resume from the previous one)") from None
    _verified[str(path)] = stats


# ----------------------------------------------------------------------------- save
def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # clones: safetensors refuses tensors that share storage (the tied embedding / lm_head)
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    out: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedules: Any | None,
    config: Any,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write `out`/checkpoints/step-{step:06d} atomically; keep the newest `keep` checkpoints.

    Args:
        step: updates done.
        schedules: an object with state_dict() (rankwise.layers.Schedules) or None.
        config: a PretrainConfig (its to_dict() and method are stored).
        extra: JSON-able data of the caller (history, data position), tensors allowed.

    Returns:
        The checkpoint directory.
    """
    state = {
        "optimizer": optimizer.state_dict(),
        "schedules": schedules.state_dict() if schedules is not None else None,
        "rng": get_rng_state(),
        "extra": extra or {},
    }
    tree, tensors = flatten_state(state)
    meta = {"format": FORMAT, "version": VERSION, "method": config.method, "step": int(step),
            "config": config.to_dict(), "state": tree}

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", _model_tensors(model))
        save_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", meta)  # written last: marks the checkpoint complete

    return write_checkpoint_dir(out, step, fill, keep=keep)


def write_checkpoint_dir(
    out: str | os.PathLike[str], step: int, fill: Callable[[Path], None], *, keep: int = 2
) -> Path:
    """Create `out`/checkpoints/step-{step:06d} atomically and keep the newest `keep`.

    `fill(tmp)` writes the files into a temporary sibling directory (its last file should mark
    the checkpoint complete); the directory is renamed into place only when `fill` returns, so
    a crash leaves either the old checkpoints or the new one, never half of it.
    """
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    recover_all(root)  # what a killed save or deletion left behind
    final = root / f"step-{int(step):06d}"

    def verify(tmp: Path) -> None:
        verify_files(tmp, read_json(tmp / MANIFEST)["files"], marker=MANIFEST, full=False)

    with publish_dir(final, merge=False, verify=verify) as tmp:
        fill(tmp)
        write_json(tmp / MANIFEST, {"format": "rankwise-manifest", "files": digest_files(tmp)})
    for _, old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        remove_dir(old)  # renamed away first: never half a checkpoint under a step name
    for stale in root.glob(".tmp-step-*"):  # temporaries of rankwise versions before publish_dir
        shutil.rmtree(stale, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


# ----------------------------------------------------------------------------- load
def check_compatible(meta: dict[str, Any], config: Any, path: Path) -> None:
    """Raise ValueError when the checkpoint was written by another method or configuration."""
    saved_method = meta.get("method")
    if saved_method != config.method:
        raise ValueError(
            f"{path} was written by method {saved_method!r} but this run asks for "
            f"{config.method!r}: resume with --method {saved_method}, or start the "
            f"{config.method!r} run in a new output directory"
        )
    saved = type(config).from_dict(meta["config"])
    diff = saved.differences(config)
    if diff:
        shown = ", ".join(
            f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items())
        )
        raise ValueError(
            f"{path} was written with a different configuration ({shown}): resume with the "
            "checkpoint's settings, or start this run in a new output directory"
        )


def _restore_tuples(loaded: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """JSON keeps tuples via __tuple__; this also accepts lists where the optimizer has tuples."""
    for saved, current in zip(loaded["param_groups"], optimizer.param_groups, strict=False):
        for key, value in current.items():
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    return loaded


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedules: Any | None,
    config: Any,
) -> dict[str, Any]:
    """Load a checkpoint into freshly built `model`, `optimizer` and `schedules`, set the RNGs.

    The objects must be built exactly as in the run that wrote it (same config); a different
    method or configuration raises ValueError before anything is changed.

    Returns:
        {"step": int, "extra": the caller's extra dict}.
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    check_compatible(meta, config, path)
    model_state = load_tensors(path / "model.safetensors")
    tensors = load_tensors(path / "state.safetensors")
    state = unflatten_state(meta["state"], tensors)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the model does not match the checkpoint (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}): resume with the same method and model size"
        )
    optimizer.load_state_dict(_restore_tuples(state["optimizer"], optimizer))
    if (schedules is None) != (state["schedules"] is None):
        raise ValueError(f"{path}: schedule state does not match this run's method")
    if schedules is not None:
        schedules.load_state_dict(state["schedules"])
    set_rng_state(state["rng"])
    return {"step": int(meta["step"]), "extra": state["extra"]}


# ----------------------------------------------------------------------------- export
def export_dense(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    vocab_map: torch.Tensor | None = None,
) -> Path:
    """Fold the method back into dense nn.Linear layers (in place) and save a HF model dir.

    The tokenizer is saved alongside unless the vocabulary was limited (then
    vocab_map.safetensors maps model ids to tokenizer ids instead).
    """
    from rankwise.adapt import adapter_layers, merge_and_unload
    from rankwise.layers import to_dense_

    if adapter_layers(model):
        merge_and_unload(model)
    to_dense_(model)
    with publish_dir(directory, merge=False) as tmp:
        model.save_pretrained(tmp)
        if vocab_map is not None:
            save_tensors(tmp / "vocab_map.safetensors", {"vocab_map": vocab_map})
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
