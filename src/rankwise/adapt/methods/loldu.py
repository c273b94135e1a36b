"""LoLDU: train the diagonal of an LDU factorisation of W (arXiv 2410.13618).

    W = P L U (partial pivoting),   D = diag(U),   Ũ = D⁻¹ U (unit diagonal)
    W_res = W − σ · P L_r diag(z₀) Ũ_r,   W_eff = W_res + σ · P L_r diag(z) Ũ_r,   y = W_eff x + b

with L_r = L[:, :r] (out, r), Ũ_r = Ũ[:r] (r, in), z₀ = D[:r] and σ = α/r (official
``from_linear``: α = 1). Only z (r,) trains (the official ``get_loldu_params`` selects only
``vector_z``; σ is frozen): r parameters per layer. z starts at z₀ (``init_method="lu"``), so
W_eff = W at init. The stored base weight is W_res (PiSSA-style); P is kept as a permutation
index vector (`rankwise.linalg.lu`), not as the official dense out×out matrix.

Robustness (tested on rank-deficient and ill-conditioned W): the LU runs in fp32 and is redone in fp64 when a kept pivot is zero
or Ũ_r would overflow; a pivot that is still exactly zero (a rank-deficient leading block)
keeps its row of U unnormalised with z₀_i = 1, so P L_r diag(z₀) Ũ_r is unchanged and every
tensor stays finite (that row of Ũ_r then lacks the unit diagonal).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, MethodConfig, check_alpha, register_method
from rankwise.config import option

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoLDUConfig(MethodConfig):
    """LoLDU options."""

    rank: int = option(8, "r, leading LDU components trained (README example: 15)")
    alpha: float = option(1.0, "α; σ = α/r (official default α = 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)


def ldu_factors(weight: torch.Tensor, rank: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm (out,), L_r (out, r), Ũ_r (r, in), z₀ (r,)) with W = (L diag(D) Ũ)[perm] and the
    first r terms as described in the module docstring; factors cast to `dtype`."""
    from rankwise.linalg.lu import lu

    def attempt(w: torch.Tensor):
        perm, L, U = lu(w)
        d = torch.diagonal(U)[:rank]
        with torch.no_grad():
            unit = (U[:rank] / d[:, None]).to(dtype)
        ok = (d != 0) & torch.isfinite(unit).all(dim=1)
        return perm, L, U, d, unit, ok

    perm, L, U, d, unit, ok = attempt(weight)
    if not ok.all() and weight.dtype != torch.float64:
        logger.info("LoLDU: zero or tiny pivot in the fp32 LU; redoing it in fp64")
        perm, L, U, d, unit, ok = attempt(weight.double())
    if not ok.all():
        logger.warning("LoLDU: %d zero pivot(s) among the first %d; those rows of U stay "
                       "unnormalised (z0 = 1)", int((~ok).sum()), rank)
        unit = torch.where(ok[:, None], unit, U[:rank].to(dtype))
        d = torch.where(ok, d, torch.ones_like(d))
    return perm, L[:, :rank].to(dtype), unit, d.to(dtype)


@register_method(
    "loldu", summary="LoLDU (Shi et al. 2024): train the diagonal of an LDU factorisation of W"
)
class LoLDU(AdapterMethod):
    """Trainable diagonal z (r,) between frozen P, L_r and unit-diagonal Ũ_r; residual base."""

    config_cls = LoLDUConfig
    config: LoLDUConfig
    mutates_base = True

    def __init__(self, config: LoLDUConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        r, m, n = config.rank, self.out_features, self.in_features
        kw = dict(dtype=dtype, device=device)
        self.z = nn.Parameter(torch.zeros(r, **kw))
        self.register_buffer("perm", torch.arange(m, device=device))  # (out,) int64: P
        self.register_buffer("L", torch.zeros(m, r, **kw))  # (out, r) unit lower
        self.register_buffer("U", torch.zeros(r, n, **kw))  # (r, in) unit diagonal
        self.register_buffer("z0", torch.zeros(r, **kw))  # (r,) D[:r]
        self.sigma = config.alpha / r

    def initialize(self, ctx: InitContext) -> None:
        """LDU of W (see the module docstring); z = z₀ = D[:r]."""
        perm, L, U, z0 = ldu_factors(ctx.weight(), self.config.rank, self.z.dtype)
        with torch.no_grad():
            self.perm.copy_(perm)
            self.L.copy_(L)
            self.U.copy_(U)
            self.z0.copy_(z0)
            self.z.copy_(z0)

    def _product(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma * ((self.L * z) @ self.U)[self.perm]  # σ · P L_r diag(z) Ũ_r

    def delta_weight(self) -> torch.Tensor:
        """σ · P L_r diag(z) Ũ_r (out, in): the update over the stored residual base."""
        return self._product(self.z)

    def offset_weight(self) -> torch.Tensor:
        """σ · P L_r diag(z₀) Ũ_r = W − W_res (out, in)."""
        return self._product(self.z0)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        t = F.linear(F.linear(x.to(self.U.dtype), self.U) * self.z, self.L)  # (.., out) = L z Ũ x
        return base_out + (self.sigma * t.index_select(-1, self.perm)).to(base_out.dtype)
