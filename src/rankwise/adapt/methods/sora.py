"""SoRA: sparse low-rank adaptation with a proximal gate (Ding et al., EMNLP 2023).

    y = W x + b + s · B (g ⊙ (A dropout(x))),   gate g (r,),   s = α/r

A, B as LoRA (A kaiming-uniform, B = 0: a no-op at init); g ~ N(0, 1) (official
``torch.randn(1, r)``; here from the layer's seeded generator). Training rules, run from the
optimizer's step hooks (`rankwise.adapt.attach_rules`; training without them raises):

* before each step: the L1 term ``λ₁ · mean |g|`` over *all* gates of the model (official
  ``compute_loss``) is added as its gradient ``λ₁ sign(g) / N`` to every gate's ``.grad``;
* after each step: the proximal soft-threshold ``g ← sign(g) · max(|g| − λ₂, 0)`` with a
  constant λ₂ (not multiplied by the learning rate). ``official_prox=True`` reproduces the
  official ``SparseAdamW`` sequence (subtract, add, then zero |g| < λ₂), whose dead zone is 2λ₂.

The official code steps the gates with a separate Adam without weight decay; here they sit in
the caller's optimizer, so put them in a group with ``weight_decay=0`` (`sora_param_groups`);
the rule warns once per optimizer when a gate is weight-decayed.

After training, `prune_to_lora_` drops zero-gate ranks and folds g into B: a plain LoRA of rank
nnz(g) (``B' = B[:, nz] diag(g[nz])``, ``A' = A[nz]``) with the same outputs.
Params: r·(in + out + 1) while training, nnz(g)·(in + out) after pruning.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, register_method
from rankwise.adapt.methods.lora import LoRA, LoRABase, LoRAConfig
from rankwise.config import option

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.rules import RuleState

_CHECKED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


@dataclass(frozen=True, kw_only=True)
class SoRAConfig(LoRAConfig):
    """SoRA options: LoRA's (α default 16 as the official LoraArguments) and the gate fields."""

    alpha: float = option(16.0, "α; the branch is scaled by α/r (α/√r with `use_rslora`); 16 as "
                          "the official LoraArguments")
    l1_weight: float = option(1e-3, "λ₁ of the loss term λ₁ · mean |g| (official "
                              "``sparse_lambda``)")
    threshold: float = option(1e-3, "λ₂ of the proximal step (official ``sparse_lambda_2``)")
    official_prox: bool = option(False, "reproduce the official three-step thresholding (dead "
                                 "zone 2λ₂)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("l1_weight", "threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def soft_threshold(g: torch.Tensor, lam: float, *, official: bool = False) -> torch.Tensor:
    """Proximal step of λ‖g‖₁: sign(g)·max(|g| − λ, 0); `official`: SoRA's sequence."""
    if not official:
        return torch.sign(g) * torch.clamp(g.abs() - lam, min=0)
    g = torch.where(g > lam, g - lam, g)
    g = torch.where(g < -lam, g + lam, g)
    return torch.where(g.abs() < lam, torch.zeros_like(g), g)


@register_method(
    "sora", summary="SoRA (Ding et al. 2023): LoRA with a proximally sparsified gate between A and B"
)
class SoRA(LoRABase):
    """LoRA with a trainable gate g (r,) between A and B, sparsified by a proximal step."""

    config_cls = SoRAConfig
    config: SoRAConfig
    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})
    has_rules = True

    def __init__(self, config: SoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.gate = nn.Parameter(torch.zeros(config.rank, dtype=self.A.dtype, device=self.A.device))

    def initialize(self, ctx: InitContext) -> None:
        """LoRA's A (kaiming), B = 0; g ~ N(0, 1)."""
        super().initialize(ctx)
        with torch.no_grad():
            self.gate.copy_(torch.randn(self.gate.shape, generator=ctx.generator))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B diag(g) A (out, in)."""
        return self.scale * ((self.B * self.gate) @ self.A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        h = geo.scale_features(geo.apply_in(self.dropout(x.to(self.A.dtype)), self.A), self.gate)
        return base_out + (self.scale * geo.apply_features(h, self.B)).to(base_out.dtype)

    # ------------------------------------------------------------------ rules
    @staticmethod
    def l1_penalty(methods: Sequence[SoRA]) -> torch.Tensor:
        """λ₁ · mean |g| over all gates of `methods` (per-layer λ₁ if configs differ)."""
        total = sum(m.gate.numel() for m in methods)
        return sum(m.config.l1_weight * m.gate.abs().sum() for m in methods) / total

    @classmethod
    def group_before_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Add ∇(λ₁ · mean |g|) = λ₁ sign(g) / N to every gate's gradient."""
        _check_no_gate_decay(methods, state.optimizer)
        total = sum(m.gate.numel() for m in methods)  # type: ignore[union-attr]
        for m in methods:
            gate = m.gate  # type: ignore[union-attr]
            term = m.config.l1_weight * torch.sign(gate.detach()) / total  # type: ignore[union-attr]
            gate.grad = term if gate.grad is None else gate.grad + term

    def after_step(self, state: RuleState) -> None:
        """Proximal soft-threshold of the gate with the constant λ₂."""
        with torch.no_grad():
            self.gate.copy_(soft_threshold(self.gate, self.config.threshold,
                                           official=self.config.official_prox))

    # ------------------------------------------------------------------ pruning
    def pruned_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A' (nnz, in), B' (out, nnz)) with the gate folded into B: s·B'A' = ΔW."""
        nz = torch.nonzero(self.gate.detach()).flatten()
        return self.A.detach()[nz], (self.B.detach() * self.gate.detach())[:, nz]


def _check_no_gate_decay(methods: Sequence[AdapterMethod], optimizer: torch.optim.Optimizer
                         ) -> None:
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    gates = {id(m.gate) for m in methods}  # type: ignore[union-attr]
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0) and any(id(p) in gates for p in group["params"]):
            warnings.warn(
                "SoRA gates are weight-decayed by this optimizer (weight_decay="
                f"{group['weight_decay']}); the official method does not decay them: build the "
                "optimizer from rankwise.adapt.methods.sora.sora_param_groups(model, ...)",
                RuntimeWarning, stacklevel=4,
            )
            return


def sora_param_groups(model: nn.Module, *, weight_decay: float = 0.0,
                      gate_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: trainable non-gate parameters with `weight_decay`; SoRA gates with
    weight_decay 0 (and lr `gate_lr` if given: the official ``sparse_lr``)."""
    from rankwise.adapt.api import adapter_layers

    gates = [layer.adapter.gate for layer in adapter_layers(model).values()
             if isinstance(layer.adapter, SoRA)]
    ids = {id(g) for g in gates}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    gate_group: dict[str, Any] = {"params": gates, "weight_decay": 0.0}
    if gate_lr is not None:
        gate_group["lr"] = gate_lr
    return [{"params": rest, "weight_decay": weight_decay}, gate_group]


@torch.no_grad()
def prune_to_lora_(model: nn.Module) -> nn.Module:
    """Replace every SoRA adapter by the plain LoRA of rank nnz(g) with equal outputs (a layer
    whose gates are all zero gets its original, frozen module back). Returns `model`."""
    from rankwise import surgery
    from rankwise.adapt.api import adapter_layers

    for name, layer in adapter_layers(model).items():
        old = layer.adapter
        if not isinstance(old, SoRA):
            continue
        layer.unmerge_()
        A, B = old.pruned_factors()
        if A.shape[0] == 0:
            base = layer.restore_base_()
            base.requires_grad_(False)  # stays frozen, as under the adapter
            surgery.replace_module(model, name, base)
            continue
        cfg = old.config
        rank = A.shape[0]
        config = LoRAConfig(rank=rank, alpha=old.scale * rank, dropout=cfg.dropout)
        new = LoRA(config, layer.geometry)
        new.A.copy_(A)
        new.B.copy_(B)
        new.preset = "lora"
        layer.adapter = new
    return model
