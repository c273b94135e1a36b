"""PiSSA: principal singular values and vectors adaptation (Meng et al., arXiv 2404.02948).

LoRA whose factors start at the top-r SVD part of W, on a residual base:

    W = U Σ Vᵀ,   S_r = Σ[:r] / s,   B = U_r diag(√S_r) (out, r),   A = diag(√S_r) V_rᵀ (r, in)
    W_res = W − s·B A = U_{>r} Σ_{>r} V_{>r}ᵀ,   y = W_res x + b + s·B A x

Dividing by the LoRA scale s (PEFT ``pissa_init``) makes s·BA = U_r Σ_r V_rᵀ for any α.
``niter=K`` uses a randomized SVD with K power iterations, oversampled (rankwise.linalg): the
same idea as PEFT's ``pissa_niter_K`` and closer to the exact SVD, but not equal to PEFT's.

The stored base weight is W_res (as in PEFT, which overwrites it). Unlike PEFT, we keep the
initial factors A₀, B₀ (frozen buffers, r(out + in) values), so the original W = W_res +
s·B₀A₀ is always recoverable: `disable_adapter` gives the original model, `unload_` restores
it, a saved adapter loads onto the *original* base (the residual is recomputed from A₀, B₀,
no SVD needed), and the PEFT export can convert to a plain rank-2r LoRA on the original W:
ΔW = s(BA − B₀A₀) = s [B, −B₀] [A; A₀] (see peft_io).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import register_method
from rankwise.adapt.methods.lora import LoRABase, LoRAConfig
from rankwise.config import option


@dataclass(frozen=True, kw_only=True)
class PiSSAConfig(LoRAConfig):
    """PiSSA options: LoRA's and `niter`."""

    niter: int | None = option(
        None, "None for an exact SVD (PEFT ``init_lora_weights=\"pissa\"``); K for a randomized "
        "SVD with K power iterations, oversampled (like PEFT ``\"pissa_niter_K\"``, more "
        "accurate, not equal to it; seconds instead of minutes on large layers)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 0:
            raise ValueError(f"PiSSA needs alpha > 0 (it takes √(Σ/s)), got {self.alpha}")
        if self.niter is not None and (not isinstance(self.niter, int) or self.niter < 0):
            raise ValueError(f"niter must be None (exact SVD) or an int >= 0, got {self.niter!r}")


@register_method(
    "pissa", summary="PiSSA (Meng et al. 2024): LoRA from the top singular triplets, residual base"
)
class PiSSA(LoRABase):
    """LoRA initialised from the top-r singular triplets; the base holds the residual."""

    config_cls = PiSSAConfig
    mutates_base = True

    def __init__(self, config: PiSSAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.register_buffer("A_init", torch.zeros_like(self.A.detach()))  # (r, in)
        self.register_buffer("B_init", torch.zeros_like(self.B.detach()))  # (out, r)

    def initialize(self, ctx: InitContext) -> None:
        """A, B from the top-r SVD of W (fp32), balanced by √(Σ_r / s); A₀, B₀ = A, B."""
        r = self.config.rank
        U, S, Vh = ctx.svd(r, niter=self.config.niter)  # (out, r), (r,), (r, in)
        root = torch.sqrt(S[:r] / self.scale)
        with torch.no_grad():
            self.A.copy_(root[:, None] * Vh[:r])
            self.B.copy_(U[:, :r] * root[None, :])
            self.A_init.copy_(self.A)
            self.B_init.copy_(self.B)

    def offset_weight(self) -> torch.Tensor:
        """s·B₀A₀ (out, in) = W − W_res."""
        return self.scale * (self.B_init @ self.A_init)
