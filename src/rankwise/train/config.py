"""`PretrainConfig`: everything that defines a pretraining run, validated before any work.

A run is a tiny Llama (`rankwise.train.llama`) trained from scratch with one method:

| method | what changes (card in shared/methods/training.md) | rank | density | period |
|---|---|---|---|---|
| full | nothing: dense weights, torch AdamW | - | - | - |
| lora | frozen random W0 + (alpha/r) B A; embeddings and norms train | r | - | - |
| relora | lora + merge-and-restart every `period` steps, jagged LR (10) | r | - | restart |
| galore | dense weights, GaLore-AdamW on attn/MLP gradients (1) | r | - | projector refresh |
| fira | GaLore + Fira's scaled residual and limiter (3) | r | - | projector refresh |
| sltrain | (alpha/r) B A + S on a fixed random support (11) | r | of entries | - |
| lost | SVD split: rank-r part + channel-wise sparse part (12) | r | of channels | - |
| sst | U diag(sigma) V^T, r sampled singular-vector pairs (13) | r | - | resample |
| maestro | B A, ordered dropout + self-distillation + group lasso (14) | width | - | shrink |
| trp | dense W projected to its 0.99-energy rank + nuclear subgradient (15) | - | - | project |

Defaults that are ours (the papers train far longer): rank = hidden / 4 (GaLore's ratio for its
60M model), period = steps / 4 capped at the papers' values (ReLoRA 500, GaLore/Fira 200,
SST 100; TRP projects every step as the official code; Maestro shrinks every steps / 4), lr 3e-3
for every AdamW-trained method (SLTrain's scripts; short runs favour a high lr) and 1e-2 with
scale 0.25 for GaLore/Fira (their preset). Config fields are JSON values so a checkpoint can
store the config and a resumed run can compare it field by field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "METHODS",
    "RUN_CONTROL_FIELDS",
    "PretrainConfig",
]

METHODS: tuple[str, ...] = (
    "full", "lora", "relora", "galore", "fira", "sltrain", "lost", "sst", "maestro", "trp",
)
_RANKED = {"lora", "relora", "galore", "fira", "sltrain", "lost", "sst", "maestro"}
_DENSITY = {"sltrain": "weight entries S may hold", "lost": "channels kept in the sparse part"}
_PERIOD_CAP = {"relora": 500, "galore": 200, "fira": 200, "sst": 100, "maestro": None, "trp": None}
_OPTION_BAGS = ("layer_options", "schedule_options", "optimizer_options")

# Fields that steer only how a run is watched and stored, not the trajectory: a resumed run may
# change them (every other field must equal the checkpoint's).
RUN_CONTROL_FIELDS = frozenset(
    {"out", "save_every", "keep_checkpoints", "stop_after", "eval_every", "eval_tokens",
     "progress", "export"}
)


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _finite(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (strict and value == low)):
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be {rel} {low}, got {value}")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """One pretraining run (see the module table for the method column).

    Model and data:
        method: one of METHODS.
        size: a preset of rankwise.train.llama ("llama-10m", "llama-25m").
        model_overrides: LlamaConfig fields over the preset (e.g. hidden_size=32 in tests).
        tokenizer: name or path for rankwise.models.load_tokenizer (SmolLM2's by default).
        corpus: embedded corpus (train split for training, validation split for perplexity).
        vocab_limit: keep only the (vocab_limit - 1) most frequent train tokens, every other
            token becomes one shared id (None: the tokenizer's full vocabulary). The 49152-token
            embedding dominates a 10M model's compute; CPU benchmarks shrink it this way.
    Schedule:
        steps: optimizer updates; tokens = steps * batch_size * seq_len.
        seq_len, batch_size: tokens per row, rows per step.
        lr: peak LR (None: the method's default, module docstring).
        warmup_steps: linear warmup (None: 10 % of steps); then cosine to min_lr_ratio * lr.
        weight_decay, betas, grad_clip: AdamW / clipping settings (grad_clip 0 disables).
    Method:
        rank: r (None: hidden / 4; Maestro: full width). Must fit every target layer.
        density: SLTrain's fraction of entries / LOST's fraction of channels, in (0, 1)
            (None: the layer's default, 0.03 / 0.05).
        alpha: LoRA/ReLoRA/SLTrain scale numerator (None: 32).
        period: steps between the method's periodic actions (table; None: default).
        layer_options, schedule_options, optimizer_options: extra keyword arguments for the
            layer (convert_/adapt_), its LayerSchedule and rankwise.optim.create.
    Run control (may change on resume, RUN_CONTROL_FIELDS):
        out: directory for checkpoints, result.json and the exported model (None: no files).
        save_every: checkpoint period in steps (None: only at the end).
        keep_checkpoints: how many recent checkpoints stay on disk.
        stop_after: stop after this step as if interrupted (resume continues).
        eval_every: validation-perplexity period (None: steps / 10).
        eval_tokens: validation tokens scored (a fixed prefix of the split).
        progress: tqdm bar.
        export: write the trained model as a dense Hugging Face model to out/final.
        seed: model init, method init, data order.
    """

    method: str
    size: str = "llama-10m"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "smollm2-135m"
    corpus: str = "python-docs"
    vocab_limit: int | None = None
    steps: int = 1000
    seq_len: int = 256
    batch_size: int = 8
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    rank: int | None = None
    density: float | None = None
    alpha: float | None = None
    period: int | None = None
    layer_options: dict[str, Any] = field(default_factory=dict)
    schedule_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    out: str | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    stop_after: int | None = None
    eval_every: int | None = None
    eval_tokens: int = 16_384
    progress: bool = True
    export: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.method, str) or self.method.lower() not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        set_(self, "method", self.method.lower())
        for name in ("model_overrides", *_OPTION_BAGS):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"{name} must be a dict with str keys, got {value!r}")
            set_(self, name, dict(value))
        set_(self, "betas", tuple(float(b) for b in self.betas))
        if self.out is not None:
            set_(self, "out", str(self.out))
        self._check_numbers()
        self._check_method()

    # ------------------------------------------------------------------ validation
    def _check_numbers(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "keep_checkpoints", "eval_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("save_every", "stop_after", "eval_every", "period"):
            _positive_int(name, getattr(self, name), allow_none=True)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a token and its target), got {self.seq_len}")
        if self.vocab_limit is not None:
            _positive_int("vocab_limit", self.vocab_limit)
            if self.vocab_limit < 2:
                raise ValueError(f"vocab_limit must be >= 2 (one kept token + the shared id), "
                                 f"got {self.vocab_limit}")
        if self.warmup_steps is not None:
            if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
                raise ValueError(f"warmup_steps must be an int, got {self.warmup_steps!r}")
            if not 0 <= self.warmup_steps < self.steps:
                raise ValueError(f"warmup_steps {self.warmup_steps} must lie in [0, steps="
                                 f"{self.steps}): lower it")
        if self.stop_after is not None and self.stop_after >= self.steps:
            raise ValueError(f"stop_after {self.stop_after} must be below steps {self.steps} "
                             "(it simulates an interruption): drop it or lower it")
        if self.lr is not None:
            _finite("lr", self.lr, low=0.0, strict=True)
        _finite("min_lr_ratio", self.min_lr_ratio, low=0.0)
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _finite("weight_decay", self.weight_decay, low=0.0)
        _finite("grad_clip", self.grad_clip, low=0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    def _check_method(self) -> None:
        from rankwise.train.llama import LLAMA_PRESETS

        if self.size not in LLAMA_PRESETS:
            raise ValueError(f"unknown model size {self.size!r}: choose one of "
                             f"{sorted(LLAMA_PRESETS)}")
        m = self.method
        if self.rank is not None:
            if m not in _RANKED:
                raise ValueError(f"method {m!r} has no rank: drop rank (it applies to "
                                 f"{', '.join(sorted(_RANKED))})")
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"rank must be a positive int, got {self.rank!r}")
            limit = self.min_layer_dim
            if self.rank > limit:
                raise ValueError(
                    f"rank {self.rank} exceeds the smallest attention/MLP layer dimension "
                    f"min(out, in) = {limit} of {self.size}: choose rank <= {limit}"
                )
        if self.density is not None:
            if m not in _DENSITY:
                raise ValueError(f"method {m!r} has no density: drop it (it applies to "
                                 f"{', '.join(sorted(_DENSITY))})")
            d = self.density
            if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0.0 < d < 1.0:
                raise ValueError(
                    f"density (sparsity level) must lie strictly between 0 and 1 (the fraction "
                    f"of {_DENSITY[m]}), got {d!r}: choose e.g. density=0.03"
                )
        if self.alpha is not None:
            if m not in ("lora", "relora", "sltrain"):
                raise ValueError(f"method {m!r} has no alpha: drop it (lora, relora, sltrain)")
            _finite("alpha", self.alpha)
            if self.alpha == 0:
                raise ValueError("alpha must be nonzero (the scale is alpha / rank)")
        if self.period is not None and m not in _PERIOD_CAP:
            raise ValueError(f"method {m!r} has no periodic action: drop period (it applies to "
                             f"{', '.join(sorted(_PERIOD_CAP))})")
        if m == "relora" and self.period == 1:
            raise ValueError("ReLoRA's period must be >= 2 (the LR re-warms after each restart)")

    # ------------------------------------------------------------------ derived values
    def _dim(self, name: str) -> int:
        from rankwise.train.llama import LLAMA_PRESETS

        return int(self.model_overrides.get(name, getattr(LLAMA_PRESETS[self.size], name)))

    @property
    def hidden_size(self) -> int:
        return self._dim("hidden_size")

    @property
    def min_layer_dim(self) -> int:
        """min(out, in) over the attention and MLP projections of the configured Llama."""
        d = self.hidden_size
        heads = self._dim("num_attention_heads")
        kv = int(self.model_overrides.get("num_key_value_heads", None) or
                 self._dim("num_key_value_heads"))
        head_dim = int(self.model_overrides.get("head_dim", None) or d // heads)
        return min(d, heads * head_dim, kv * head_dim, self._dim("intermediate_size"))

    @property
    def resolved_rank(self) -> int | None:
        """The rank used (None for full / trp, and for Maestro's default full width)."""
        if self.rank is not None:
            return self.rank
        if self.method not in _RANKED or self.method == "maestro":
            return None
        return max(1, min(self.hidden_size // 4, self.min_layer_dim))

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1e-2 if self.method in ("galore", "fira") else 3e-3

    @property
    def resolved_warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

    @property
    def resolved_period(self) -> int | None:
        """Steps between periodic actions (None for methods without one)."""
        if self.method not in _PERIOD_CAP:
            return None
        if self.period is not None:
            return self.period
        if self.method == "trp":
            return 1
        cap = _PERIOD_CAP[self.method]
        period = max(2, self.steps // 4)
        return period if cap is None else min(cap, period)

    @property
    def resolved_eval_every(self) -> int:
        return self.eval_every if self.eval_every is not None else max(1, self.steps // 10)

    @property
    def tokens(self) -> int:
        """The token budget: steps * batch_size * seq_len."""
        return self.steps * self.batch_size * self.seq_len

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown PretrainConfig fields {unknown}: known are {sorted(names)}")
        kw = dict(data)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    def replace(self, **changes: Any) -> PretrainConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: PretrainConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (self's, other's)} of the trajectory fields that differ (not run control)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            k: (mine[k], theirs[k])
            for k in mine
            if k not in RUN_CONTROL_FIELDS and mine[k] != theirs.get(k)
        }
