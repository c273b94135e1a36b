"""ShrinkConfig: every setting of `rankwise.pipeline.shrink`, validated before any work starts.

Settings are grouped by the stage that first reads them, so that a resumed run can tell which
finished stages are still valid: a stage is reused only when its own settings and those of
every earlier stage are unchanged (`stage_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from rankwise.config import Config, option

__all__ = ["CALIBRATION_SOURCES", "HEAL_DATA", "HEAL_METHODS", "STAGES", "ShrinkConfig"]

STAGES: tuple[str, ...] = ("compress", "compensate", "heal", "export")
# What healing reads (rankwise.pipeline.distill): "text" (the user's text, or the python-docs
# train split), "mixture", "teacher" (text sampled from the dense model, data-free), "auto" (the
# default) = the user's text when one is given, else the mixture: at equal compute the causal-LM
# loss on the mixture kept the held-out domain best (benchmarks/results/pipeline_generalise.md).
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
    "heal": ("heal_method", "heal_minutes", "heal_clock", "heal_steps", "heal_lr", "heal_batch_size",
             "heal_seq_len", "lora_rank", "distill_alpha", "heal_data"),
    "export": ("eval_tokens", "latency"),
}


def _heal_methods() -> tuple[str, ...]:
    """Names of ``registry("healing")`` (registered by rankwise.pipeline.healing)."""
    from rankwise.registry import registry

    return tuple(registry("healing").names())


HEAL_METHODS: tuple[str, ...] = _heal_methods()


@dataclass(frozen=True, kw_only=True)
class ShrinkConfig(Config):
    """Settings of one `shrink` run (see `shrink` for their meaning); frozen: use `replace`."""

    model: str = option("", "model name or directory (filled in from the model when empty)", cli=False)
    ratio: float = option(0.2, "fraction of the targeted layers' parameters to remove, in (0, 1)")
    method: str = option("auto", "compression method (auto: measure the candidates on held-out data)")
    allocation: str | None = option(None, "rank allocation (None: measured, or the method's own)")
    calibration: Any = option(
        "mixture", "calibration text: mixture (python-docs + fortunes, measured best on held-out "
        "domains), teacher (sampled from the dense model), a corpus name or a file")
    n_samples: int = option(32, "calibration sequences")
    seq_len: int = option(256, "calibration sequence length")
    seed: int = option(0, "seed of calibration sampling and healing")
    target_modules: Any = option(None, "modules to compress (None: every block linear)", cli=False)
    text: Any = option(None, "healing text: corpus name, .txt/.jsonl file, folder or glob "
                             "(None: the python-docs train split)")
    select_tokens: int = option(4096, "held-out tokens used to choose between candidates")
    compensation: bool = option(True, "try EoRA compensation inside the budget")
    compensation_ranks: tuple[int, ...] = option((16, 32), "EoRA ranks k to try")
    heal_method: str = option(
        "lowrank", "lowrank: the factors on the causal-LM loss; distill: the factors trained against "
        "the dense model (KL + feature MSE); lora: LoRA on the factors, merged; none",
        choices=HEAL_METHODS)
    heal_data: str = option(
        "auto", "healing text: auto (--text if given, else mixture), text (--text or python-docs), "
        "mixture (python-docs + fortunes: measured best on held-out domains), teacher (sampled from the "
        "dense model, data-free)",
        choices=HEAL_DATA)
    teacher_samples: int = option(128, "sequences of 256 tokens sampled from the dense model for teacher text")
    heal_minutes: float = option(15.0, "budget of the healing fine-tune in minutes (0 skips), on heal_clock")
    heal_clock: str = option(
        "wall", "what heal_minutes counts: wall (clock time) or cpu (this process's CPU time: the same "
        "compute whatever else runs on the machine, for comparing runs on a shared machine)",
        choices=("wall", "cpu"))
    heal_steps: int | None = option(None, "also stop healing after this many steps (None: time budget only)")
    heal_lr: float | None = option(None, "healing learning rate (None: the method's)")
    heal_batch_size: int = option(4, "healing batch size (sequences)")
    heal_seq_len: int = option(256, "healing sequence length")
    lora_rank: int = option(16, "LoRA rank for heal_method=lora")
    distill_alpha: float = option(1.0, "weight of the feature MSE in distillation healing")
    eval_tokens: int = option(8192, "test-split tokens for the report")
    latency: bool = option(True, "measure latency against the dense model at export")
    extra: dict[str, Any] = option(default_factory=dict, help="free-form values kept with the run",
                                   cli=False)

    def __post_init__(self) -> None:
        if not isinstance(self.compensation_ranks, str):
            try:
                ranks = tuple(int(k) for k in self.compensation_ranks)
            except (TypeError, ValueError):
                ranks = None
            if ranks is not None:
                object.__setattr__(self, "compensation_ranks", ranks)
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError naming a bad setting and its fix, before any work starts."""
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0 < self.ratio < 1:
            raise ValueError(f"ratio {self.ratio!r} is outside (0, 1): pass the fraction of parameters "
                             "to remove, e.g. 0.2")
        super().validate()  # heal_method, heal_data choices
        if not isinstance(self.heal_minutes, int | float) or not math.isfinite(self.heal_minutes) \
                or self.heal_minutes < 0:
            raise ValueError(f"heal_minutes must be a number >= 0, got {self.heal_minutes!r} "
                             "(0 or heal_method='none' skips healing)")
        if self.heal_steps is not None and self.heal_steps < 0:
            raise ValueError(f"heal_steps must be >= 0 or None, got {self.heal_steps}")
        for name in ("n_samples", "seq_len", "heal_batch_size", "heal_seq_len", "lora_rank",
                     "select_tokens", "eval_tokens", "teacher_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        ranks = self.compensation_ranks
        if not isinstance(ranks, tuple) or any(k < 1 for k in ranks):
            raise ValueError(f"compensation_ranks must be positive ints, got {self.compensation_ranks!r}")
        self._validate_method()

    def _validate_method(self) -> None:
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
        return "text" if self.text is not None else "mixture"

    @property
    def heals(self) -> bool:
        return self.heal_method != "none" and (self.heal_minutes > 0 or bool(self.heal_steps))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; non-JSON ones (input_ids, objects) as their repr."""
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
