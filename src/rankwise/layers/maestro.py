"""Maestro: a trainable low-rank decomposition ordered by ordered dropout.

Horvath, Laskaridis et al., "Maestro: Uncovering Low-Rank Structures via Trainable
Decomposition" (ICML 2024). The layer is `y = B (A x) + b` with A (d, in), B (out, d),
d = min(out, in) at the start, initialised by the SVD of the dense weight (B = U sqrt(S),
A = sqrt(S) V^T, so rank d reproduces it). Ordered dropout trains prefixes: with a truncation
k in effect the layer uses only ranks 0..k-1, `y = B[:, :k] (A[:k] x)`. Because every
truncation is a prefix, the trained layer can be cut to any rank k afterwards and the cut
layer computes exactly the training-time rank-k output (`to_factorized(k)`, the nested-rank
property).

Regulariser (hierarchical group lasso, the reference `maestro/layers/utils.py`):
    GL = sum_i (||a_{>=i}|| + ||b_{>=i}||),  ||a_{>=i}||^2 = sum_{j>=i} ||A_j,:||^2,
         ||b_{>=i}||^2 = sum_{j>=i} ||B_:,j||^2,
and importance imp_i = ||a_{>=i}|| * ||b_{>=i}||. Both tail norms shrink as i grows, so imp is
non-increasing and "drop ranks with imp_i < threshold" (progressive shrinking) always keeps a
prefix: the surviving ranks are a count `kept` (a buffer, so checkpoints carry it), and the
dropped ranks are only cut physically at export. The training-time sampling of (layer, k) and
the self-distillation loss live in rankwise.layers.schedules.MaestroSchedule.
Defaults (reference, CIFAR): lambda 5e-3, threshold 1e-5.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers._base import ParameterizedLinear, check_rank, linear_bias, linear_weight
from rankwise.layers.schedules import LayerSchedule
from rankwise.linalg import break_even_rank, compute_dtype

logger = logging.getLogger(__name__)

__all__ = ["MaestroSchedule", "MaestroLinear"]


def _sqrt0(t: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) derivative at 0, so all-zero tails stay finite."""
    positive = t > 0
    return torch.where(positive, t, torch.ones_like(t)).sqrt() * positive


