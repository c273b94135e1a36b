"""`PretrainConfig`: everything that defines a pretraining run, validated before any work.

A run is a tiny Llama (`rankwise.train.llama`) trained from scratch with one method:

| method | what changes (paper) | rank | density | period |
|---|---|---|---|---|
| full | nothing: dense weights, torch AdamW | - | - | - |
| lora | frozen random W0 + (alpha/r) B A; embeddings and norms train | r | - | - |
| relora | lora + merge-and-restart every `period` steps, jagged LR (ReLoRA, Lialin et al. 2023) | r | - | restart |
| galore | dense weights, GaLore-AdamW on attn/MLP gradients (GaLore, Zhao et al. 2024) | r | - | projector refresh |
| fira | GaLore + Fira's scaled residual and limiter (Fira, Chen et al. 2024) | r | - | projector refresh |
| sltrain | (alpha/r) B A + S on a fixed random support (SLTrain, Han et al. 2024) | r | of entries | - |
| lost | SVD split: rank-r part + channel-wise sparse part (LOST, 2025) | r | of channels | - |
| sst | U diag(sigma) V^T, r sampled singular-vector pairs (SST, 2024) | r | - | resample |
| maestro | B A, ordered dropout + self-distillation + group lasso (Maestro, Horvath et al. 2024) | width | - | shrink |
| trp | dense W projected to its 0.99-energy rank + nuclear subgradient (TRP, 2023) | - | - | project |

Defaults that are ours (the papers train far longer): rank = hidden / 4 (GaLore's ratio for its
60M model), period = steps / 4 capped at the papers' values (ReLoRA 500, GaLore/Fira 200,
SST 100; TRP projects every step as the official code; Maestro shrinks every steps / 4), lr 3e-3
for every AdamW-trained method (SLTrain's scripts; short runs favour a high lr) and 1e-2 with
scale 0.25 for GaLore/Fira (their preset). Config fields are JSON values so a checkpoint can
store the config and a resumed run can compare it field by field.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from rankwise.config import Config, option

__all__ = [
    "OPTIMIZER_METHODS",
    "RUN_CONTROL_FIELDS",
    "PretrainConfig",
    "methods",
]

#: methods that keep dense weights and change the optimizer: name -> rankwise.optim preset
#: (registry("optimizer")); "full" is torch AdamW and "lora" the adapter of registry("adapter").
OPTIMIZER_METHODS: dict[str, str] = {"galore": "galore_adamw", "fira": "fira"}
_NON_LAYER = ("full", "lora", *OPTIMIZER_METHODS)
#: layer parameterisations that are formats of a compressed model, not training methods
_NOT_TRAINED_FROM_SCRATCH = frozenset({"factorized", "monarch"})
_RANKED = {"lora", "relora", "galore", "fira", "sltrain", "lost", "sst", "maestro"}
_DENSITY = {"sltrain": "weight entries S may hold", "lost": "channels kept in the sparse part"}
_PERIOD_CAP = {"relora": 500, "galore": 200, "fira": 200, "sst": 100, "maestro": None, "trp": None}
_OPTION_BAGS = ("layer_options", "schedule_options", "optimizer_options")

# Fields that steer only how a run is watched and stored, not the trajectory: a resumed run may
# change them (every other field must equal the checkpoint's).
RUN_CONTROL_FIELDS = frozenset(
    {"out", "save_every", "keep_checkpoints", "stop_after", "eval_every", "eval_tokens",
     "progress", "export", "log_dir", "fsdp"}
)


def _layer_names() -> list[str]:
    """The layer methods of registry("layer") that train from scratch."""
    from rankwise.registry import registry

    return [n for n in registry("layer").names() if n not in _NOT_TRAINED_FROM_SCRATCH]


def methods() -> tuple[str, ...]:
    """Every pretraining method: full, lora, the optimizer methods, then every layer method of
    rankwise.layers (a new layer method registered there is a pretraining method too)."""
    return (*_NON_LAYER, *_layer_names())


def __getattr__(name: str) -> Any:  # METHODS is computed on first use (the layer registry)
    if name == "METHODS":
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
class PretrainConfig(Config):
    """One pretraining run (see the module table for the method column).

    Every field below carries its help text (`option`); `rankwise pretrain`'s flags and their
    defaults are generated from them (`rankwise.config.add_arguments`). Run-control fields
    (RUN_CONTROL_FIELDS) steer only how a run is watched and stored, and may change on resume.
    """

    # model and data
    method: str = option(help="training method (module table; rankwise.train.config.methods())")
    size: str = option("llama-10m", "model preset of rankwise.train.llama")
    model_overrides: dict[str, Any] = option(
        help="LlamaConfig fields over the preset (e.g. hidden_size=32 in tests)", cli=False,
        default_factory=dict)
    tokenizer: str = option("smollm2-135m", "tokenizer name or directory")
    corpus: str = option("python-docs", "embedded corpus (train split trains, validation scores)")
    vocab_limit: int | None = option(
        None, "keep only the N-1 most frequent train tokens (others share one id); the "
        "49152-token embedding dominates a 10M model's compute")
    # schedule
    steps: int = option(1000, "optimizer updates; tokens = steps x batch_size x seq_len")
    seq_len: int = option(256, "tokens per row")
    batch_size: int = option(8, "rows per update (the global batch, split over processes)")
    lr: float | None = option(None, "peak learning rate (None: 3e-3; GaLore/Fira 1e-2)")
    warmup_steps: int | None = option(None, "linear warmup steps (None: 10%% of steps)")
    min_lr_ratio: float = option(0.1, "the cosine decays to min_lr_ratio x lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)")
    # method
    rank: int | None = option(None, "rank r (None: hidden / 4; Maestro: full width)")
    density: float | None = option(
        None, "sparsity level in (0, 1): SLTrain's fraction of entries (0.03), LOST's fraction "
        "of channels (0.05)")
    alpha: float | None = option(None, "LoRA/ReLoRA/SLTrain alpha (None: 32)")
    period: int | None = option(
        None, "steps between the method's periodic actions (ReLoRA restarts, GaLore refreshes, "
        "SST resampling, TRP projections, Maestro shrinking)")
    layer_options: dict[str, Any] = option(
        help="extra keyword arguments for the layer (convert_/adapt_)", cli=False,
        default_factory=dict)
    schedule_options: dict[str, Any] = option(
        help="extra keyword arguments for the layer's schedule", cli=False, default_factory=dict)
    optimizer_options: dict[str, Any] = option(
        help="extra keyword arguments for the optimizer", cli=False, default_factory=dict)
    fsdp: bool = option(
        False, "shard parameters, gradients and optimizer state over the processes with FSDP2 "
        "(full, galore, fira; under torchrun)")
    seed: int = option(0, "model init, method init, data order")
    # run control
    out: str | None = option(None, "output directory (checkpoints, result.json, final model)")
    save_every: int | None = option(None, "checkpoint period in steps (None: only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints stay on disk")
    stop_after: int | None = option(
        None, "stop after this step as if interrupted (continue with --resume)")
    eval_every: int | None = option(None, "validation-perplexity period (None: steps / 10)")
    eval_tokens: int = option(16_384, "validation tokens scored (a fixed prefix of the split)")
    log_dir: str | None = option(
        None, "TensorBoard directory (loss, lr, tokens/s, validation perplexity)")
    progress: bool = option(True, "show a progress bar")
    export: bool = option(True, "write the trained model as a dense HF model to OUT/final")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        names = methods()
        if not isinstance(self.method, str) or self.method.lower() not in names:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(names)}")
        set_(self, "method", self.method.lower())
        for name in ("model_overrides", *_OPTION_BAGS):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"{name} must be a dict with str keys, got {value!r}")
            set_(self, name, dict(value))
        set_(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("out", "log_dir"):
            if getattr(self, name) is not None:
                set_(self, name, str(getattr(self, name)))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
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
    @classmethod
    def from_dict(cls, data: Any) -> PretrainConfig:
        """Build from saved values; unknown keys raise ValueError naming the known ones."""
        try:
            return super().from_dict(data)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def differences(self, other: PretrainConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (self's, other's)} of the trajectory fields that differ (not run control)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            k: (mine[k], theirs[k])
            for k in mine
            if k not in RUN_CONTROL_FIELDS and mine[k] != theirs.get(k)
        }
