"""ShrinkConfig: every setting of `rankwise.pipeline.shrink`, validated before any work starts.

Settings are grouped by the stage that first reads them, so that a resumed run can tell which
finished stages are still valid: a stage is reused only when its own settings and those of
every earlier stage are unchanged (`stage_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CALIBRATION_SOURCES", "HEAL_DATA", "HEAL_METHODS", "STAGES", "ShrinkConfig"]

STAGES: tuple[str, ...] = ("compress", "compensate", "heal", "export")
HEAL_METHODS: tuple[str, ...] = ("lora", "lowrank", "distill", "none")
# What healing reads (rankwise.pipeline.distill): "text" (default: the user's text, or the
# python-docs train split), "mixture", "teacher" (text sampled from the dense model, data-free),
# "auto" = the user's text when one is given, else teacher text.
HEAL_DATA: tuple[str, ...] = ("auto", "text", "mixture", "teacher")
# Calibration sources with a meaning of their own (anything else goes to rankwise.compress):
# "mixture" = equal shares of python-docs and fortunes windows, "teacher" = dense-model samples.
CALIBRATION_SOURCES: tuple[str, ...] = ("mixture", "teacher")

# Training-free candidates tried by method="auto": (method, allocation). Whitened SVD with its
# SVDs shared across allocations, plus SVD-LLM's closed-form update on the best allocation.
# On SmolLM2-135M at 20 % (python-docs validation, x dense): uniform 2.31, dynamic 2.31,
# welore 2.28, energy 2.79, budget 2.98: the last two are not worth their evaluation time.
AUTO_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("svd-llm", "uniform"), ("svd-llm", "welore"), ("svd-llm", "dynamic"),
)
AUTO_UPDATES: tuple[str, ...] = ("svd-llm-update",)

# Which settings each stage reads (a resumed stage is valid while these are unchanged).
_STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "compress": ("model", "ratio", "method", "allocation", "calibration", "n_samples", "seq_len",
                 "seed", "target_modules", "text", "select_tokens", "teacher_samples"),
    "compensate": ("compensation", "compensation_ranks"),
    "heal": ("heal_method", "heal_minutes", "heal_steps", "heal_lr", "heal_batch_size",
             "heal_seq_len", "lora_rank", "distill_alpha", "heal_data"),
    "export": ("eval_tokens", "latency"),
}


@dataclass
class ShrinkConfig:
    """Settings of one `shrink` run (see `shrink` for their meaning)."""

    model: str = ""
    ratio: float = 0.2
    method: str = "auto"
    allocation: str | None = None
    calibration: Any = "mixture"
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    target_modules: Any = None
    text: Any = None
    select_tokens: int = 4096
    compensation: bool = True
    compensation_ranks: tuple[int, ...] = (16, 32)
    heal_method: str = "lowrank"
    heal_data: str = "text"
    teacher_samples: int = 128
    heal_minutes: float = 15.0
    heal_steps: int | None = None
    heal_lr: float | None = None
    heal_batch_size: int = 4
    heal_seq_len: int = 256
    lora_rank: int = 16
    distill_alpha: float = 1.0
    eval_tokens: int = 8192
    latency: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0 < self.ratio < 1:
            raise ValueError(f"ratio {self.ratio!r} is outside (0, 1): pass the fraction of parameters "
                             "to remove, e.g. 0.2")
        if self.heal_method not in HEAL_METHODS:
            raise ValueError(f"heal_method must be one of {list(HEAL_METHODS)}, got {self.heal_method!r}")
        if not isinstance(self.heal_minutes, int | float) or not math.isfinite(self.heal_minutes) \
                or self.heal_minutes < 0:
            raise ValueError(f"heal_minutes must be a number >= 0, got {self.heal_minutes!r} "
                             "(0 or heal_method='none' skips healing)")
        if self.heal_steps is not None and self.heal_steps < 0:
            raise ValueError(f"heal_steps must be >= 0 or None, got {self.heal_steps}")
        if self.heal_data not in HEAL_DATA:
            raise ValueError(f"heal_data must be one of {list(HEAL_DATA)}, got {self.heal_data!r}")
        for name in ("n_samples", "seq_len", "heal_batch_size", "heal_seq_len", "lora_rank",
                     "select_tokens", "eval_tokens", "teacher_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        ranks = tuple(int(k) for k in self.compensation_ranks)
        if any(k < 1 for k in ranks):
            raise ValueError(f"compensation_ranks must be positive ints, got {self.compensation_ranks!r}")
        self.compensation_ranks = ranks
        if self.method != "auto":
            from rankwise.compress.presets import get_preset

            if get_preset(self.method).kind != "factorize":
                raise ValueError(f"method {self.method!r} is not a factorisation: choose 'auto' or one of "
                                 "svd-llm, svd-llm-update, svd-llm-seq, drank, welore, asvd, fwsvd, lord")
        if self.allocation is not None:
            from rankwise.compress.allocate import ALLOCATIONS

            if self.allocation not in ALLOCATIONS:
                raise ValueError(f"allocation must be one of {list(ALLOCATIONS)} or None, got {self.allocation!r}")

    @property
    def healing_source(self) -> str:
        """The healing text actually used: heal_data with "auto" resolved."""
        if self.heal_data != "auto":
            return self.heal_data
        return "text" if self.text is not None else "teacher"

    @property
    def heals(self) -> bool:
        return self.heal_method != "none" and (self.heal_minutes > 0 or bool(self.heal_steps))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=repr))

    def stage_fingerprint(self, stage: str) -> str:
        """Hash of the settings read by `stage` and every stage before it."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: one of {list(STAGES)}")
        d = self.to_dict()
        keys = [k for s in STAGES[: STAGES.index(stage) + 1] for k in _STAGE_KEYS[s]]
        blob = json.dumps({k: d[k] for k in keys}, sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def changed_since(self, stage: str, recorded: dict[str, Any]) -> list[str]:
        """Names of `stage`'s (cumulative) settings that differ from `recorded` (a to_dict())."""
        d = self.to_dict()
        keys = [k for s in STAGES[: STAGES.index(stage) + 1] for k in _STAGE_KEYS[s]]
        return [k for k in keys if d.get(k) != recorded.get(k)]
