"""`FinetuneConfig`: everything that defines an adapter fine-tuning run, validated up front.

Fields are JSON values, so a checkpoint stores the config and a resumed run compares it field by
field (`differences`); only the run-control fields (`RUN_CONTROL_FIELDS`) may change on resume.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from rankwise.config import Config, option

__all__ = ["FULL", "RUN_CONTROL_FIELDS", "TASKS", "FinetuneConfig"]

#: the method name of full fine-tuning (every weight trains, no adapter)
FULL = "full"

#: task -> (metric, default target modules per model family, default seq_len, default lr)
TASKS: dict[str, dict[str, Any]] = {
    "fortunes": {"metric": "accuracy", "seq_len": 64, "lr": 1e-3, "batch_size": 16},
    "python-docs": {"metric": "perplexity", "seq_len": 128, "lr": 5e-4, "batch_size": 4},
}

# Fields that steer how a run is watched and stored, not its trajectory.
RUN_CONTROL_FIELDS = frozenset(
    {"out", "save_every", "keep_checkpoints", "stop_after", "eval_every", "initial_eval",
     "progress", "log_dir", "fsdp"}
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
class FinetuneConfig(Config):
    """One fine-tuning run of a `rankwise.adapt` method on an embedded task.

    Every field carries its help text (`option`); `rankwise finetune`'s flags and defaults are
    generated from them. fortunes is topic classification (encoder + mean pooling + a trainable
    Linear head, metric test accuracy); python-docs is causal-LM domain adaptation (metric
    validation perplexity). Run-control fields (RUN_CONTROL_FIELDS) may change on resume.
    """

    # model and task
    model: str = option(help="bundled model name (minilm-l6, smollm2-135m) or a local HF dir",
                        cli=False)
    task: str = option(help="fortunes (topic classification) or python-docs (causal LM)",
                       choices=tuple(TASKS))
    method: str = option("lora", "adapter method (rankwise.adapt.list_methods()), or full "
                         "(every weight trains; no adapter)")
    rank: int = option(8, "adapter rank r (full: the optimizer preset's projection rank)")
    target_modules: list[str] | str | None = option(
        None, "layers to adapt (PEFT vocabulary: names, suffixes, a regex, all-linear; None: "
        "the attention query and value projections)", cli=False)
    method_args: dict[str, Any] = option(help="method options (--arg KEY=VALUE)", cli=False,
                                         default_factory=dict)
    # schedule
    steps: int = option(100, "optimizer updates")
    batch_size: int | None = option(
        None, "rows per update, the global batch split over processes (None: fortunes 16, "
        "python-docs 4)")
    seq_len: int | None = option(None, "tokens per row (None: fortunes 64, python-docs 128)")
    lr: float | None = option(None, "peak learning rate (None: fortunes 1e-3, python-docs 5e-4)")
    head_lr: float | None = option(
        None, "fortunes: learning rate of the classification head (None: lr)")
    warmup_steps: int | None = option(
        None, "linear warmup steps (None: 10%% of steps), then linear decay to 0")
    weight_decay: float = option(0.0, "AdamW weight decay")
    optimizer: str = option("adamw", "adamw (torch AdamW) or a rankwise.optim preset "
                            "(galore_adamw, fira, ...) over the trainable tensors")
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)")
    # data size
    train_tokens: int = option(131_072, "python-docs train tokens used (a prefix of the split)")
    eval_tokens: int = option(4096, "python-docs validation tokens scored")
    eval_samples: int | None = option(None, "fortunes test texts scored (None: all 463)")
    seed: int = option(0, "adapter init, head init, dropout, data order")
    # run control
    out: str | None = option(None, "output directory (checkpoints, adapter, result.json)")
    save_every: int | None = option(None, "checkpoint period in steps (None: only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints stay on disk")
    stop_after: int | None = option(
        None, "stop after this step as if interrupted (continue with --resume)")
    eval_every: int | None = option(None, "evaluation period (None: steps / 5)")
    initial_eval: bool = option(True, "score the model before training too")
    log_dir: str | None = option(None, "TensorBoard directory (loss, lr, tokens/s, metric)")
    fsdp: bool = option(False, "method full under a launcher: shard weights, gradients and "
                        "optimizer state with FSDP2")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):  # JSON keeps lists: compare like with like
            object.__setattr__(self, "target_modules", list(self.target_modules))
        super().__post_init__()

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose one of {sorted(TASKS)}")
        super().validate()
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
        if self.fsdp and self.method != FULL:
            raise ValueError(f"fsdp shards full fine-tuning (method {FULL!r}); adapters are small "
                             f"and train replicated: drop --fsdp for method {self.method!r}")
        if self.optimizer != "adamw":
            from rankwise.optim import PRESETS

            if self.optimizer not in PRESETS:
                raise ValueError(f"unknown optimizer {self.optimizer!r}: choose adamw or one of "
                                 f"{sorted(PRESETS)}")
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
    @classmethod
    def from_dict(cls, values: Any) -> FinetuneConfig:
        """Build from saved values; unknown keys raise ValueError naming the known ones."""
        try:
            return super().from_dict(values)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def differences(self, other: FinetuneConfig) -> dict[str, tuple[Any, Any]]:
        """Fields (other than run control) whose values differ: {name: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in RUN_CONTROL_FIELDS and a[k] != b[k]}
