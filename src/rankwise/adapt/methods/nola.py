"""NOLA: LoRA factors as linear combinations of random bases (Koohpayegani et al., ICLR 2024,
arXiv 2310.02556).

    y = W x + b + s · B A dropout(x),   s = α/r
    A = A₀ + Σ_{i<k} α_i Â_i  (r, in),    B = Σ_{j<l} β_j B̂_j  (out, r)

Only the coefficients α (k,) and β (l,) train: k + l parameters per layer, independent of r and
of the layer size. The bases Â_i, B̂_j ~ U(−1, 1)/√k (resp. /√l) and the frozen A₀
(kaiming-uniform, U(−1/√in, 1/√in), the official GPT-2 code's frozen LoRA A) are *regenerable*:
each is drawn from its own CPU generator seeded with (layer seed, factor, index), in fp32, so
they never depend on the global RNG, the chunk size or the device, and are never stored.
A saved adapter holds α, β and the layer seed.

`combine_bases` is a custom autograd Function that regenerates the bases ``chunk`` at a time
in the forward *and* in the backward (∂L/∂α_i = ⟨∂L/∂A, Â_i⟩), saving no tensor for backward,
so training memory does not grow with k.

Init (official GPT code, ``gpt/src/model_nola.py``): α = β = 0, so B = 0 and the adapter is a
no-op. Choice (ours): the ViT variant (coefficients 1/k, kaiming bases) is not
offered. Inference regenerates the bases each forward: merge the adapter for deployment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapt.context import InitContext, layer_seed
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import (
    MethodConfig,
    check_alpha,
    check_integer,
    dropout_option,
    register_method,
)
from rankwise.adapt.methods._shared_bases import MaterializedFactors
from rankwise.config import option
from rankwise.linalg import make_generator

_MOD = 2**63 - 1
A_BASES, B_BASES, A_ZERO = 0, 1, 2  # factor tags of the per-basis seeds


def basis_seed(seed: int, factor: int, index: int) -> int:
    """Seed of basis `index` of factor `factor` (A_BASES, B_BASES, A_ZERO) of a layer."""
    return (int(seed) * 1_000_003 + 3 * int(index) + factor) % _MOD


def draw_bases(seed: int, factor: int, start: int, stop: int, shape: tuple[int, ...], count: int,
               *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Bases start..stop−1 of a factor, (stop − start, *shape), each U(−1, 1)/√count."""
    gen = torch.Generator(device="cpu")
    out = torch.empty(stop - start, *shape)
    for j, i in enumerate(range(start, stop)):
        gen.manual_seed(basis_seed(seed, factor, i))
        out[j].uniform_(-1.0, 1.0, generator=gen)
    return (out / math.sqrt(count)).to(device=device, dtype=dtype)


class _Combine(torch.autograd.Function):
    """Σ_i c_i · basis_i with the bases regenerated chunk-wise in forward and backward."""

    @staticmethod
    def forward(ctx, coef: torch.Tensor, seed: int, factor: int, shape: tuple[int, ...],
                chunk: int) -> torch.Tensor:
        k = coef.shape[0]
        out = torch.zeros(shape, dtype=coef.dtype, device=coef.device)
        for start in range(0, k, chunk):
            stop = min(start + chunk, k)
            bases = draw_bases(seed, factor, start, stop, shape, k, dtype=coef.dtype,
                               device=coef.device)
            out += torch.tensordot(coef[start:stop], bases, dims=1)
        ctx.meta = (k, seed, factor, shape, chunk)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k, seed, factor, shape, chunk = ctx.meta
        grad_coef = torch.empty(k, dtype=grad.dtype, device=grad.device)
        flat = grad.reshape(-1)
        for start in range(0, k, chunk):
            stop = min(start + chunk, k)
            bases = draw_bases(seed, factor, start, stop, shape, k, dtype=grad.dtype,
                               device=grad.device)
            grad_coef[start:stop] = bases.reshape(stop - start, -1) @ flat
        return grad_coef, None, None, None, None


def combine_bases(coef: torch.Tensor, seed: int, factor: int, shape: tuple[int, ...],
                  chunk: int = 64) -> torch.Tensor:
    """Σ_i coef_i · basis_i (shape), differentiable in `coef`, bases never kept in memory."""
    return _Combine.apply(coef, int(seed), int(factor), tuple(shape), int(chunk))


@dataclass(frozen=True, kw_only=True)
class NOLAConfig(MethodConfig):
    """NOLA options (defaults: the official GPT-2 M E2E script)."""

    rank: int = option(8, "r of the generated LoRA factors")
    num_basis_A: int = option(512, "k, random bases of A")
    num_basis_B: int = option(512, "l, random bases of B")
    alpha: float = option(8.0, "α; the branch is scaled by α/r")
    dropout: float = dropout_option(0.0)
    chunk: int = option(64, "bases generated at once (memory/speed trade-off; results do not "
                        "depend on it)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_basis_A", "num_basis_B", "chunk"):
            value = getattr(self, name)
            check_integer(name, value, minimum=1)
        check_alpha(self.alpha)


@register_method(
    "nola", summary="NOLA (Koohpayegani et al. 2024): LoRA factors as combinations of random bases"
)
class NOLA(MaterializedFactors):
    """Trainable coefficients α (k,), β (l,) of seeded random bases of A and B."""

    config_cls = NOLAConfig
    config: NOLAConfig

    def __init__(self, config: NOLAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        self.coef_A = nn.Parameter(torch.zeros(config.num_basis_A, dtype=dtype, device=device))
        self.coef_B = nn.Parameter(torch.zeros(config.num_basis_B, dtype=dtype, device=device))
        self.register_buffer("A0", None, persistent=False)  # (r, in), regenerable
        self.seed: int | None = None
        self.scale = config.alpha / config.rank
        self.dropout = self.input_dropout(config.dropout)

    def _set_seed(self, seed: int) -> None:
        self.seed = int(seed)
        r, n = self.config.rank, self.in_features
        gen = make_generator(basis_seed(self.seed, A_ZERO, 0))
        bound = 1.0 / math.sqrt(n)  # kaiming_uniform(a=√5) on (r, in), as LoRA's A
        a0 = torch.empty(r, n).uniform_(-bound, bound, generator=gen)
        self.A0 = a0.to(device=self.coef_A.device, dtype=self.coef_A.dtype)

    def initialize(self, ctx: InitContext) -> None:
        """Layer seed from (adapt_ seed, layer name); α = β = 0."""
        self._set_seed(layer_seed(ctx.seed, ctx.fqn))
        with torch.no_grad():
            self.coef_A.zero_()
            self.coef_B.zero_()

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @classmethod
    def from_saved(cls, config: NOLAConfig, geometry: Geometry, extra: dict[str, Any]) -> NOLA:
        if not isinstance(extra.get("seed"), int):
            raise ValueError("saved NOLA adapter lacks its integer 'seed': re-save it")
        method = cls(config, geometry)
        method._set_seed(extra["seed"])
        return method

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) materialised from the coefficients (differentiable)."""
        if self.seed is None:
            raise RuntimeError("NOLA adapter used before initialize(): build it with adapt_")
        r, cfg = self.config.rank, self.config
        A = self.A0 + combine_bases(self.coef_A, self.seed, A_BASES, (r, self.in_features),
                                    cfg.chunk)
        B = combine_bases(self.coef_B, self.seed, B_BASES, (self.out_features, r), cfg.chunk)
        return A, B
