"""Atomic, pickle-free fine-tuning checkpoints for bit-exact resume.

One directory per checkpoint, ``OUT/checkpoints/step-000120/``:

    adapter/              the adapters (`rankwise.adapt.save_adapter`: safetensors + json);
                          methods, configs, data-chosen ranks and frozen buffers included
    trainable.safetensors the other trainable tensors (the fortunes classification head)
    state.safetensors     optimizer moments, torch's RNG state (uint8), ...
    state.json            format, step, the run's config, the structure around those tensors
                          (optimizer param groups, LR-scheduler state, rule step, history)

Nothing is pickled and nothing is read with ``torch.load`` (structure <-> JSON through
`rankwise.train.checkpoint.flatten_state`). The directory is written under a temporary name and
renamed into place (state.json last), so a killed run never leaves a half checkpoint that
`latest_checkpoint` would pick; checkpoints beyond `keep` are removed afterwards.

Resume rebuilds the *base* model, loads the saved adapters onto it (`load_adapter`: no
re-initialisation, so data-driven inits are not recomputed), the trainable extras, optimizer,
scheduler, the rules' state (step and per-layer state such as AdaLoRA's importance EMAs) and the RNG, then continues from the saved step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.adapt import adapter_layers, load_adapter, save_adapter
from rankwise.finetune.config import FinetuneConfig
from rankwise.io import load_tensors, save_tensors, write_json
from rankwise.train import dist
from rankwise.train.checkpoint import (
    checkpoint_dirs,
    checkpoint_to_resume,
    flatten_state,
    get_rng_state,
    latest_checkpoint,
    read_checkpoint_meta,
    set_rng_state,
    unflatten_state,
    write_checkpoint_dir,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "checkpoint_dirs",
    "checkpoint_to_resume",
    "extra_trainable",
    "latest_checkpoint",
    "load_into",
    "read_meta",
    "save",
]

FORMAT = "rankwise.finetune-checkpoint"
VERSION = 1


def _unwrap(obj: Any) -> Any:
    """Accelerate's AcceleratedOptimizer / AcceleratedScheduler hold the real one in an attr."""
    for attr in ("optimizer", "scheduler"):
        inner = getattr(obj, attr, None)
        if inner is not None and type(obj).__module__.startswith("accelerate"):
            return inner
    return obj


def extra_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the adapters (e.g. a classification head), by name."""
    inside = tuple(name + "." for name in adapter_layers(model))
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(inside)}


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """state.json of a checkpoint (format- and version-checked)."""
    return read_checkpoint_meta(path, fmt=FORMAT, version=VERSION, kind="fine-tuning")


def check_compatible(meta: dict[str, Any], config: FinetuneConfig, path: Path) -> None:
    """Raise ValueError naming every setting that differs from the checkpoint's."""
    saved = FinetuneConfig.from_dict(meta["config"])
    diff = saved.differences(config)
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{path} was written with different settings ({shown}): resume with the "
                         "checkpoint's settings, or start this run in a new --out directory")


def save(
    out: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    rules: Any,
    config: FinetuneConfig,
    history: dict[str, Any],
    keep: int = 2,
    rng_ranks: list[torch.Tensor] | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out/checkpoints/step-{step:06d}`` atomically; keep the newest `keep`.

    `rng_ranks`: every process's torch RNG state in a multi-process run (rankwise.train.fsdp.StateAccess),
    so each rank resumes its own dropout stream. `extras`: the trainable tensors outside the
    adapters when they are not the model's own (gathered from FSDP2 shards)."""
    state = {
        "optimizer": _unwrap(optimizer).state_dict(),
        "scheduler": _unwrap(scheduler).state_dict(),
        "rng": get_rng_state(),
        "rules": rules.state_dict(),
        "history": history,
    }
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    tree, tensors = flatten_state(state)
    meta = {"format": FORMAT, "version": VERSION, "step": int(step), "method": config.method,
            "config": config.to_dict(), "state": tree}

    def fill(tmp: Path) -> None:
        if adapter_layers(model):  # full fine-tuning has none: every weight is an extra
            save_adapter(model, tmp / "adapter")
        others = extras if extras is not None else {
            n: p.detach() for n, p in extra_trainable(model).items()}
        save_tensors(tmp / "trainable.safetensors", others)
        save_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", meta)  # last: marks the checkpoint complete

    return write_checkpoint_dir(out, step, fill, keep=keep)


def load_adapters(path: str | os.PathLike[str], model: nn.Module,
                  extras: list[str]) -> None:
    """Put the checkpoint's adapters on the (unadapted) `model` and make `extras` trainable."""
    if (Path(path) / "adapter").is_dir():
        load_adapter(model, Path(path) / "adapter", trainable=True)
    params = dict(model.named_parameters())
    saved = load_tensors(Path(path) / "trainable.safetensors")
    if sorted(saved) != sorted(extras):
        raise ValueError(f"{path}: the checkpoint's trainable extras {sorted(saved)} differ from "
                         f"this model's {sorted(extras)}: resume with the same task and model")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
            params[name].requires_grad_(True)


def load_into(path: str | os.PathLike[str], *, optimizer: Any, scheduler: Any,
              rules: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler, rules state and RNG; returns {"step", "history"}."""
    path = Path(path)
    meta = read_meta(path)
    state = unflatten_state(meta["state"], load_tensors(path / "state.safetensors"))
    opt = _unwrap(optimizer)
    loaded = state["optimizer"]
    for saved, current in zip(loaded["param_groups"], opt.param_groups, strict=False):
        for key, value in current.items():  # JSON lists back to the optimizer's tuples (betas)
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    opt.load_state_dict(loaded)
    _unwrap(scheduler).load_state_dict(state["scheduler"])
    rules.load_state_dict(state["rules"])  # step + per-layer rule state (AdaLoRA EMAs, ...)
    set_rng_state(state["rng"])
    ranks = state.get("rng_ranks")
    if dist.active() and ranks is not None and len(ranks) == dist.world_size():
        torch.set_rng_state(ranks[dist.rank()].to(torch.uint8))
    return {"step": int(meta["step"]), "history": state["history"]}