class MaestroLinear(ParameterizedLinear):
    """`y = B[:, :k] (A[:k] x) + b` with k the active truncation (default: all kept ranks).

    Attributes:
        A (d, in), B (out, d): parameters. kept: 0-d int64 buffer, the surviving prefix.
        active_rank: the current training-time truncation (None = all kept ranks); set by
            MaestroSchedule, not saved.
    """

    method = "maestro"

    def __init__(self, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"need B (out, d) and A (d, in), got {tuple(B.shape)} and {tuple(A.shape)}"
            )
        m, d = B.shape
        n = A.shape[1]
        super().__init__(n, m, bias is not None, B.device, B.dtype)
        check_rank(d, m, n, "decomposition width d")
        self.B = nn.Parameter(B.detach().clone())
        self.A = nn.Parameter(A.detach().clone().to(B.dtype))
        self.register_buffer("kept", torch.tensor(d, dtype=torch.long, device=B.device))
        self.active_rank: int | None = None
        self._set_bias_(bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int | None = None, generator: torch.Generator | None = None
    ) -> MaestroLinear:
        """SVD initialisation; `rank` caps the width d (default min(out, in): exact at full width).

        `generator` is unused (deterministic); accepted for convert_.
        """
        from rankwise import linalg

        weight = linear_weight(linear)
        m, n = weight.shape
        d = min(m, n) if rank is None else check_rank(rank, m, n)
        U, S, Vh = linalg.truncated_svd(weight.detach().to(compute_dtype(weight.dtype)), d)
        B, A = linalg.split_factors(U, S, Vh)
        bias = linear_bias(linear)
        return cls(B.to(weight.dtype), A.to(weight.dtype), bias)

    # ------------------------------------------------------------------ ranks
    @property
    def width(self) -> int:
        """d, the allocated width (surviving or not)."""
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        """The rank in effect: the active truncation, else the surviving prefix."""
        return int(self.kept) if self.active_rank is None else self.active_rank

    def set_active_rank(self, rank: int | None) -> None:
        """Truncate the forward to the first `rank` ranks (None: all kept ranks)."""
        if rank is not None:
            kept = int(self.kept)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= kept:
                raise ValueError(
                    f"active rank must be an int in [1, {kept}] (the kept ranks), got {rank!r}"
                )
        self.active_rank = rank

    # ------------------------------------------------------------------ forward
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B[:, :k], A[:k]) for the rank k in effect."""
        k = self.rank
        return self.B[:, :k], self.A[:k]

    def dense_weight(self) -> torch.Tensor:
        B, A = self.factors()
        return B @ A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, A = self.factors()
        m, n, k = self.out_features, self.in_features, B.shape[1]
        if k > break_even_rank(m, n):  # factors no smaller than W: one dense product is cheaper
            return F.linear(x, (B @ A).to(x.dtype), self.bias)
        y = (x @ A.T.to(x.dtype)) @ B.T.to(x.dtype)  # (..., in) -> (..., k) -> (..., out)
        return y if self.bias is None else y + self.bias

    # ------------------------------------------------------------------ regulariser
    def tail_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||a_{>=i}||, ||b_{>=i}||) for i < kept, each (kept,) (differentiable)."""
        k = int(self.kept)
        a_sq = self.A[:k].pow(2).sum(dim=1)  # (k,) squared row norms of A
        b_sq = self.B[:, :k].pow(2).sum(dim=0)  # (k,) squared column norms of B
        tail_a = a_sq.flip(0).cumsum(0).flip(0)
        tail_b = b_sq.flip(0).cumsum(0).flip(0)
        return _sqrt0(tail_a), _sqrt0(tail_b)

    def group_lasso(self) -> torch.Tensor:
        """sum_i (||a_{>=i}|| + ||b_{>=i}||) over the kept ranks (a 0-d tensor)."""
        ta, tb = self.tail_norms()
        return ta.sum() + tb.sum()

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """imp_i = ||a_{>=i}|| * ||b_{>=i}||, (kept,), non-increasing in i."""
        ta, tb = self.tail_norms()
        return ta * tb

    @torch.no_grad()
    def shrink_(self, threshold: float = 1e-5) -> int:
        """Drop the ranks with importance < threshold (always a suffix); returns the new kept.

        At least one rank is kept. The dropped ranks stay allocated (physically cut at export).
        """
        imp = self.importance()
        keep = max(1, int((imp >= threshold).sum()))
        self.kept.fill_(keep)
        if self.active_rank is not None and self.active_rank > keep:
            self.active_rank = None
        return keep

    # ------------------------------------------------------------------ export
    def to_factorized(self, rank: int | None = None) -> nn.Module:
        """FactorizedLinear with the first `rank` ranks (default: the kept ones); exact slices."""
        from rankwise.layers.factorized import FactorizedLinear

        k = int(self.kept) if rank is None else rank
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.width:
            raise ValueError(f"rank must be an int in [1, {self.width}], got {rank!r}")
        with torch.no_grad():
            bias = self.bias.detach() if self.bias is not None else None
            return FactorizedLinear.from_factors(self.B[:, :k].clone(), self.A[:k].clone(), bias)

    def to_compact(self) -> nn.Module:
        """The smaller of FactorizedLinear(kept) and nn.Linear (dense when (m+n) k >= m n)."""
        k = int(self.kept)
        if (self.out_features + self.in_features) * k >= self.out_features * self.in_features:
            saved, self.active_rank = self.active_rank, None
            try:
                return self.to_dense()
            finally:
                self.active_rank = saved
        return self.to_factorized(k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, width={self.width}, kept={int(self.kept)}"


class MaestroSchedule(LayerSchedule):
    """Maestro's ordered dropout: one (layer, rank) truncation per step, group lasso, shrinking.

    After every update the next pair is drawn from a shuffled list of all (layer, k) pairs,
    k = 1..kept (the reference single-layer sampler; refilled when empty). Training uses it as

        out = model(**batch); loss = out.loss
        with sched.truncated():
            partial = model(**batch).logits
        loss = loss + sched.distillation_loss(out.logits, partial)
        loss.backward(); sched.before_step(); opt.step(); sched()

    `before_step` adds lam * grad(group lasso); the periodic action (every `every` updates, the
    reference: each epoch) drops ranks with importance < threshold.
    """

    layer_type = MaestroLinear
    method = "maestro"

    def __init__(
        self, model, optimizer=None, *, every=None, lam=5e-3, threshold=1e-5, seed=0
    ) -> None:
        super().__init__(model, every=every, optimizer=optimizer, seed=seed)
        self.lam, self.threshold = float(lam), float(threshold)
        self.names = list(self.layers)
        self.queue: list[tuple[int, int]] = []
        self.current: tuple[str, int] | None = None
        self._draw()

    def _draw(self) -> None:
        if not self.queue:
            pairs = [
                (i, k)
                for i, name in enumerate(self.names)
                for k in range(1, int(self.layers[name].kept) + 1)
            ]
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            random.Random(seed).shuffle(pairs)
            self.queue = pairs
        i, k = self.queue.pop()
        self.current = (self.names[i], k)

    def every_step(self) -> None:
        self._draw()

    def run(self) -> None:
        kept = {name: layer.shrink_(self.threshold) for name, layer in self.layers.items()}
        self.queue = []
        self._draw()
        logger.info("Maestro shrinking at step %d: kept ranks %s", self.step, kept)

    @contextlib.contextmanager
    def truncated(self) -> Iterator[tuple[str, int] | None]:
        """Within the block the sampled layer runs at its sampled rank (all others full)."""
        if self.current is None:
            yield None
            return
        name, k = self.current
        layer = self.layers[name]
        k = min(k, int(layer.kept))
        layer.set_active_rank(k)
        try:
            yield (name, k)
        finally:
            layer.set_active_rank(None)

    @staticmethod
    def distillation_loss(full_logits: torch.Tensor, partial_logits: torch.Tensor) -> torch.Tensor:
        """CE(partial, softmax(full).detach()), averaged over positions (Maestro's self-distillation)."""
        target = torch.softmax(full_logits.detach().float(), dim=-1)
        logp = torch.log_softmax(partial_logits.float(), dim=-1)
        return -(target * logp).sum(-1).mean()

    def regularizer(self) -> torch.Tensor:
        """lam * sum over layers of the hierarchical group lasso (for logging)."""
        return self.lam * sum(layer.group_lasso() for layer in self.layers.values())

    def before_step(self) -> None:
        if not self.lam:
            return
        with torch.enable_grad():
            for layer in self.layers.values():
                gA, gB = torch.autograd.grad(self.lam * layer.group_lasso(), (layer.A, layer.B))
                for p, g in ((layer.A, gA), (layer.B, gB)):
                    p.grad = g.detach() if p.grad is None else p.grad.add_(g)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["queue"] = [list(pair) for pair in self.queue]
        state["current"] = list(self.current) if self.current is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.queue = [(int(i), int(k)) for i, k in state["queue"]]
        cur = state["current"]
        self.current = (str(cur[0]), int(cur[1])) if cur is not None else None
