"""Block-LoRA: one shared down-projection, n up-projection blocks ("One Head Eight Arms",
Zhou et al., arXiv 2501.16720).

    B = [B_1 … B_n]  (each out × r/n),   A_i = A_s (r/n × in) for every block
    ΔW = s · Σ_i B_i A_s = s · (Σ_i B_i) A_s,     y = W x + b + s · (Σ_i B_i)(A_s dropout(x))

So the forward computes A_s x once and replaces n matmuls by a sum of the B_i (the paper's
"matrix multiplications replaced by additions"). Trainable: A_s and the n blocks B_i, stored as
one tensor (n, out, r/n): ``out·r + (r/n)·in`` parameters per layer.

Choices (not fixed by the paper: no official code found; the main reading of the abstract is used,
i.e. the split runs along the rank, not along the input):

* scale s = α/r with r the *total* rank (as LoRA of rank r, so ΔW has LoRA's scale when n = 1);
* init as LoRA: A_s kaiming-uniform U(−1/√in, 1/√in), every B_i = 0 (a no-op at init);
* defaults as PEFT's LoRA (r = 8, α = 8, dropout 0) with n = 2 blocks (CLIP-LoRA's r = 2,
  α = 1, dropout 0.25 are a task preset, pass them explicitly).

Property pinned by the tests: every B_i receives the same gradient (∂L/∂B_i = s·g (A_s x)ᵀ),
so blocks that start equal stay equal under Adam: the model trains exactly as a rank-r/n LoRA
whose B is Σ B_i (it moves n× faster than one block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from rankwise.linalg import kaiming_uniform


@dataclass(frozen=True, kw_only=True)
class BlockLoRAConfig(MethodConfig):
    """Block-LoRA options."""

    rank: int = option(8, "total rank r = n · (rank of A_s); must be divisible by `n_blocks`")
    n_blocks: int = option(2, "n, the number of up-projection blocks sharing A_s")
    alpha: float = option(8.0, "α; the branch is scaled by α/r")
    dropout: float = dropout_option(0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_blocks
        check_integer("n_blocks", n, minimum=1)
        if self.rank % n:
            raise ValueError(
                f"rank {self.rank} is not divisible by n_blocks {n}: each block has rank r/n; "
                f"choose rank = {n * max(1, self.rank // n)}"
            )
        check_alpha(self.alpha)

    @property
    def block_rank(self) -> int:
        """r/n, the rank of the shared A_s."""
        return self.rank // self.n_blocks


@register_method(
    "block_lora", summary="Block-LoRA: one shared down-projection, n up-projection blocks"
)
class BlockLoRA(AdapterMethod):
    """Shared A_s (r/n, in) and blocks B (n, out, r/n), all trainable."""

    config_cls = BlockLoRAConfig
    config: BlockLoRAConfig
    layer_kinds = frozenset({"linear", "conv1d"})

    def __init__(self, config: BlockLoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        k = config.block_rank
        self.check_rank(k)
        dtype, device = self.param_dtype(geometry), geometry.module.weight.device
        self.A = nn.Parameter(torch.zeros(k, self.in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(
            torch.zeros(config.n_blocks, self.out_features, k, dtype=dtype, device=device)
        )
        self.scale = config.alpha / config.rank
        self.dropout = self.input_dropout(config.dropout)

    def initialize(self, ctx: InitContext) -> None:
        """A_s kaiming-uniform (bound 1/√in, as PEFT's LoRA A), every B_i = 0."""
        with torch.no_grad():
            self.A.copy_(kaiming_uniform(self.A.shape, self.in_features, ctx.generator))
            self.B.zero_()

    def summed_B(self) -> torch.Tensor:
        """Σ_i B_i (out, r/n)."""
        return self.B.sum(0)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · (Σ_i B_i) A_s (out, in)."""
        return self.scale * (self.summed_B() @ self.A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        h = F.linear(self.dropout(x.to(self.A.dtype)), self.A)  # A_s x once
        return base_out + (self.scale * F.linear(h, self.summed_B())).to(base_out.dtype)
