"""ReLoRA: high-rank training through periodically merged low-rank updates.

Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates" (ICLR 2024). The layer is

    y = x (W + (alpha / r) B A)^T + b,   W frozen, A (r, in) Kaiming-uniform(a=sqrt 5), B (out, r) = 0,

with dropout on the input of the low-rank branch. Every T_reset steps (ReLoRASchedule) the
update is merged and the factors restart: `W <- W + (alpha/r) B A; A <- Kaiming; B <- 0`
(`merge_and_reinit_`), which leaves the layer's function unchanged (B = 0 after the restart);
the schedule then resets the optimizer state of A and B and the LR re-warms from 0 (jagged
cosine). After k restarts W - W0 = sum of k rank-r merges can have rank up to k r (the tests check it).

Defaults follow the reference `peft_pretraining/relora.py`: alpha 32 (README/launch scripts; the
layer's own default is 1), dropout 0.1, bias trainable (only the weight is frozen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers._base import ParameterizedLinear, check_rank, linear_bias, linear_weight
from rankwise.layers.restarts import reset_optimizer_state_
from rankwise.layers.schedules import LayerSchedule
from rankwise.linalg import compute_dtype, kaiming_uniform, make_generator

__all__ = ["ReLoRALinear", "ReLoRASchedule"]


class ReLoRALinear(ParameterizedLinear):
    """`y = x (W + (alpha/r) B A)^T + b` with W frozen and (B, A) restarted by the schedule.

    Attributes:
        weight (out, in): frozen parameter. A (r, in), B (out, r): trainable. restarts: 0-d
        int64 buffer counting merges.
    """

    method = "relora"

    def __init__(
        self,
        weight: torch.Tensor,
        rank: int,
        alpha: float = 32.0,
        dropout: float = 0.1,
        bias: torch.Tensor | None = None,
        generator: torch.Generator | int | None = None,
    ) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
        m, n = weight.shape
        super().__init__(n, m, bias is not None, weight.device, weight.dtype)
        self.rank = check_rank(rank, m, n)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.alpha = float(alpha)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.A = nn.Parameter(torch.empty(self.rank, n, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(m, self.rank, device=weight.device, dtype=weight.dtype))
        self.dropout = nn.Dropout(float(dropout))
        self.register_buffer("restarts", torch.tensor(0, dtype=torch.long, device=weight.device))
        self.reinit_(make_generator(generator))
        self._set_bias_(bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        alpha: float = 32.0,
        dropout: float = 0.1,
        generator: torch.Generator | int | None = None,
    ) -> ReLoRALinear:
        """Freeze `linear.weight` (pretrained, or a fresh init for pretraining) and add (B, A)."""
        weight = linear_weight(linear)
        bias = linear_bias(linear)
        return cls(weight, rank, alpha, dropout, bias, generator)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.B, self.A

    def delta_weight(self) -> torch.Tensor:
        """The pending update (alpha/r) B A, (out, in)."""
        return (self.B @ self.A) * self.scale

    def dense_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype), self.bias)
        h = self.dropout(x) @ self.A.T.to(x.dtype)  # (..., in) -> (..., r)
        return y + (h @ self.B.T.to(x.dtype)) * self.scale

    @torch.no_grad()
    def reinit_(self, generator: torch.Generator | None = None) -> None:
        """A <- Kaiming-uniform(a = sqrt 5), B <- 0 (the LoRA init; the delta becomes 0)."""
        self.A.copy_(kaiming_uniform(tuple(self.A.shape), self.in_features, generator))
        self.B.zero_()

    @torch.no_grad()
    def merge_and_reinit_(self, generator: torch.Generator | None = None) -> None:
        """W <- W + (alpha/r) B A (in fp32, fp64 stays fp64), then restart (B, A); the output is unchanged."""
        dt = compute_dtype(self.weight.dtype)
        merged = self.weight.to(dt) + (self.B.to(dt) @ self.A.to(dt)) * self.scale
        self.weight.copy_(merged)
        self.reinit_(generator)
        self.restarts.add_(1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, "
            f"restarts={int(self.restarts)}"
        )


class ReLoRASchedule(LayerSchedule):
    """Every `every` updates: merge and restart every ReLoRALinear, then reset A/B optimizer state.

    Args:
        reset: "full" (reference default), "magnitude" or "random" (partial reset of `ratio`).
        ratio: pruned fraction for the partial resets (README: magnitude 0.9).
        reset_step: also zero the step counters (the reference keeps them).
    """

    layer_type = ReLoRALinear
    method = "relora"
    needs_optimizer = True

    def __init__(
        self, model, optimizer=None, *, every=500, reset="full", ratio=0.9, reset_step=False, seed=0
    ) -> None:
        super().__init__(model, every=every, optimizer=optimizer, seed=seed)
        self.reset, self.ratio, self.reset_step = reset, ratio, reset_step

    def _params(self) -> list[torch.Tensor]:
        return [t for layer in self.layers.values() for t in (layer.A, layer.B)]

    def run(self) -> None:
        for layer in self.layers.values():
            layer.merge_and_reinit_(self.generator)
        reset_optimizer_state_(
            self.optimizer,
            self._params(),
            mode=self.reset,
            ratio=self.ratio,
            reset_step=self.reset_step,
            generator=self.generator,
        )
