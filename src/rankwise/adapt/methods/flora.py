"""FLoRA: a low-rank Tucker update that keeps the N-d structure of a weight (Si, Wang et al.,
"FLoRA: Low-Rank Core Space for N-dimension", arXiv 2405.14739).

    ΔW = scale · G ×₁ U⁽¹⁾ ×₂ U⁽²⁾ … ×_N U⁽ᴺ⁾,    dims ordered [d_in, d_out, k₁, k₂, …]

then the first two axes are swapped to PyTorch's (out, in, k…) layout. G (r₁×…×r_N) is the
trainable core, U⁽ⁿ⁾ (d_n × r_n) the trainable factors.

* Linear / HF Conv1D (N = 2): ΔW = scale · U_out Gᵀ U_inᵀ, G (r, r).
* Conv2d (N = 4): dims [C_in, C_out, kh, kw], ranks [r, r, r_k, r_k];
  ΔW[o, i, a, b] = scale · Σ G[p, q, s, t] U_in[i, p] U_out[o, q] U_kh[a, s] U_kw[b, t],
  and the adapter output is conv(dropout(x), ΔW) with the base layer's stride, padding and
  dilation (the core's Conv2d geometry; groups = 1 only).

Params/layer: Π r_n + Σ d_n r_n. Init (official ``flora/layers.py``): every U⁽ⁿ⁾ ~
kaiming_normal(a=√3), i.e. N(0, 1/(2 r_n)) (fan_in = r_n, gain √(2/(1+3))), and G = 0, so the
adapter is a no-op at init. Defaults (``example.py``, ConvNeXt): r = 16 for the channel axes,
2 for the kernel axes, scale 4.0, dropout 0.01.

Choices: `kernel_rank` is capped at each kernel size (a 1×1 conv gets r_k = 1) instead of
raising, because one config usually adapts convs of several kernel sizes; the channel rank is
validated like every other method's (≤ min(C_in, C_out)). Embedding layers (N = 1) are not
offered.
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
    check_alpha,
    check_integer,
    dropout_option,
    register_method,
)
from rankwise.config import option


@dataclass(frozen=True, kw_only=True)
class FLoRAConfig(MethodConfig):
    """FLoRA options (defaults: the official ConvNeXt example)."""

    rank: int = option(16, "Tucker rank of the channel axes (d_in and d_out; Linear's r)")
    kernel_rank: int = option(2, "Tucker rank of each spatial kernel axis (Conv2d), capped at "
                              "the kernel size")
    scale: float = option(4.0, "fixed multiplier of ΔW")
    dropout: float = dropout_option(0.01)

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.kernel_rank
        check_integer("kernel_rank", k, minimum=1)
        check_alpha(self.scale, "scale")


def tucker_product(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """G ×₁ U⁽¹⁾ … ×_N U⁽ᴺ⁾: the full tensor (d₁, …, d_N) of a Tucker decomposition."""
    out = core
    for mode, U in enumerate(factors):
        # mode product: contract axis `mode` of `out` with the columns of U (d_n, r_n); U in
        # out's dtype, which autocast lowers after the first product (tensordot needs one dtype)
        out = torch.movedim(torch.tensordot(out, U.to(out.dtype), dims=([mode], [1])), -1, mode)
    return out


@register_method(
    "flora", summary="FLoRA (Si et al. 2024): low-rank Tucker update keeping a weight's N-d structure"
)
class FLoRA(AdapterMethod):
    """Trainable Tucker core G and factors U⁽ⁿ⁾ (``U_0`` … ``U_{N-1}``, dims [in, out, k…])."""

    config_cls = FLoRAConfig
    config: FLoRAConfig
    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})

    def __init__(self, config: FLoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        if geometry.kind == "conv2d":
            c_out, c_in, kh, kw = geometry.module.weight.shape
            self.dims = (c_in, c_out, kh, kw)
            self.check_rank(config.rank, limit=min(c_in, c_out))
            k = config.kernel_rank
            self.ranks = (config.rank, config.rank, min(k, kh), min(k, kw))
        else:
            self.dims = (self.in_features, self.out_features)
            self.check_rank(config.rank)
            self.ranks = (config.rank, config.rank)
        dtype, device = self.param_dtype(geometry), geometry.module.weight.device
        self.G = nn.Parameter(torch.zeros(self.ranks, dtype=dtype, device=device))
        self.U = nn.ParameterList(
            nn.Parameter(torch.zeros(d, r, dtype=dtype, device=device))
            for d, r in zip(self.dims, self.ranks, strict=True)
        )
        self.dropout = self.input_dropout(config.dropout)

    def initialize(self, ctx: InitContext) -> None:
        """U⁽ⁿ⁾ ~ kaiming_normal(a=√3) = N(0, 1/(2 r_n)); G = 0."""
        gain = math.sqrt(2.0 / (1.0 + 3.0))
        with torch.no_grad():
            for U in self.U:
                std = gain / math.sqrt(U.shape[1])
                U.copy_(torch.randn(U.shape, generator=ctx.generator) * std)
            self.G.zero_()

    def delta_tensor(self) -> torch.Tensor:
        """ΔW in the weight's own layout: (out, in) or (C_out, C_in, kh, kw)."""
        full = self.config.scale * tucker_product(self.G, list(self.U))  # (in, out, k…)
        return full.transpose(0, 1)

    def delta_weight(self) -> torch.Tensor:
        """ΔW as the (out, in) matrix view (Conv2d: flattened to (C_out, C_in·kh·kw))."""
        return self.delta_tensor().reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        delta = self.delta_weight()
        x = self.dropout(x.to(delta.dtype))
        return base_out + geo.apply_in(x, delta).to(base_out.dtype)
