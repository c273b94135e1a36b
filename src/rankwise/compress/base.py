"""The Compressor protocol, input statistics and exact parameter accounting.

A compressor is calibrate-then-solve (as in IST-DASLab/gptq's `add_batch` then solve):

1. `observe(fqn, module, x)` accumulates running statistics of a layer's inputs x (..., in):
   the Gram `sum x^T x` (fp64), `sum |x|`, `sum x`, token count. Nothing stores activations.
   (through rankwise.calibrate's `GramAccumulator`, the one accumulator of rankwise);
   `observe_stats(fqn, stats)` adopts statistics captured elsewhere (rankwise.calibrate's
   `LayerStats`, or any object with the same attributes).
2. `spectrum(fqn, module)` gives the singular values in the compressor's own metric, so that a
   rank allocator (rankwise.compress.allocate) can compare layers without knowing the method.
3. `compress(fqn, module, rank)` returns the replacement module (a FactorizedLinear).

Rank allocation stays outside the compressor, so WeLore, dynamic rank or a parameter budget
combine with any whitener.

Accounting words (used everywhere in rankwise.compress): `ratio` is the fraction of parameters
*removed*, either of the targeted layers (`ratio_targets`) or of the whole model
(`ratio_model`); a rank above `rankwise.linalg.break_even_rank` is never used (the layer stays
dense). Rank rules live in rankwise.linalg.rank, allocation in rankwise.compress.allocate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Compressor", "InputStats", "as_input_stats", "check_ratio"]


@dataclass
class InputStats:
    """Running input statistics of one linear layer (n = in_features).

    Attributes:
        gram: `sum_t x_t x_t^T`, (n, n) fp64 (a sum, not a mean; scale is irrelevant to whitening).
        sum: `sum_t x_t`, (n,) fp64, for centring (AFM's output PCA, Yu & Wu 2023).
        abs_sum: `sum_t |x_t|`, (n,) fp64, ASVD's activation statistic (ASVD, Yuan et al. 2023).
        n_tokens: number of token vectors seen.
        sq_grad: accumulated squared weight gradients (out, in) fp32, the empirical Fisher
            (FWSVD, Hsu et al. 2022); None unless a backward pass provided them.
    """

    gram: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    n_tokens: int = 0
    sq_grad: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs x (..., n) through rankwise.calibrate's fp64 accumulator."""
        from rankwise.calibrate import GramAccumulator

        if not torch.isfinite(x).all():
            raise ValueError("calibration inputs contain NaN or Inf: check the model and the data")
        acc = GramAccumulator(x.shape[-1], ("gram", "mean", "abs_mean"), x.device)
        for have, into in ((self.gram, acc.gram), (self.sum, acc.x_sum), (self.abs_sum, acc.abs_sum)):
            if have is not None:
                into.copy_(have)
        acc.n_tokens = self.n_tokens
        acc.add(x)
        self.gram, self.sum, self.abs_sum, self.n_tokens = acc.gram, acc.x_sum, acc.abs_sum, acc.n_tokens

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n_tokens, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n_tokens, 1)


def as_input_stats(stats: Any) -> InputStats:
    """Adopt statistics from rankwise.calibrate (`LayerStats`) or a dict into an `InputStats`.

    Accepted attributes/keys: `gram` (sum x^T x), `n_tokens`, and optionally `mean` or `sum`,
    `abs_mean` or `abs_sum`, `sq_grad`.
    """
    if isinstance(stats, InputStats):
        return stats
    get = stats.get if isinstance(stats, dict) else (lambda k, d=None: getattr(stats, k, d))
    n_tokens = int(get("n_tokens", 0) or 0)
    gram = get("gram")
    out = InputStats(gram=None if gram is None else gram.to(torch.float64), n_tokens=n_tokens)
    if get("sum") is not None:
        out.sum = get("sum").to(torch.float64)
    elif get("mean") is not None:
        out.sum = get("mean").to(torch.float64) * n_tokens
    if get("abs_sum") is not None:
        out.abs_sum = get("abs_sum").to(torch.float64)
    elif get("abs_mean") is not None:
        out.abs_sum = get("abs_mean").to(torch.float64) * n_tokens
    if get("sq_grad") is not None:
        out.sq_grad = get("sq_grad")
    return out


@runtime_checkable
class Compressor(Protocol):
    """Calibrate-then-solve compressor of linear layers (see the module docstring)."""

    name: str

    def observe(self, fqn: str, module: nn.Module, x: torch.Tensor) -> None:
        """Accumulate statistics of `module`'s inputs x (..., in)."""

    def observe_stats(self, fqn: str, stats: Any) -> None:
        """Adopt statistics captured elsewhere (rankwise.calibrate.LayerStats)."""

    def spectrum(self, fqn: str, module: nn.Module) -> torch.Tensor:
        """Singular values (descending) in this compressor's metric; drives rank allocation."""

    def compress(self, fqn: str, module: nn.Module, rank: int) -> nn.Module:
        """The rank-`rank` replacement of `module`."""


class ObservedStats:
    """Mixin for compressors whose solve reads per-layer input statistics and caches a
    factorisation per layer: observing new inputs for a layer drops that layer's cache."""

    stats_: dict[str, InputStats]
    _cache: dict[str, Any]

    def observe(self, fqn: str, module: nn.Module, x: torch.Tensor) -> None:
        self.stats_.setdefault(fqn, InputStats()).update(x)
        self._cache.pop(fqn, None)

    def observe_stats(self, fqn: str, stats: Any) -> None:
        self.stats_[fqn] = as_input_stats(stats)
        self._cache.pop(fqn, None)

    def release(self, fqn: str) -> None:
        """Drop the statistics and cached factorisation of `fqn` (it is compressed)."""
        self.stats_.pop(fqn, None)
        self._cache.pop(fqn, None)

    def forget(self, fqn: str | None = None) -> None:
        """Drop cached factorisations (of one layer, or all) to free memory."""
        if fqn is None:
            self._cache.clear()
        else:
            self._cache.pop(fqn, None)


# ----------------------------------------------------------------------------- accounting
def check_ratio(ratio: float) -> float:
    """Validate a fraction of parameters removed: 0 <= ratio < 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise TypeError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"ratio {ratio} is outside [0, 1): it is the fraction of parameters removed "
            "(0.2 removes 20 %); pass e.g. --ratio 0.2"
        )
    return float(ratio)
