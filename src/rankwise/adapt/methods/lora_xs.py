"""LoRA-XS: a trainable r×r matrix between frozen SVD bases (Bałazy et al., arXiv 2405.17604).

    y = W x + b + s · B R A dropout(x),   B = U_r (out, r),  A = Σ_r V_rᵀ (r, in),  R (r, r)

B and A come from the truncated SVD of W (official ``find_and_initialize``, init "svd_on_w":
orthonormal columns in B, singular values in A) and stay frozen; only R trains: r² parameters
per layer, independent of the layer size. W is not modified.

Init: R ~ N(0, σ = 1e-5) as the official code (``init="svd"``), so the adapter is a no-op only
up to ‖s·BRA‖₂ ≤ s·σ₁·‖R‖₂; ``init="zero"`` starts from R = 0 (exactly a no-op; R still gets a
gradient, s·Bᵀ G Aᵀ, since B and A are nonzero).

Choices: the official scripts take α from a PEFT LoraConfig we could not read (not fixed by the paper);
``alpha=None`` (default) means s = 1 (α = r). A and B are saved with the adapter (r(out + in)
values), so a load never depends on SVD sign conventions. `LoRASB` (lora_sb.py) reuses this
class with bases from the first gradient instead of W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import (
    AdapterMethod,
    MethodConfig,
    dropout_option,
    register_method,
)
from rankwise.config import option


@dataclass(frozen=True, kw_only=True)
class LoRAXSConfig(MethodConfig):
    """LoRA-XS options."""

    rank: int = option(8, "r (R is r × r)")
    alpha: float | None = option(None, "α, scale s = α/r; None (default) for s = 1")
    dropout: float = dropout_option(0.0)
    init: str = option("svd", "\"svd\" (R ~ N(0, r_std²), official) or \"zero\" (R = 0, an exact "
                       "no-op)")
    r_std: float = option(1e-5, "standard deviation of the \"svd\" init of R (official 1e-5)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is not None and (not isinstance(self.alpha, int | float)
                                       or not math.isfinite(self.alpha) or self.alpha == 0):
            raise ValueError(f"alpha must be None or a finite nonzero number, got {self.alpha!r}")
        if self.init not in ("svd", "zero"):
            raise ValueError(f"init must be 'svd' or 'zero', got {self.init!r}")
        if not isinstance(self.r_std, int | float) or not self.r_std >= 0:
            raise ValueError(f"r_std must be a number >= 0, got {self.r_std!r}")

    @property
    def scale(self) -> float:
        """s = α/r, or 1 when α is None."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@register_method(
    "lora_xs", summary="LoRA-XS (Bałazy et al. 2024): trainable r x r matrix between frozen SVD bases"
)
class LoRAXS(AdapterMethod):
    """Frozen A (r, in), B (out, r); trainable R (r, r); forward base + s·B R A x."""

    config_cls = LoRAXSConfig
    config: LoRAXSConfig

    def __init__(self, config: LoRAXSConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        r = config.rank
        self.R = nn.Parameter(torch.zeros(r, r, dtype=dtype, device=device))
        self.register_buffer("A", torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.scale = config.scale
        self.dropout = self.input_dropout(config.dropout)

    def initialize(self, ctx: InitContext) -> None:
        """B = U_r, A = Σ_r V_rᵀ from the SVD of W; R ~ N(0, r_std²) or 0."""
        U, S, Vh = ctx.svd(self.config.rank)
        with torch.no_grad():
            self.B.copy_(U)
            self.A.copy_(S[:, None] * Vh)
            self._init_R(ctx)

    def _init_R(self, ctx: InitContext) -> None:
        if self.config.init == "zero":
            self.R.zero_()
        else:
            self.R.copy_(self.config.r_std * torch.randn(self.R.shape, generator=ctx.generator))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B R A (out, in)."""
        return self.scale * (self.B @ self.R @ self.A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        h = geo.apply_in(self.dropout(x.to(self.A.dtype)), self.A)  # (.., r)
        return base_out + (self.scale * geo.apply_features(h, self.B @ self.R)).to(base_out.dtype)
