"""AdaLoRA: SVD-form LoRA whose rank budget is allocated by importance during training (Zhang et
al., ICLR 2023, arXiv 2303.10512).

    y = W x + b + c · P diag(Λ) Q dropout(x),   c = α / (N + 1e-5)

PEFT names: Q = ``A`` (r, in), Λ = ``E`` (r,), P = ``B`` (out, r); N = the initial rank r
(never changed by masking); α = ``alpha`` (if α ≤ 0: r). Init: A, B ~ N(0, 0.02²), E = 0, a
no-op (PEFT ``init_lora_weights=True`` / the original loralib). Params/layer r·(in + out + 1).

Training rules (`rankwise.adapt.attach_rules`; training without them raises, unlike PEFT,
whose AdaLoRA silently becomes LoRA when ``update_and_allocate`` is forgotten):

* loss term ``orth_reg_weight · mean over all A and B matrices of the model of
  ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F`` (Frobenius norm, not squared), as its gradient before each step;
* after each step t (0-based, gradients still present): while t < T − tfinal the sensitivity
  ``s = |θ ⊙ ∇θ|`` of every entry of A, E, B updates ``Ī ← β1 Ī + (1 − β1) s`` and
  ``Ū ← β2 Ū + (1 − β2) |s − Ī|`` (with the updated Ī); the score of triplet i is
  ``Ī·Ū(E_i) + mean_j Ī·Ū(A_ij) + mean_j Ī·Ū(B_ji)``;
* budget `budget_schedule`: b0 = Σ r for t ≤ tinit, the target b_T = target_rank·#layers for
  t > T − tfinal, else ``⌊b_T + (b0 − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³⌋``; every
  ``delta_t`` steps of the cubic phase, E_i ← 0 for the triplets whose score is ≤ the
  (b0 − b(t))-th smallest over the whole model; at t = T − tfinal the mask of the target budget
  is fixed and re-applied every later step (PEFT's ``rank_pattern``).

T is ``total_steps`` of `attach_rules` (or the config's ``total_step``). Defaults are PEFT's
AdaLoraConfig: rank (init_r) 12, target_rank 8, α 8, tinit 0, tfinal 0, delta_t 1,
β1 = β2 = 0.85, orth_reg_weight 0.5. One choice: when b0 − b(t) ≤ 0 nothing is masked (PEFT's
``kthvalue(k=0)`` would fail there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.rules import RuleState


def _check_beta(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(MethodConfig):
    """AdaLoRA options (PEFT AdaLoraConfig names in parentheses)."""

    rank: int = option(12, "initial rank of every layer (``init_r``)")
    target_rank: int = option(8, "average rank kept at the end (``target_r``)")
    alpha: float = option(8.0, "α; c = α/(r + 1e-5) (α ≤ 0: c = r/(r + 1e-5))")
    dropout: float = dropout_option(0.0)
    tinit: int = option(0, "steps of the initial phase without budget change")
    tfinal: int = option(0, "steps of the final phase without budget change")
    delta_t: int = option(1, "mask every delta_t steps during the cubic phase (``deltaT``)")
    beta1: float = option(0.85, "EMA factor of the sensitivity")
    beta2: float = option(0.85, "EMA factor of the uncertainty")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality penalty")
    total_step: int | None = option(None, "T, if `attach_rules` is not given ``total_steps``")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.target_rank, int) or not 1 <= self.target_rank <= self.rank:
            raise ValueError(f"target_rank must be an integer in [1, rank={self.rank}], "
                             f"got {self.target_rank!r}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        for name in ("tinit", "tfinal"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise ValueError(f"delta_t must be an integer >= 1, got {self.delta_t!r}")
        _check_beta("beta1", self.beta1)
        _check_beta("beta2", self.beta2)
        if not isinstance(self.orth_reg_weight, int | float) or self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            check_schedule(self.total_step, self.tinit, self.tfinal)


def check_schedule(total: int, tinit: int, tfinal: int) -> None:
    """Raise unless the schedule leaves a budgeting phase: tinit < T − tfinal."""
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"AdaLoRA's total steps must be an integer >= 1, got {total!r}")
    if tinit >= total - tfinal:
        raise ValueError(
            f"AdaLoRA's schedule has no budgeting phase: tinit={tinit} >= total_steps "
            f"({total}) - tfinal ({tfinal}); lower tinit/tfinal or train longer"
        )


def budget_schedule(step: int, *, total: int, tinit: int, tfinal: int, init_budget: int,
                    target_budget: int) -> int:
    """b(t): init_budget for t ≤ tinit, target_budget for t > T − tfinal, cubic in between."""
    if step <= tinit:
        return init_budget
    if step > total - tfinal:
        return target_budget
    frac = 1.0 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * frac**3 + target_budget)


@register_method(
    "adalora", summary="AdaLoRA (Zhang et al. 2023): SVD-form LoRA, rank budget reallocated by importance"
)
class AdaLoRA(AdapterMethod):
    """P diag(Λ) Q update with importance-driven masking of the triplets (P_i, Λ_i, Q_i)."""

    config_cls = AdaLoRAConfig
    config: AdaLoRAConfig
    has_rules = True

    def __init__(self, config: AdaLoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        dtype, device = self.param_dtype(geometry), geometry.module.weight.device
        r = config.rank
        self.A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.E = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.scale = (config.alpha if config.alpha > 0 else float(r)) / (r + 1e-5)
        self.dropout = self.input_dropout(config.dropout)
        self.ipt: dict[str, torch.Tensor] = {}  # Ī per tensor name
        self.unc: dict[str, torch.Tensor] = {}  # Ū per tensor name
        self.fixed_mask: torch.Tensor | None = None  # kept triplets once the budget is final

    def initialize(self, ctx: InitContext) -> None:
        """A, B ~ N(0, 0.02²), E = 0 (a no-op)."""
        gen = ctx.generator
        with torch.no_grad():
            self.A.copy_(0.02 * torch.randn(self.A.shape, generator=gen))
            self.B.copy_(0.02 * torch.randn(self.B.shape, generator=gen))
            self.E.zero_()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = c · B diag(E) A (out, in)."""
        return self.scale * ((self.B * self.E) @ self.A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        h = geo.apply_in(self.dropout(x.to(self.A.dtype)), self.A) * self.E
        return base_out + (self.scale * geo.apply_features(h, self.B)).to(base_out.dtype)

    # ------------------------------------------------------------------ rules
    def orth_terms(self) -> list[torch.Tensor]:
        """[‖AAᵀ − I‖_F, ‖BᵀB − I‖_F]."""
        eye = torch.eye(self.config.rank, dtype=self.A.dtype, device=self.A.device)
        return [torch.linalg.matrix_norm(self.A @ self.A.T - eye),
                torch.linalg.matrix_norm(self.B.T @ self.B - eye)]

    @classmethod
    def group_regularizer(cls, methods: Sequence[AdapterMethod]) -> torch.Tensor | None:
        """orth_reg_weight · mean over every A and B of the model of the orthogonality terms."""
        terms = [m.config.orth_reg_weight * t  # type: ignore[attr-defined]
                 for m in methods for t in m.orth_terms()]  # type: ignore[attr-defined]
        return torch.stack([t.to(terms[0].dtype) for t in terms]).mean() if terms else None

    def update_importance(self) -> None:
        """EMA of the sensitivity |θ ⊙ ∇θ| and of its uncertainty, per entry."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, p in (("A", self.A), ("E", self.E), ("B", self.B)):
            if p.grad is None:
                continue
            s = (p.detach() * p.grad.detach()).abs()
            ipt = self.ipt.get(name, torch.zeros_like(s)) * b1 + (1 - b1) * s
            self.unc[name] = self.unc.get(name, torch.zeros_like(s)) * b2 \
                + (1 - b2) * (s - ipt).abs()
            self.ipt[name] = ipt

    def triplet_scores(self) -> torch.Tensor:
        """score_i = Ī·Ū(E_i) + mean_j Ī·Ū(A_ij) + mean_j Ī·Ū(B_ji) (zeros before any update)."""
        if not self.ipt:
            return torch.zeros(self.config.rank, dtype=self.E.dtype, device=self.E.device)
        score = {n: self.ipt[n] * self.unc[n] for n in self.ipt}
        return score["E"] + score["A"].mean(dim=1) + score["B"].mean(dim=0)

    def apply_mask(self, keep: torch.Tensor) -> None:
        with torch.no_grad():
            self.E.masked_fill_(~keep, 0.0)

    @classmethod
    def group_after_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Importance update and global budget masking over every AdaLoRA layer."""
        ms: list[AdaLoRA] = list(methods)  # type: ignore[arg-type]
        cfg = ms[0].config
        total = state.total_steps if state.total_steps is not None else cfg.total_step
        if total is None:
            raise ValueError(
                "AdaLoRA's budget schedule needs the number of training steps: "
                "attach_rules(model, optimizer, total_steps=T) (a Trainer passes max_steps), "
                "or set total_step in the adapter config"
            )
        check_schedule(total, cfg.tinit, cfg.tfinal)
        t, end = state.step, total - cfg.tfinal
        if t < end:
            for m in ms:
                m.update_importance()
        if ms[0].fixed_mask is not None or t > end:
            if ms[0].fixed_mask is None:  # resumed past the end without a fixed pattern
                mask_to_budget(ms, cfg.target_rank * len(ms), fix=True)
            for m in ms:
                m.apply_mask(m.fixed_mask)  # type: ignore[arg-type]
            return
        if t <= cfg.tinit:
            return
        budget = budget_schedule(t, total=total, tinit=cfg.tinit, tfinal=cfg.tfinal,
                                 init_budget=sum(m.config.rank for m in ms),
                                 target_budget=cfg.target_rank * len(ms))
        if t == end:
            mask_to_budget(ms, budget, fix=True)
        elif t % cfg.delta_t == 0:
            mask_to_budget(ms, budget)

    def rank_pattern(self) -> list[bool]:
        """Which triplets are active (E_i ≠ 0)."""
        return (self.E.detach() != 0).tolist()

    def extra_state(self) -> dict[str, Any]:
        return {"rank_pattern": self.rank_pattern()}

    def rule_state(self) -> dict[str, Any]:
        """Importance EMAs and the fixed mask, for `AdapterRules.state_dict` (exact resume)."""
        return {"ipt": dict(self.ipt), "unc": dict(self.unc), "fixed_mask": self.fixed_mask}

    def load_rule_state(self, state: dict[str, Any]) -> None:
        dev = self.E.device
        self.ipt = {k: v.to(dev) for k, v in state.get("ipt", {}).items()}
        self.unc = {k: v.to(dev) for k, v in state.get("unc", {}).items()}
        mask = state.get("fixed_mask")
        self.fixed_mask = None if mask is None else mask.to(device=dev, dtype=torch.bool)


def mask_to_budget(methods: Sequence[AdaLoRA], budget: int, *, fix: bool = False
                   ) -> dict[int, torch.Tensor]:
    """E_i ← 0 for the triplets scoring ≤ the (b0 − budget)-th smallest score of all layers.

    Returns the kept-triplet masks by layer index; `fix` stores them as the final pattern.
    """
    scores = [m.triplet_scores() for m in methods]
    k = sum(s.numel() for s in scores) - budget
    keeps: dict[int, torch.Tensor] = {}
    if k <= 0:
        keeps = {i: torch.ones_like(s, dtype=torch.bool) for i, s in enumerate(scores)}
    else:
        flat = torch.cat([s.float().cpu() for s in scores])
        threshold = torch.kthvalue(flat, k).values
        for i, (m, s) in enumerate(zip(methods, scores, strict=True)):
            keeps[i] = s.float() > threshold.to(s.device)
            m.apply_mask(keeps[i])
    if fix:
        for i, m in enumerate(methods):
            m.fixed_mask = keeps[i]
    return keeps
