"""`FinetuneConfig`: everything that defines an adapter fine-tuning run, validated up front.

Fields are JSON values, so a checkpoint stores the config and a resumed run compares it field by
field (`differences`); only the run-control fields (`RUN_CONTROL_FIELDS`) may change on resume.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RUN_CONTROL_FIELDS", "TASKS", "FinetuneConfig"]

#: task -> (metric, default target modules per model family, default seq_len, default lr)
TASKS: dict[str, dict[str, Any]] = {
    "fortunes": {"metric": "accuracy", "seq_len": 64, "lr": 1e-3, "batch_size": 16},
    "python-docs": {"metric": "perplexity", "seq_len": 128, "lr": 5e-4, "batch_size": 4},
}

# Fields that steer how a run is watched and stored, not its trajectory.
RUN_CONTROL_FIELDS = frozenset(
    {"out", "save_every", "keep_checkpoints", "stop_after", "eval_every", "initial_eval",
     "progress"}
)


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """One fine-tuning run of a `rankwise.adapt` method on an embedded task.

    Model and task:
        model: a bundled name ("minilm-l6", "smollm2-135m") or a local HF directory.
        task: "fortunes" (topic classification: encoder + mean pooling + a trainable Linear
            head, metric test accuracy) or "python-docs" (causal-LM domain adaptation, metric
            validation perplexity).
        method, rank, target_modules, method_args: passed to `rankwise.adapt.adapt_`
            (target_modules None: the attention query/value projections of the model family).
    Schedule:
        steps, batch_size, seq_len (None: task default), lr (None: task default), head_lr
        (the fortunes head's lr; None: lr, so methods with different lrs can share one),
        warmup_steps
        (None: 10 % of steps; linear decay to 0 afterwards, transformers' "linear" schedule),
        weight_decay, grad_clip (0 disables).
    Data size:
        train_tokens: python-docs train tokens packed into rows (a prefix of the split).
        eval_tokens: python-docs validation tokens scored; eval_samples: fortunes test texts
            scored (None: all 463).
    Run control (may change on resume):
        out (None: no files), save_every (None: only at the end), keep_checkpoints, stop_after
        (stop as if interrupted), eval_every (None: steps / 5), initial_eval (score the
        model before training too), progress.
        seed: adapter init, head init, dropout, data order.
    """

    model: str
    task: str
    method: str = "lora"
    rank: int = 8
    target_modules: list[str] | str | None = None
    method_args: dict[str, Any] = field(default_factory=dict)
    steps: int = 100
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_tokens: int = 131_072
    eval_tokens: int = 4096
    eval_samples: int | None = None
    seed: int = 0
    out: str | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    stop_after: int | None = None
    eval_every: int | None = None
    initial_eval: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):  # JSON keeps lists: compare like with like
            object.__setattr__(self, "target_modules", list(self.target_modules))
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose one of {sorted(TASKS)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) \
                or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}: e.g. --rank 8")
        for name in ("steps", "train_tokens", "eval_tokens", "keep_checkpoints"):
            _positive_int(name, getattr(self, name))
        for name in ("batch_size", "seq_len", "warmup_steps", "eval_samples", "save_every",
                     "stop_after", "eval_every"):
            if name == "warmup_steps" and self.warmup_steps == 0:
                continue
            _positive_int(name, getattr(self, name), allow_none=True)
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                                  or not math.isfinite(v) or v <= 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        _non_negative("weight_decay", self.weight_decay)
        _non_negative("grad_clip", self.grad_clip)
        if not isinstance(self.method_args, dict):
            raise ValueError(f"method_args must be a dict, got {type(self.method_args).__name__}")
        if "rank" in self.method_args:
            raise ValueError("give the rank with rank= (--rank), not in method_args (--arg)")
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")

    # ------------------------------------------------------------------ resolved defaults
    @property
    def resolved_lr(self) -> float:
        return float(self.lr if self.lr is not None else TASKS[self.task]["lr"])

    @property
    def resolved_head_lr(self) -> float:
        return float(self.head_lr) if self.head_lr is not None else self.resolved_lr

    @property
    def resolved_seq_len(self) -> int:
        return int(self.seq_len or TASKS[self.task]["seq_len"])

    @property
    def resolved_batch_size(self) -> int:
        return int(self.batch_size or TASKS[self.task]["batch_size"])

    @property
    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    @property
    def resolved_eval_every(self) -> int:
        return self.eval_every or max(1, self.steps // 5)

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig field(s) {unknown}")
        return cls(**values)

    def differences(self, other: FinetuneConfig) -> dict[str, tuple[Any, Any]]:
        """Fields (other than run control) whose values differ: {name: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in RUN_CONTROL_FIELDS and a[k] != b[k]}
