"""LoRA-GGPO: LoRA trained under a gradient-guided random weight perturbation (Chang et al.,
arXiv 2502.14538 v1).

    inference:  y = W x + b + s · B A x                         (plain LoRA, s = α/r)
    training:   y = (W + s·BA + ε) x + b,   ε_i,: ~ N(0, σ_i² I),
                σ_i = ρ · (a ‖W'_i,:‖ + (1 − a) ‖G_i,:‖) / √d_in

W' = W + s·BA is the merged weight at the step, G = ∂L/∂W' of the *previous* optimizer step
(0 before the first) and i runs over output rows: a per-row scale from weight norms and
gradient norms that steers training toward flat minima without SAM's second forward/backward.
One ε is drawn per optimizer step (shared by its micro-batches) from a CPU generator seeded by
(layer seed, step), never the global RNG. ε enters as an extra branch ``ε x`` of the output,
so the stored weights are never modified: the perturbation is "removed" exactly (weights after
a step = weights before + the optimizer's update, computed at the perturbed point). ε is a leaf
requiring grad, so autograd accumulates ``ε.grad = ∂L/∂W'`` over the step's micro-batches; the
rule (after each optimizer step, `rankwise.adapt.attach_rules`; training without it raises)
keeps its row norms for the next step's σ and drops ε. Costs one dense (out × in) matmul per
forward and per backward, and two (out × in) tensors per layer while training.

Choices (not fixed by the paper; the official code github.com/llm172/LoRA-GGPO was not
available): the formula above (our reading, Flat-LoRA-style row scaling), ρ = 0.05, a = 0.5,
perturbation of the merged weight (not of A/B), no perturbation in eval mode or without grad.
Params/layer and merge: LoRA's (the perturbation is never merged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rankwise.adapt.context import InitContext, layer_seed
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import register_method
from rankwise.adapt.methods.lora import LoRABase, LoRAConfig
from rankwise.config import option
from rankwise.linalg import make_generator

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.rules import RuleState


@dataclass(frozen=True, kw_only=True)
class LoRAGGPOConfig(LoRAConfig):
    """LoRA-GGPO options: LoRA's and the perturbation fields below."""

    rho: float = option(0.05, "ρ, the perturbation radius relative to the row norms")
    mix: float = option(0.5, "a ∈ [0, 1], the weight of the weight-norm term (1 − a: "
                        "gradient-norm term)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rho, int | float) or not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {self.rho!r}")
        if not isinstance(self.mix, int | float) or not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {self.mix!r}")


def perturbation_std(weight_rows: torch.Tensor, grad_rows: torch.Tensor, rho: float, mix: float,
                     in_features: int) -> torch.Tensor:
    """σ_i = ρ (a ‖W'_i‖ + (1 − a) ‖G_i‖) / √d_in from row norms (out,)."""
    return rho * (mix * weight_rows + (1.0 - mix) * grad_rows) / math.sqrt(in_features)


@register_method(
    "lora_ggpo", summary="LoRA-GGPO (Chang et al. 2025): LoRA under a gradient-guided weight perturbation"
)
class LoRAGGPO(LoRABase):
    """LoRA with a per-step random perturbation of the merged weight while training."""

    config_cls = LoRAGGPOConfig
    config: LoRAGGPOConfig
    layer_kinds = frozenset({"linear", "conv1d"})
    has_rules = True

    def __init__(self, config: LoRAGGPOConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.noise_seed = 0
        self.perturbation: torch.Tensor | None = None  # ε of the current step (a leaf)
        # ‖G_i,:‖ of the last step: a saved buffer, so a resumed run draws the same σ
        self.register_buffer("grad_row_norms", torch.zeros(self.out_features, dtype=self.A.dtype,
                                                           device=self.A.device))

    def initialize(self, ctx: InitContext) -> None:
        super().initialize(ctx)
        self.noise_seed = layer_seed(ctx.seed, ctx.fqn + "/ggpo")

    def extra_state(self) -> dict[str, Any]:
        return {"noise_seed": self.noise_seed}

    @classmethod
    def from_saved(cls, config: LoRAGGPOConfig, geometry: Geometry, extra: dict[str, Any]
                   ) -> LoRAGGPO:
        method = cls(config, geometry)
        method.noise_seed = int(extra.get("noise_seed", 0))
        return method

    def row_std(self, weight: torch.Tensor) -> torch.Tensor:
        """σ (out,) of this step from the stored base weight (out, in) and the last G."""
        merged = weight.to(self.A.dtype) + self.delta_weight().detach()
        rows = torch.linalg.vector_norm(merged, dim=1)
        return perturbation_std(rows, self.grad_row_norms.to(rows), self.config.rho,
                                self.config.mix, self.in_features)

    def draw(self, weight: torch.Tensor) -> torch.Tensor:
        """ε (out, in) of the current step: row i ~ N(0, σ_i² I), seeded by (seed, step); the step
        is `rule_steps` (optimizer steps run, restored on resume)."""
        gen = make_generator((self.noise_seed * 1_000_003 + self.rule_steps) % (2**63 - 1))
        noise = torch.randn(self.out_features, self.in_features, generator=gen,
                            dtype=torch.float64).to(device=self.A.device, dtype=self.A.dtype)
        return noise * self.row_std(weight)[:, None]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        out = base_out + self.lora_branch(x, geo).to(base_out.dtype)
        if not (self.training and torch.is_grad_enabled()):
            return out
        if self.perturbation is None:
            self.perturbation = self.draw(geo.compute_weight()).requires_grad_(True)
        eps = self.perturbation
        return out + geo.apply_in(x.to(eps.dtype), eps).to(base_out.dtype)

    def after_step(self, state: RuleState) -> None:
        """Keep ‖G_i‖ (G = ε.grad = ∂L/∂W') for the next σ; drop ε."""
        eps = self.perturbation
        if eps is not None and eps.grad is not None:
            self.grad_row_norms.copy_(torch.linalg.vector_norm(eps.grad.detach(), dim=1))
        self.perturbation = None
