"""ALLoRA: LoRA with a norm-scaled adaptive learning rate (arXiv 2410.09692).

    y = W x + b + B A x          (no α scale and no dropout: the paper removes both)

A (r, in) kaiming-uniform, B (out, r) = 0 as LoRA, so the adapter is a no-op at init; r(in + out)
parameters. Training rule: the gradient of every parameter group θ reaches the optimizer
multiplied by

    c(‖θ‖) = 1 / √(‖θ‖² + 1/η²)

which is bounded at ‖θ‖ = 0 (c = η: the zero-initialised B escapes quickly) and decreasing in
‖θ‖ (large parameters take smaller steps). The factor is applied in the backward pass by an
identity autograd function (`scale_grad_rows`) with θ's value at the forward, so ``.grad``
holds the scaled gradient with any optimizer or loop, under gradient accumulation too (θ does
not change between micro-batches), with no optimizer hook to attach. Since c depends on θ only,
scaling each sample's gradient equals scaling their sum ("per-sample" in the abstract).

Choices (not fixed by the paper; no official code found): c as above; the norm is taken per row of A
(each of the r rows, over in) and per row of B (each of the out rows, over r) with
``granularity="row"`` (default), or over each whole matrix with ``"matrix"``; η = 1 by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, MethodConfig, register_method
from rankwise.config import option
from rankwise.linalg import kaiming_uniform


def allora_coefficient(norm: torch.Tensor, eta: float) -> torch.Tensor:
    """c(ν) = 1/√(ν² + 1/η²): c(0) = η, decreasing in ν, ≈ 1/ν for large ν."""
    return torch.rsqrt(norm.square() + 1.0 / eta**2)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies row i of the gradient by c_i."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coef)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (coef,) = ctx.saved_tensors
        return grad * coef[:, None], None


def scale_grad_rows(weight: torch.Tensor, eta: float, granularity: str = "row") -> torch.Tensor:
    """`weight` (k, d) unchanged in the forward; its gradient scaled by c(‖row‖) (or c(‖W‖))."""
    with torch.no_grad():
        if granularity == "row":
            norm = torch.linalg.vector_norm(weight, dim=1)
        else:
            norm = torch.linalg.vector_norm(weight).expand(weight.shape[0])
        coef = allora_coefficient(norm, eta)
    return _ScaleGrad.apply(weight, coef)


@dataclass(frozen=True, kw_only=True)
class ALLoRAConfig(MethodConfig):
    """ALLoRA options."""

    eta: float = option(1.0, "η of the coefficient c(ν) = 1/√(ν² + 1/η²) (the step multiplier at "
                        "ν = 0)")
    granularity: str = option("row", "\"row\" (norm per row of A and of B) or \"matrix\" (per "
                              "matrix)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.eta, int | float) or not math.isfinite(self.eta) or self.eta <= 0:
            raise ValueError(f"eta must be a finite number > 0, got {self.eta!r}")
        if self.granularity not in ("row", "matrix"):
            raise ValueError(f"granularity must be 'row' or 'matrix', got {self.granularity!r}")


@register_method(
    "allora", summary="ALLoRA (Huang & Balestriero 2024): LoRA with a norm-scaled adaptive learning rate"
)
class ALLoRA(AdapterMethod):
    """A (r, in), B (out, r) trainable, unscaled; gradients scaled by c(‖θ‖)."""

    config_cls = ALLoRAConfig
    config: ALLoRAConfig

    def __init__(self, config: ALLoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        self.A = nn.Parameter(torch.zeros(config.rank, self.in_features, dtype=dtype,
                                          device=device))
        self.B = nn.Parameter(torch.zeros(self.out_features, config.rank, dtype=dtype,
                                          device=device))

    def initialize(self, ctx: InitContext) -> None:
        """LoRA's init: A ~ U(−1/√in, 1/√in) (kaiming_uniform, a=√5), B = 0."""
        with torch.no_grad():
            self.A.copy_(kaiming_uniform(self.A.shape, self.in_features, ctx.generator))
            self.B.zero_()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as used by the forward: values unchanged, gradients norm-scaled."""
        cfg = self.config
        return (scale_grad_rows(self.A, cfg.eta, cfg.granularity),
                scale_grad_rows(self.B, cfg.eta, cfg.granularity))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B A (out, in)."""
        A, B = self.factors()
        return B @ A

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        A, B = self.factors()
        return base_out + F.linear(F.linear(x.to(A.dtype), A), B).to(base_out.dtype)
