"""SALT: singular value adaptation with a low-rank transformation (BioMedIA-MBZUAI).

Thin SVD ``W = U Σ Vᵀ`` (k = min(out, in)). The adapted weight is

    W' = U · ReLU(S') · Vᵀ,   S' = [[diag(a ⊙ σ_{1..r} + c), 0], [0, diag(σ_{r+1..k}) + X Y]]

with trainable scale a (r,), shift c (r,) on the top r singular values and a LoRA X ((k−r), r_L),
Y (r_L, (k−r)) on the remaining block: 2r + 2·r_L·(k − r) parameters per layer. The ReLU acts
element-wise on the whole matrix, as the public layer code does (off-diagonal entries of X Y
included). The base weight is not modified; the forward adds U (ReLU(S') − Σ) Vᵀ x, which is
exactly 0 at a = 1, c = 0, X Y = 0 (σ ≥ 0, so ReLU(Σ) = Σ).

Init (public code): a = 1, c = 0, X, Y ~ N(0, 0.01²) (drawn from the layer's seeded generator,
not ``torch.manual_seed(42)``), so the adapter starts ~1e-4 away from a no-op.
``init="noop"`` keeps X ~ N(0, 0.01²) and sets Y = 0: an exact no-op that still trains.

Regularizer (public layer): ``‖diag(aσ + c) − diag(σ)‖_F + ‖X Y‖_F``; its weight in the loss is
not fixed by the paper, so ``reg_weight`` defaults to 0 (off). With ``reg_weight > 0`` the method
carries a training rule (`rankwise.adapt.attach_rules` adds the term's gradient at every optimizer step).

Choices: U, Σ, V are not saved (they would be ~2× the weight); loading recomputes the SVD of the
original base weight, with signs made deterministic (the largest-magnitude entry of each column
of U is positive), so a reload reproduces the outputs to SVD round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, MethodConfig, check_integer, register_method
from rankwise.config import option


@dataclass(frozen=True, kw_only=True)
class SALTConfig(MethodConfig):
    """SALT options."""

    rank: int = option(8, "r, top singular values given a trainable scale and shift")
    lora_rank: int = option(4, "r_L of the low-rank update of the remaining (k − r) block "
                            "(README: 4)")
    init: str = option("official", "\"official\" (X, Y ~ N(0, 0.01²)) or \"noop\" (Y = 0: exact "
                       "no-op at init)")
    reg_weight: float = option(0.0, "weight of the regularizer in the loss (0: off; > 0 needs "
                               "attach_rules)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("lora_rank", self.lora_rank, minimum=0)
        if self.init not in ("official", "noop"):
            raise ValueError(f"init must be 'official' or 'noop', got {self.init!r}")
        if not isinstance(self.reg_weight, int | float) or not self.reg_weight >= 0:
            raise ValueError(f"reg_weight must be a number >= 0, got {self.reg_weight!r}")


def canonical_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U (m, k), S (k,), Vh (k, n)) with the largest-|.| entry of each U column > 0."""
    from rankwise import linalg

    U, S, Vh = linalg.svd(weight)
    rows = U.abs().argmax(dim=0)
    signs = torch.sign(U[rows, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, S, Vh * signs[:, None]


@register_method(
    "salt", summary="SALT: scale/shift of the top singular values plus LoRA on the rest"
)
class SALT(AdapterMethod):
    """Scale/shift of the top-r singular values + LoRA on the rest of the spectrum."""

    config_cls = SALTConfig
    config: SALTConfig

    def __init__(self, config: SALTConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        r, k, r_l = config.rank, min(self.out_features, self.in_features), config.lora_rank
        self.k = k
        kw = dict(dtype=dtype, device=device)
        self.sv_scale = nn.Parameter(torch.ones(r, **kw))  # a
        self.sv_shift = nn.Parameter(torch.zeros(r, **kw))  # c
        self.X = nn.Parameter(torch.zeros(k - r, r_l, **kw))
        self.Y = nn.Parameter(torch.zeros(r_l, k - r, **kw))
        self.register_buffer("U", None, persistent=False)  # (out, k), recomputed from W
        self.register_buffer("S", None, persistent=False)  # (k,)
        self.register_buffer("Vh", None, persistent=False)  # (k, in)
        self.has_rules = config.reg_weight > 0  # type: ignore[misc]

    def _set_svd(self, weight: torch.Tensor) -> None:
        U, S, Vh = canonical_svd(weight)
        like = self.sv_scale
        self.U, self.S, self.Vh = (t.to(device=like.device, dtype=like.dtype) for t in (U, S, Vh))

    def initialize(self, ctx: InitContext) -> None:
        """SVD of W; a = 1, c = 0, X, Y ~ N(0, 0.01²) (Y = 0 with init="noop")."""
        self._set_svd(ctx.weight())
        with torch.no_grad():
            self.sv_scale.fill_(1.0)
            self.sv_shift.zero_()
            self.X.copy_(0.01 * torch.randn(self.X.shape, generator=ctx.generator))
            y = 0.01 * torch.randn(self.Y.shape, generator=ctx.generator)
            self.Y.copy_(y if self.config.init == "official" else torch.zeros_like(y))

    def after_load(self, geometry: Geometry) -> None:
        """Recompute the SVD of the original base weight (not saved)."""
        self._set_svd(geometry.compute_weight())

    def spectrum_change(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ReLU(aσ + c) − σ (r,), ReLU(diag(σ_rest) + X Y) − diag(σ_rest) (k−r, k−r))."""
        r = self.config.rank
        top, rest = self.S[:r], self.S[r:]
        d_top = torch.relu(self.sv_scale * top + self.sv_shift) - top
        block = torch.diag(rest) + self.X @ self.Y
        return d_top, torch.relu(block) - torch.diag(rest)

    def delta_weight(self) -> torch.Tensor:
        """U (ReLU(S') − Σ) Vᵀ (out, in)."""
        r = self.config.rank
        d_top, d_rest = self.spectrum_change()
        return (self.U[:, :r] * d_top) @ self.Vh[:r] + self.U[:, r:] @ d_rest @ self.Vh[r:]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        r = self.config.rank
        d_top, d_rest = self.spectrum_change()
        h = F.linear(x.to(self.U.dtype), self.Vh)  # (.., k) = Vᵀ x
        h = torch.cat([h[..., :r] * d_top, F.linear(h[..., r:], d_rest)], dim=-1)
        return base_out + F.linear(h, self.U).to(base_out.dtype)

    def salt_penalty(self) -> torch.Tensor:
        """‖diag(aσ + c) − diag(σ)‖_F + ‖X Y‖_F (the public layer's regularizer)."""
        top = self.S[: self.config.rank]
        shift = torch.linalg.vector_norm(self.sv_scale * top + self.sv_shift - top)
        return shift + torch.linalg.matrix_norm(self.X @ self.Y)

    def regularizer(self) -> torch.Tensor | None:
        w = self.config.reg_weight
        return w * self.salt_penalty() if w > 0 else None
