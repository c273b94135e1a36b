"""SVFit: fine-tune the top-r singular values of W (arXiv: SVFit, "Parameter-Efficient
Fine-Tuning of Large Pre-Trained Models Using Singular Values").

    W = U Σ Vᵀ,   W_res = W − U_r Σ_r V_rᵀ,   W_eff = W_res + U_r diag(σ') V_rᵀ,   y = W_eff x + b

U_r (out, r), V_rᵀ (r, in) and W_res are frozen; σ' (r,) trains: r parameters per layer. σ'
starts at σ_1..σ_r, so W_eff = W at init. The stored base weight is W_res (PiSSA-style; the
original W = W_res + U_r diag(σ₀) V_rᵀ stays recoverable, σ₀ kept as a frozen buffer).

Choices (not fixed by the paper; only the abstract is public): σ' is trained *directly* (not as a
multiplicative or additive correction); r is fixed by ``rank``, or, with ``energy`` (e.g. 0.99,
the abstract's "over 99 % of the matrix's information"), chosen per layer as the smallest r whose
top singular values hold that fraction of Σσ² (``rank`` is then ignored); the chosen rank is
saved with the adapter. U_r, V_r are saved (r(out + in) values), so loading needs no SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, MethodConfig, register_method
from rankwise.config import option


@dataclass(frozen=True, kw_only=True)
class SVFitConfig(MethodConfig):
    """SVFit options."""

    rank: int = option(
        8, "r, the number of top singular values trained (ignored when `energy` is set)")
    energy: float | None = option(None, "None, or a fraction in (0, 1]: per layer, the smallest "
                                  "r with Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.energy is not None and not (isinstance(self.energy, int | float)
                                            and 0 < self.energy <= 1):
            raise ValueError(f"energy must be None or in (0, 1] (e.g. 0.99), got {self.energy!r}")


@register_method(
    "svfit", summary="SVFit: fine-tune the top-r singular values of W over a residual base"
)
class SVFit(AdapterMethod):
    """Trainable singular values σ' (r,) over frozen U_r, V_rᵀ and a residual base."""

    config_cls = SVFitConfig
    config: SVFitConfig
    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})
    mutates_base = True

    def __init__(self, config: SVFitConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self._dtype = self.param_dtype(geometry)
        self._device = geometry.module.weight.device
        if config.energy is None:
            self.check_rank(config.rank)
        self._allocate(config.rank if config.energy is None else 0)

    def _allocate(self, rank: int) -> None:
        """(Re)create the tensors for rank r (a data-chosen rank is known only at init/load)."""
        kw = dict(dtype=self._dtype, device=self._device)
        self.rank = rank
        self.sigma = nn.Parameter(torch.zeros(rank, **kw))  # (r,) trainable σ'
        self.register_buffer("U", torch.zeros(self.out_features, rank, **kw))  # (out, r)
        self.register_buffer("Vh", torch.zeros(rank, self.in_features, **kw))  # (r, in)
        self.register_buffer("sigma0", torch.zeros(rank, **kw))  # (r,) σ_1..σ_r of W

    def initialize(self, ctx: InitContext) -> None:
        """U_r, V_rᵀ, σ₀ = σ' = σ_1..σ_r from the SVD of W (r from `energy` if set)."""
        if self.config.energy is None:
            U, S, Vh = ctx.svd(self.config.rank)
            rank = self.config.rank
        else:
            from rankwise import linalg

            U, S, Vh = ctx.svd(None)
            rank = linalg.rank_for_energy(S, self.config.energy)
            self._allocate(rank)
        with torch.no_grad():
            self.U.copy_(U[:, :rank])
            self.Vh.copy_(Vh[:rank])
            self.sigma0.copy_(S[:rank])
            self.sigma.copy_(S[:rank])

    def extra_state(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def from_saved(cls, config: SVFitConfig, geometry: Geometry, extra: dict[str, Any]) -> SVFit:
        method = cls(config, geometry)
        rank = extra.get("rank", config.rank)
        method.check_rank(rank)
        method._allocate(int(rank))
        return method

    def delta_weight(self) -> torch.Tensor:
        """U_r diag(σ') V_rᵀ (out, in): the update over the stored residual base."""
        return (self.U * self.sigma) @ self.Vh

    def offset_weight(self) -> torch.Tensor:
        """U_r diag(σ₀) V_rᵀ = W − W_res (out, in)."""
        return (self.U * self.sigma0) @ self.Vh

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        h = geo.scale_features(geo.apply_in(x.to(self.U.dtype), self.Vh), self.sigma)
        return base_out + geo.apply_features(h, self.U).to(base_out.dtype)
