"""Which head a model carries, and one checked offline ``from_pretrained`` per task.

A task is "causal-lm" (next-token logits), "encoder" (a bare backbone for hidden states) or
"sequence-classification" (a backbone plus a classification head); it is read from a model's
class name or from the ``architectures`` recorded in a directory's config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_TASKS = ("causal-lm", "encoder", "sequence-classification")


class IncompleteCheckpointError(ValueError):
    """A model directory whose weights file lacks some of the model's parameters."""


def model_kind(model: torch.nn.Module) -> str:
    """Return "causal-lm", "sequence-classification" or "encoder", from the class name."""
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "causal-lm"
    if cls.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return "encoder"


def _task_from_config(directory: Path | str) -> str:
    """Pick the task from config.json's `architectures` (a hub id defers to AutoConfig)."""
    from transformers import AutoConfig

    from rankwise.compress.hf_guard import read_config  # a compressed dir's guarded config.json

    if Path(directory).is_dir():
        config = read_config(directory)
    else:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    return "encoder"


def _from_pretrained(directory: Path | str, task: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """One offline `from_pretrained`; ValueError when weights are missing (a corrupt dir)."""
    import transformers

    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[task]
    model, info = auto.from_pretrained(
        str(directory), dtype=dtype, local_files_only=True, output_loading_info=True, **kwargs
    )
    missing = list(info.get("missing_keys", []))
    if task == "sequence-classification":  # a new head is expected; a missing backbone is not
        prefix = f"{model.base_model_prefix}."
        missing = [k for k in missing if k.startswith(prefix)]
    if missing:
        raise IncompleteCheckpointError(
            f"{directory} is missing weights for {len(missing)} parameters (e.g. {missing[0]}); "
            "the checkpoint is incomplete: re-create it"
        )
    return model.eval()
