"""LoRA-SB: LoRA-XS initialised from the first full fine-tuning step (Ponkshe, Singhal et al.,
arXiv 2411.19557).

Architecture: LoRA-XS, ``y = W x + b + s · B R A x`` with only R (r, r) trained. Init:

1. estimate the first (Adam-like) full fine-tuning update of W from the summed gradient of the
   calibration data (official ``utils/gradient_utils.py``): ``ΔW_est = −lr · sign(Σ g)``
   (`first_update_estimate`); the sum runs over the batches passed to ``adapt_(data=...)``;
2. truncated SVD ``ΔW_est ≈ U_r S_r V_rᵀ``; B = U_r, A = V_rᵀ (orthonormal bases) and
   R = diag(S_r)/s, so that ``s·B R A`` is the best rank-r approximation of ΔW_est
   (Eckart–Young) for any α.

With orthonormal B and A, a gradient step on R moves W by ``−η s² B Bᵀ G Aᵀ A``: the full
gradient G projected onto both subspaces (the paper's equivalent-gradient view).

Choices (not fixed by the paper: the official init module is not public): the placement
B = U_r, R = S_r/s, A = V_rᵀ above; and by default W is left unchanged, so at init the model is
W + (rank-r approximation of one full fine-tuning step), not the base model.
``noop_init=True`` instead stores W − s·B R₀ A as the base (like PiSSA's residual), so the
adapted model starts equal to the base; the original W stays recoverable (`unload_`).
``init_lr`` is the step size of the estimate (default 1e-3, our choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import register_method
from rankwise.adapt.methods.lora_xs import LoRAXS, LoRAXSConfig
from rankwise.config import option


def first_update_estimate(grad: torch.Tensor, lr: float) -> torch.Tensor:
    """ΔW_est = −lr · sign(Σ g) (out, in): the first Adam step of full fine-tuning."""
    if not torch.isfinite(grad).all():
        raise ValueError("the gradient holds NaN/inf: check the calibration data and loss")
    return -lr * torch.sign(grad)


@dataclass(frozen=True, kw_only=True)
class LoRASBConfig(LoRAXSConfig):
    """LoRA-SB options: LoRA-XS's (``init``/``r_std`` unused) and the first-step fields below."""

    init_lr: float = option(1e-3, "learning rate of the first-step estimate −lr·sign(Σg)")
    noop_init: bool = option(False, "store W − s·B R₀ A as the base so the adapted model starts "
                             "at the base model")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_lr, int | float) or not math.isfinite(self.init_lr) \
                or self.init_lr <= 0:
            raise ValueError(f"init_lr must be a finite number > 0, got {self.init_lr!r}")


@register_method(
    "lora_sb", summary="LoRA-SB (Ponkshe et al. 2024): LoRA-XS initialised from the first full-FT step"
)
class LoRASB(LoRAXS):
    """LoRA-XS whose B, R, A are the truncated SVD of the estimated first full-FT update."""

    config_cls = LoRASBConfig
    config: LoRASBConfig
    needs = frozenset({"gradient"})

    def __init__(self, config: LoRASBConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.mutates_base = config.noop_init  # type: ignore[misc]
        self.register_buffer("R_init", torch.zeros_like(self.R.detach()))  # (r, r)

    def initialize(self, ctx: InitContext) -> None:
        """B, R, A from the truncated SVD of −lr·sign(Σ ∂L/∂W)."""
        from rankwise import linalg

        estimate = first_update_estimate(ctx.gradient(), self.config.init_lr)
        U, S, Vh = linalg.truncated_svd(estimate.to(ctx.weight().dtype), self.config.rank)
        with torch.no_grad():
            self.B.copy_(U)
            self.A.copy_(Vh)
            self.R.copy_(torch.diag(S) / self.scale)
            self.R_init.copy_(self.R)

    def offset_weight(self) -> torch.Tensor | None:
        """s·B R₀ A with ``noop_init`` (the base then holds W − s·B R₀ A), else None."""
        if not self.config.noop_init:
            return None
        return self.scale * (self.B @ self.R_init @ self.A)
