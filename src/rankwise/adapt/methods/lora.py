"""LoRA (Hu et al. 2021, arXiv 2106.09685) with the rsLoRA scale (Kalajdzievski 2023, 2312.03732).

    y = W x + b + s · B A dropout(x),   A (r, in), B (out, r),   s = α/r  (rsLoRA: α/√r)

Init as PEFT's ``init_lora_weights=True``: A ~ kaiming_uniform(a=√5), i.e.
U(−1/√in, 1/√in), B = 0, so the adapted model equals the base at init; ``init="gaussian"``
draws A ~ N(0, 1/r) (PEFT's std 1/r). Embedding layers are the other way round (A = 0,
B ~ N(0, 1)), as PEFT. Draws use the layer's seeded generator, never the global RNG.
Defaults are PEFT's LoraConfig: r = 8, α = 8, dropout 0.

`LoRABase` holds the A/B machinery that DoRA and PiSSA reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import (
    AdapterMethod,
    MethodConfig,
    check_alpha,
    dropout_option,
    register_method,
)
from rankwise.config import option
from rankwise.linalg import kaiming_uniform


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(MethodConfig):
    """LoRA options."""

    alpha: float = option(8.0, "α; the branch is scaled by α/r (α/√r with `use_rslora`). PEFT "
                          "default 8")
    dropout: float = dropout_option(0.0)
    use_rslora: bool = option(False, "scale by α/√r (rsLoRA) instead of α/r")
    init: str = option("kaiming", "\"kaiming\" (PEFT's default) or \"gaussian\" for A; B = 0 "
                       "either way")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scale(self) -> float:
        """s = α/r, or α/√r with rsLoRA."""
        return AdapterMethod.lora_scale(self.alpha, self.rank, self.use_rslora)


class LoRABase(AdapterMethod):
    """A (r, in), B (out, r) trainable; forward ``base_out + s · B A dropout(x)``."""

    config: LoRAConfig
    layer_kinds = frozenset({"linear", "conv1d", "embedding", "conv2d"})

    def __init__(self, config: LoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        r, n_in, n_out = config.rank, self.in_features, self.out_features
        self.A = nn.Parameter(torch.zeros(r, n_in, dtype=dtype, device=device))  # (r, in)
        self.B = nn.Parameter(torch.zeros(n_out, r, dtype=dtype, device=device))  # (out, r)
        self.scale = config.scale
        self.dropout = self.input_dropout(config.dropout)

    def initialize(self, ctx: InitContext) -> None:
        """PEFT's default init: A kaiming-uniform (or gaussian), B = 0; embeddings swapped."""
        gen = ctx.generator
        r, n_in = self.A.shape
        with torch.no_grad():
            if ctx.geometry.kind == "embedding":
                self.A.zero_()
                self.B.copy_(torch.randn(self.B.shape, generator=gen))
                return
            if self.config.init == "gaussian":
                a = torch.randn(r, n_in, generator=gen) / r
            else:
                a = kaiming_uniform((r, n_in), n_in, gen)  # kaiming_uniform_(a=√5) on (r, in)
            self.A.copy_(a)
            self.B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A (out, in)."""
        return self.scale * (self.B @ self.A)

    def lora_branch(self, x: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """s · B A dropout(x) in the adapter dtype, without forming B A."""
        if not geo.takes_indices:
            x = self.dropout(x.to(self.A.dtype))
        return self.scale * geo.apply_features(geo.apply_in(x, self.A), self.B)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        return base_out + self.lora_branch(x, geo).to(base_out.dtype)


@register_method(
    "lora", summary="LoRA (Hu et al. 2021): trainable low-rank update B A scaled by alpha/r"
)
class LoRA(LoRABase):
    """Low-rank adaptation; the ``rslora`` preset sets ``use_rslora=True``."""

    config_cls = LoRAConfig


register_method("rslora", LoRA, summary="LoRA scaled by α/√r instead of α/r (rsLoRA, Kalajdzievski 2023)",
                use_rslora=True)
