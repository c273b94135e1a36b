"""LoRA-Pro: LoRA whose gradients are rewritten so the equivalent full-weight gradient best
approximates the full gradient (arXiv 2407.18242).

    y = W x + b + s · B A x        (plain LoRA forward, s = α/r)

A LoRA step moves W_eff by the *equivalent gradient* ``g̃ = s B g̃_A + s g̃_B A``. From the raw
gradients ``g_A = s Bᵀ G`` and ``g_B = s G Aᵀ`` (G = ∂L/∂W, never formed) the rule rewrites
them, before every optimizer step, to the minimiser of ‖s B g̃_A + s g̃_B A − G‖_F:

    g̃_A = (1/s²) (BᵀB)⁻¹ g_A + X A
    g̃_B = (1/s²) [I − B (BᵀB)⁻¹ Bᵀ] g_B (AAᵀ)⁻¹ − B X

so that ``g̃ = P_B G + (I − P_B) G P_A`` with the projectors P_B = B(BᵀB)⁻¹Bᵀ and
P_A = Aᵀ(AAᵀ)⁻¹A. X (r×r) does not change g̃, only how it is split between A and B:
``"sylvester"`` (default) solves (BᵀB) X + X (AAᵀ) = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ, ``"symmetry"`` uses
X = −½ (1/s²)(BᵀB)⁻¹ Bᵀ g_B (AAᵀ), ``"zero"`` X = 0 (official ``peta/optim.py``).

This is the official *efficient* mode: the rewritten gradients go to any optimizer (AdamW keeps
its moments in A/B space, exactly the official ``step_efficient``). The *full* mode (Adam moments
of g̃ kept as d_out×d_in matrices) is not implemented. Inverses are ``pinv(M + δI)``, δ = 1e-8,
computed with ``rankwise.linalg.eigh`` in fp64 (pinv's default cutoff, r·eps·λ_max); the
Sylvester equation is solved in the two eigenbases (entries whose denominator λ_i + μ_j
vanishes, only when BᵀB and AAᵀ are both singular, are set to 0). Defaults follow the official
AdamW: s = 2 (α = 16 at r = 8), X_mode "sylvester". With B = 0 (the init) every output is finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rankwise import linalg
from rankwise.adapt.method import register_method
from rankwise.adapt.methods.lora import LoRABase, LoRAConfig
from rankwise.config import option

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.rules import RuleState

DELTA = 1e-8
X_MODES = ("sylvester", "symmetry", "zero")


@dataclass(frozen=True, kw_only=True)
class LoRAProConfig(LoRAConfig):
    """LoRA-Pro options: LoRA's (α default 16: the official s = 2 at r = 8) and `x_mode`."""

    alpha: float = option(16.0, "α; the branch is scaled by α/r (α/√r with `use_rslora`); 16 is "
                          "the official s = 2 at r = 8")
    x_mode: str = option("sylvester", "how the free r×r matrix X is chosen: \"sylvester\", "
                         "\"symmetry\" or \"zero\"")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.x_mode not in X_MODES:
            raise ValueError(f"x_mode must be one of {X_MODES}, got {self.x_mode!r}")


def _sym_pinv(M: torch.Tensor, delta: float = DELTA) -> torch.Tensor:
    """pinv(M + δI) of a symmetric PSD M (fp64), via eigh with pinv's default cutoff."""
    lam, U = linalg.eigh(M)
    lam = lam + delta
    cutoff = M.shape[-1] * torch.finfo(lam.dtype).eps * lam.abs().max()
    inv = torch.where(lam.abs() > cutoff, 1.0 / lam, torch.zeros_like(lam))
    return (U * inv) @ U.T


def solve_sylvester_sym(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric PSD P (r×r), Q (r×r), in fp64.

    P = U diag(λ) Uᵀ, Q = V diag(μ) Vᵀ ⇒ X = U [(Uᵀ C V) / (λ_i + μ_j)] Vᵀ; entries whose
    denominator vanishes (both matrices singular in those directions) are set to 0.
    """
    lam, U = linalg.eigh(P)
    mu, V = linalg.eigh(Q)
    denom = lam[:, None] + mu[None, :]
    tiny = torch.finfo(denom.dtype).eps * max(float(denom.abs().max()), 1e-300)
    F = U.T @ C.to(torch.float64) @ V
    Y = torch.where(denom.abs() > tiny, F / denom, torch.zeros_like(F))
    return U @ Y @ V.T


def lora_pro_gradients(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scale: float,
    x_mode: str = "sylvester",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g̃_A, g̃_B) of LoRA-Pro from the raw LoRA gradients (see the module docstring).

    Computed in fp64, returned in the gradients' dtype.
    """
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")
    A64, B64 = A.detach().to(torch.float64), B.detach().to(torch.float64)
    gA, gB = grad_A.to(torch.float64), grad_B.to(torch.float64)
    s2 = scale * scale
    AAt, BtB = A64 @ A64.T, B64.T @ B64
    AAt_inv, BtB_inv = _sym_pinv(AAt), _sym_pinv(BtB)
    if x_mode == "sylvester":
        X = solve_sylvester_sym(BtB, AAt, -(BtB_inv @ gA @ A64.T) / s2)
    elif x_mode == "symmetry":
        X = -0.5 / s2 * (BtB_inv @ B64.T @ gB @ AAt)
    else:
        X = torch.zeros_like(BtB)
    new_A = (BtB_inv @ gA) / s2 + X @ A64
    # [I − B (BᵀB)⁻¹ Bᵀ] g_B without forming the (out × out) projector
    proj_gB = gB - B64 @ (BtB_inv @ (B64.T @ gB))
    new_B = (proj_gB @ AAt_inv) / s2 - B64 @ X
    return new_A.to(grad_A.dtype), new_B.to(grad_B.dtype)


@register_method(
    "lora_pro", summary="LoRA-Pro (Wang et al. 2024): LoRA gradients rewritten to match full fine-tuning"
)
class LoRAPro(LoRABase):
    """Plain LoRA whose (A, B) gradients are rewritten before each optimizer step."""

    config_cls = LoRAProConfig
    config: LoRAProConfig
    layer_kinds = frozenset({"linear", "conv1d"})
    has_rules = True

    def before_step(self, state: RuleState) -> None:
        """Replace A.grad, B.grad by LoRA-Pro's g̃_A, g̃_B (no-op if either is missing)."""
        if self.A.grad is None or self.B.grad is None:
            return
        new_A, new_B = lora_pro_gradients(self.A, self.B, self.A.grad, self.B.grad, self.scale,
                                          self.config.x_mode)
        self.A.grad.copy_(new_A)
        self.B.grad.copy_(new_B)

