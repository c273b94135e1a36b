"""Weight refactorization of factorised layers: rebalance (B, A) without changing B A.

Glentis et al., "Scalable Parameter and Memory Efficient Pretraining for LLM: Recent Algorithmic
Advances and Benchmarking" (2025): low-rank pretraining (W = B A, or SLTrain's B A + S) gets
closer to full-rank training when, every T steps, the factors are refactorised and the momenta
reset (RefactorSchedule in rankwise.layers.schedules). The refactorisation (the exact formula
is not given in the paper; this is ours) never forms W:

    B = Q_B R_B,  A^T = Q_A R_A                 thin QR, Q_B (out, r), Q_A (in, r)
    R_B R_A^T = U' S V'^T                       SVD of the r x r core
    B' = Q_B U' S^{1/2},  A' = S^{1/2} V'^T Q_A^T

so B' A' = B A, B'^T B' = A' A'^T = S (balanced), and the columns of B' / rows of A' are the
left / right singular directions of B A: a well-conditioned factor geometry. Costs
O((out + in) r^2 + r^3) per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers.restarts import reset_optimizer_state_
from rankwise.layers.schedules import LayerSchedule
from rankwise.linalg import compute_dtype

__all__ = ["RefactorSchedule", "refactorable_layers", "refactorize", "refactorize_"]


def refactorize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors (B' (out, r), A' (r, in)) with B' A' = B A; returned in B's dtype.

    Requires r <= min(out, in). Computed in fp32 (fp64 stays fp64).
    """
    left, right, _ = _refactor(B, A)
    return left, right


def _refactor(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from rankwise import linalg

    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"need B (out, r) and A (r, in), got {tuple(B.shape)} and {tuple(A.shape)}"
        )
    r = B.shape[1]
    if r > min(B.shape[0], A.shape[1]):
        raise ValueError(
            f"rank {r} exceeds min(out, in) = {min(B.shape[0], A.shape[1])}: a thin QR needs "
            "r <= min(out, in); use a smaller rank"
        )
    dt = compute_dtype(B.dtype)
    Bw, Aw = B.detach().to(dt), A.detach().to(dt)
    Q_B = linalg.orthonormalize(Bw)  # (out, r)
    Q_A = linalg.orthonormalize(Aw.T)  # (in, r)
    R_B = Q_B.T @ Bw  # (r, r) (upper triangular up to rounding)
    R_A = Q_A.T @ Aw.T  # (r, r)
    U, S, Vh = linalg.svd(R_B @ R_A.T)  # core (r, r)
    left, right = linalg.split_factors(Q_B @ U, S, Vh @ Q_A.T)
    return left.to(B.dtype), right.to(A.dtype), S


def refactorable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{fqn: layer} of the layers whose `factors()` are a trainable (B, A) pair.

    FactorizedLinear, SLTrainLinear and LOSTLinear qualify; ReLoRA (B = 0 after each restart)
    and Maestro (ordered ranks must not be rotated) do not.
    """
    from rankwise.layers.factorized import FactorizedLinear
    from rankwise.layers.lost import LOSTLinear
    from rankwise.layers.sltrain import SLTrainLinear

    kinds = (FactorizedLinear, SLTrainLinear, LOSTLinear)
    return {name: m for name, m in model.named_modules() if name and isinstance(m, kinds)}


@torch.no_grad()
def refactorize_(layer: nn.Module, *, tol: float = 1e-6) -> list[torch.Tensor]:
    """Refactorise `layer.factors()` in place (the same parameter objects, so the optimizer keeps
    them); returns [B, A] for the caller's optimizer-state reset.

    A rank-deficient product (smallest singular value <= tol * largest, e.g. SLTrain's B = 0 at
    init) is left alone and [] is returned: balancing it would zero both the column of B and
    the row of A of each null direction, and a zero pair never receives a gradient again.
    """
    B, A = layer.factors()
    new_B, new_A, S = _refactor(B, A)
    if float(S.max()) == 0.0 or float(S.min()) <= tol * float(S.max()):
        return []
    B.copy_(new_B)
    A.copy_(new_A)
    return [B, A]


class RefactorSchedule(LayerSchedule):
    """Every `every` updates: refactorise (B, A) of factorised layers and reset their moments.

    The reset zeroes the moments and step counters of the refactorised factors (as rebuilding
    the optimizer in the reference does), so their next update is an Adam first step.
    """

    method = "factorized"
    needs_optimizer = True

    def __init__(self, model, optimizer=None, *, every=1000, reset=True, seed=0) -> None:
        self.reset = reset
        self.needs_optimizer = reset
        super().__init__(model, every=every, optimizer=optimizer, seed=seed)

    def _find(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = refactorable_layers(model)
        if not layers:
            raise ValueError(
                "RefactorSchedule found no factorised layers (factorized, sltrain, lost): "
                "convert the model first"
            )
        return layers

    def _params(self) -> list[torch.Tensor]:
        return [t for layer in self.layers.values() for t in layer.factors()]

    def run(self) -> None:
        touched = [p for layer in self.layers.values() for p in refactorize_(layer)]
        if self.reset and touched:
            reset_optimizer_state_(self.optimizer, touched, mode="full", reset_step=True)
