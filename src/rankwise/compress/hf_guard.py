"""Keep plain `transformers` from loading a compressed directory as a broken dense model.

A directory written by `save_compressed` holds a stock architecture's config.json next to
factorised tensors ({fqn}.A.weight, {fqn}.B.weight, ...). Left as is, `AutoModelForCausalLM.
from_pretrained(DIR)` builds the dense architecture, reports every factorised weight as missing,
initialises it at random and returns a model that generates noise without raising.

The guard makes that load fail loudly instead, with the fix in the message. transformers runs
no code of ours when it reads config.json (and `trust_remote_code` would make users run files
from the directory), so the only channel for a message is a value it echoes: `model_type`.
`guard_config` replaces it with `REFUSAL` (a string naming `rankwise.load_model(DIR)`) and keeps
the real type under `ORIGINAL_KEY`; transformers then refuses with "The checkpoint you are
trying to load has model type `<REFUSAL>` but Transformers does not recognize this
architecture". `read_config` undoes the swap for rankwise's own loader.

A directory without factorised or compensated layers (e.g. `export_peft`'s dense base) is a
standard checkpoint and is left loadable by plain transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ORIGINAL_KEY", "REFUSAL", "guard_config", "is_guarded", "read_config", "unguard_config"]

ORIGINAL_KEY = "rankwise_model_type"
REFUSAL = (
    "rankwise-compressed (factorised weights that plain transformers would load as random): "
    "load this directory with rankwise.load_model(DIR), or write a standard checkpoint with: "
    "rankwise export DIR --format dense"
)


def guard_config(config: dict[str, Any], layers: dict[str, Any]) -> dict[str, Any]:
    """Return config.json's dict with `model_type` swapped for `REFUSAL` when `layers` is not empty.

    Args:
        config: the model's config as a dict (what `save_compressed` writes to config.json).
        layers: the compressed layers `save_compressed` records; none means a dense checkpoint.
    """
    if not layers or is_guarded(config):
        return dict(config)
    if "model_type" not in config:
        raise ValueError("the model's config has no model_type: save_compressed needs a "
                         "Hugging Face config to record the architecture")
    guarded = dict(config)
    guarded[ORIGINAL_KEY] = guarded["model_type"]
    guarded["model_type"] = REFUSAL
    return guarded


def is_guarded(config: dict[str, Any]) -> bool:
    """True when config.json's dict carries the guard (its real model_type is stored aside)."""
    return ORIGINAL_KEY in config


def unguard_config(config: dict[str, Any]) -> dict[str, Any]:
    """Undo `guard_config`: the dict with its real model_type, as the stock class expects it."""
    plain = dict(config)
    if ORIGINAL_KEY in plain:
        plain["model_type"] = plain.pop(ORIGINAL_KEY)
    return plain


def read_config(directory: str | os.PathLike[str]) -> Any:
    """The transformers config object of a compressed directory, guarded or not (offline)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    path = Path(directory) / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not is_guarded(raw):  # written before the guard existed: a stock config.json
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    plain = unguard_config(raw)
    model_type = plain["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{path} records model type {model_type!r}, which this transformers does not know: "
            "upgrade transformers"
        )
    plain.pop("model_type")
    return CONFIG_MAPPING[model_type].from_dict(plain)
