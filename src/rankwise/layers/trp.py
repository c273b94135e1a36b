"""Trained Rank Pruning: low-rank projection inside training + nuclear-norm subgradient.

Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks" (2018/2020). The layer
keeps a full (out, in) weight; every `every` steps (TRPSchedule; the official CIFAR code uses
every step) it is replaced by its low-rank approximation

    W <- U_k S_k V_k^T,   k = the smallest rank holding a fraction e of sum s^2 (e = 0.99),

so training continues from a rank-k point, and before each optimizer step the nuclear-norm
subgradient lambda * U_k V_k^T (lambda = 3e-4 in the README command) is added to dL/dW, which
is gradient descent on L + lambda ||W||_* (for a rank-k W, U_k V_k^T is exactly d||W||_*/dW
and <U_k V_k^T, W> = ||W||_*). After training the weight is split into two layers keeping the
singular values above a value threshold (1e-2 in the reference), with no fine-tuning needed.

`rank_` (a buffer, so checkpoints carry it) is the k of the last projection; the subgradient
uses the top-`rank_` singular vectors of the current W (before any projection: the energy rank).
It is a function of (W, rank_) only, so resumed runs are exact; with lambda > 0 and every = 1 a
step costs two SVDs per layer (projection, then the subgradient of the projected W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers._base import ParameterizedLinear, check_rank, linear_bias, linear_weight
from rankwise.layers.schedules import LayerSchedule
from rankwise.linalg import compute_dtype

__all__ = ["TRPSchedule", "TRPLinear"]


class TRPLinear(ParameterizedLinear):
    """A dense `y = x W^T + b` whose weight TRPSchedule keeps projecting to low rank.

    Attributes:
        weight (out, in): parameter. rank_: 0-d int64 buffer (0 = never projected).
    """

    method = "trp"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
        m, n = weight.shape
        super().__init__(n, m, bias is not None, weight.device, weight.dtype)
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("rank_", torch.tensor(0, dtype=torch.long, device=weight.device))
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._set_bias_(bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, generator: torch.Generator | None = None
    ) -> TRPLinear:
        """Copy `linear` (pretrained or freshly initialised); `generator` is unused."""
        weight = linear_weight(linear)
        return cls(weight, linear_bias(linear))

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    # ------------------------------------------------------------------ TRP steps
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from rankwise import linalg

        return linalg.svd(self.weight.detach().to(compute_dtype(self.weight.dtype)))

    @staticmethod
    def _energy_rank(S: torch.Tensor, energy: float) -> int:
        from rankwise import linalg

        if energy == 1.0:
            return S.numel()  # keep everything (no rounding can drop a tiny tail)
        return linalg.rank_for_energy(S, energy)

    @torch.no_grad()
    def project_(self, energy: float = 0.99) -> int:
        """W <- U_k S_k V_k^T with k the energy rank (e = 1 leaves W untouched); returns k."""
        U, S, Vh = self._svd()
        k = self._energy_rank(S, energy)
        if k < S.numel():
            self.weight.copy_((U[:, :k] * S[:k]) @ Vh[:k])
        self.rank_.fill_(k)
        # no caching of U_k V_k^T from this SVD: the subgradient is recomputed from the projected
        # W itself, so a run resumed from a checkpoint takes bit-identical steps
        self._cache = None
        return k

    def _key(self, k: int) -> tuple[int, ...]:
        # the cached direction is valid while the weight storage and its version are unchanged
        return (self.weight.data_ptr(), self.weight._version, k)

    @torch.no_grad()
    def nuclear_subgradient(self, energy: float = 0.99) -> torch.Tensor:
        """U_k V_k^T (out, in) of the current W, k = rank_ (or the energy rank if never projected).

        For a W of rank k this is the gradient of ||W||_* (TRP's regulariser direction).
        """
        wanted = int(self.rank_)
        if self._cache is not None and self._cache[0] == self._key(wanted):
            return self._cache[1]
        U, S, Vh = self._svd()
        k = wanted or self._energy_rank(S, energy)
        direction = U[:, :k] @ Vh[:k]
        self._cache = (self._key(wanted), direction)
        return direction

    @torch.no_grad()
    def add_nuclear_grad_(self, lam: float, energy: float = 0.99) -> None:
        """weight.grad += lam * U_k V_k^T (creates the gradient if there is none)."""
        step = self.nuclear_subgradient(energy).to(self.weight.dtype) * lam
        if self.weight.grad is None:
            self.weight.grad = step.clone()
        else:
            self.weight.grad.add_(step)

    # ------------------------------------------------------------------ export
    def to_factorized(self, rank: int | None = None, *, threshold: float = 1e-2) -> nn.Module:
        """Two layers keeping the singular values > `threshold` (the reference rule), or `rank`."""
        from rankwise import linalg
        from rankwise.layers.factorized import FactorizedLinear

        with torch.no_grad():
            U, S, Vh = self._svd()
            if rank is None:
                k = max(1, int((S > threshold).sum()))
            else:
                k = check_rank(rank, self.out_features, self.in_features)
            B, A = linalg.split_factors(U[:, :k], S[:k], Vh[:k])
            dt = self.weight.dtype
            bias = self.bias.detach() if self.bias is not None else None
            return FactorizedLinear.from_factors(B.to(dt), A.to(dt), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={int(self.rank_) or 'full'}"


class TRPSchedule(LayerSchedule):
    """TRP: project to the energy rank every `every` updates; add lambda U_k V_k^T to each grad.

    Args:
        energy: e, the kept fraction of sum s^2 (0.99 in the reference).
        lam: nuclear-norm weight lambda (3e-4 in the README command; 0 disables).
    """

    layer_type = TRPLinear
    method = "trp"

    def __init__(self, model, optimizer=None, *, every=1, energy=0.99, lam=3e-4, seed=0) -> None:
        super().__init__(model, every=every, optimizer=optimizer, seed=seed)
        if not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {energy}")
        if float(lam) < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.energy, self.lam = float(energy), float(lam)

    def before_step(self) -> None:
        if self.lam:
            for layer in self.layers.values():
                layer.add_nuclear_grad_(self.lam, self.energy)

    def run(self) -> None:
        for layer in self.layers.values():
            layer.project_(self.energy)
