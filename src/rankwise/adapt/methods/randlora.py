"""RandLoRA: full-rank updates from scaled shared random bases (arXiv 2502.00987).

With d_min = min(in, out), d_max = max(in, out) and n = ⌈d_min / r⌉ bases (n·r ≥ d_min):

    M = (α/r) · Σ_{i<n} B_i Λ_i A Γ_i   (d_max, d_min),   Λ_i = diag(λ[:, i]),  Γ_i = diag(γ[i])

ΔW = M when in ≤ out, else ΔW = Mᵀ (the Λ/Γ-scaled factor always sits on the smaller side).
B_i (d_max, r) and A (r, d_min) are frozen random bases shared by all adapted layers (allocated
for the largest shapes, sliced per layer); λ (r, n) and γ (n, d_min) train: n·(r + d_min) per
layer. The forward is two thin matmuls through the stacked factors A' = [Λ_i A Γ_i]_i (n·r,
d_min) and B' = [B_0 … B_{n−1}] (d_max, n·r); `scaled_bases` builds A' with a custom backward
that saves only A, λ, γ (PEFT's ``UniqueBaseGrad``).

Init (PEFT ``randlora``): a CPU generator seeded with ``projection_prng_key`` draws A (r, D)
first, then n_max matrices (D_max, r) for B, each divided by its own std (unit std);
``basis="sparse"``: ternary {−1, 0, +1} with P = 1/6, 2/3, 1/6; ``"very_sparse"``: P(±1) =
1/(2√D) each (PEFT's code), both std-normalised. D = min(max out, max in) over the targets.
λ = 0 (no-op), γ = 1/max(n, d_min); scale α/r.

Choices: the bases are drawn in fp32 (PEFT uses bf16/fp16 depending on the machine) and are
*never saved*: a saved adapter holds λ, γ, the key (config) and the shared sizes (extra state);
loading redraws them bit-identically. Uniform bases are U(−1, 1)/std (PEFT: kaiming-uniform /
std, the same distribution). PEFT pairs A-rows and B-columns in a permuted order
(its ΔW differs from the paper's formula by that permutation); we follow the formula, so PEFT
checkpoints do not load here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import (
    MethodConfig,
    check_alpha,
    check_integer,
    dropout_option,
    register_method,
)
from rankwise.adapt.methods._shared_bases import (
    RegeneratedBases,
    check_bases_fit,
    generator,
    max_shape,
    shared_pair,
)
from rankwise.config import option

BASES = ("uniform", "sparse", "very_sparse")


def _draw(shape: tuple[int, int], kind: str, dim: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen)
    if kind == "uniform":
        x = 2 * u - 1
    else:
        p = 1 / 6 if kind == "sparse" else 1 / (2 * math.sqrt(dim))
        x = (u > 1 - p).float() - (u < p).float()
    std = x.std()
    return x / std if std > 0 else x


def randlora_bases(key: int, rank: int, dims: tuple[int, int], kind: str, *,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared (A (r, D), B (D_max, n_max·r)) for `key`, dims = (D, D_max); cached, read-only."""
    d, d_max = dims
    n_max = math.ceil(d / rank)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        gen = generator(key)
        a = _draw((rank, d), kind, d, gen)
        return a, torch.cat([_draw((d_max, rank), kind, d, gen) for _ in range(n_max)], dim=1)

    return shared_pair(("randlora", key, rank, d, d_max, kind), ((rank, d), (d_max, n_max * rank)),
                       draw, dtype=dtype, device=device)


class _ScaledBases(torch.autograd.Function):
    """A' (n·r, d) with A'[i·r + k, j] = λ[k, i] · A[k, j] · γ[i, j]; saves only A, λ, γ."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, lam, gamma)
        n, (r, d) = gamma.shape[0], A.shape
        return (lam.T[:, :, None] * A[None] * gamma[:, None, :]).reshape(n * r, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        A, lam, gamma = ctx.saved_tensors
        G = grad.reshape(gamma.shape[0], *A.shape)  # (n, r, d)
        d_lam = torch.einsum("ikj,kj,ij->ki", G, A, gamma) if ctx.needs_input_grad[1] else None
        d_gamma = torch.einsum("ikj,ki,kj->ij", G, lam, A) if ctx.needs_input_grad[2] else None
        return None, d_lam, d_gamma


def scaled_bases(A: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Stacked [Λ_i A Γ_i]_i (n·r, d) from A (r, d), λ (r, n), γ (n, d); A is not differentiated."""
    return _ScaledBases.apply(A, lam, gamma)


@dataclass(frozen=True, kw_only=True)
class RandLoRAConfig(MethodConfig):
    """RandLoRA options (defaults: PEFT ``RandLoraConfig``)."""

    rank: int = option(32, "r, the rank of each random basis (lower r ⇒ more bases ⇒ more "
                       "parameters)")
    alpha: float = option(640.0, "α; ΔW is scaled by α/r (PEFT default 640 ≈ 20·r)")
    dropout: float = dropout_option(0.0)
    projection_prng_key: int = option(0, "seed of the shared bases")
    basis: str = option("uniform", "\"uniform\" (dense), \"sparse\" or \"very_sparse\" ternary "
                        "bases")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        check_integer("projection_prng_key", self.projection_prng_key)
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")


@register_method(
    "randlora", summary="RandLoRA (Albert et al. 2025): full-rank update from scaled shared random bases"
)
class RandLoRA(RegeneratedBases):
    """Trainable λ (r, n), γ (n, d_min) scaling n shared random rank-r bases."""

    config_cls = RandLoRAConfig
    config: RandLoRAConfig
    basis_sizes = "basis_dims"

    def __init__(self, config: RandLoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        self.d_min = min(self.in_features, self.out_features)
        self.d_max = max(self.in_features, self.out_features)
        self.transposed = self.in_features > self.out_features  # ΔW = Mᵀ
        self.num_bases = n = math.ceil(self.d_min / config.rank)
        self.lam = nn.Parameter(torch.zeros(config.rank, n, dtype=dtype, device=device))
        self.gamma = nn.Parameter(torch.zeros(n, self.d_min, dtype=dtype, device=device))
        self.register_buffer("A", None, persistent=False)  # (r, d_min) slice of the shared A
        self.register_buffer("B", None, persistent=False)  # (d_max, n·r) slice of the shared B
        self.basis_dims: tuple[int, int] | None = None  # (D, D_max) of the shared bases
        self.scale = config.alpha / config.rank
        self.dropout = self.input_dropout(config.dropout)

    def _attach_bases(self, d: int, d_max: int) -> None:
        check_bases_fit("RandLoRA", (d, d_max), (self.d_min, self.d_max))
        self.basis_dims = (d, d_max)
        cfg, like = self.config, self.lam
        A, B = randlora_bases(cfg.projection_prng_key, cfg.rank, (d, d_max), cfg.basis,
                              dtype=like.dtype, device=like.device)
        self.A = A[:, : self.d_min]
        self.B = B[: self.d_max, : self.num_bases * cfg.rank]

    def initialize(self, ctx: InitContext) -> None:
        """Shared bases sized by all targets of this call; λ = 0, γ = 1/max(n, d_min)."""
        out_max, in_max = max_shape(ctx.all_shapes)
        self._attach_bases(min(out_max, in_max), max(out_max, in_max))
        with torch.no_grad():
            self.lam.zero_()
            self.gamma.fill_(1.0 / max(self.gamma.shape))

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) = s·B'A' (in ≤ out) or its transpose."""
        M = self.scale * (self.B @ scaled_bases(self.A, self.lam, self.gamma))  # (d_max, d_min)
        return M.T if self.transposed else M

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        Ap = scaled_bases(self.A, self.lam, self.gamma)  # (n·r, d_min)
        x = self.dropout(x.to(Ap.dtype))
        if self.transposed:  # x (.., d_max) → (.., n·r) → (.., d_min = out)
            h = F.linear(F.linear(x, self.B.T), Ap.T)
        else:  # x (.., d_min) → (.., n·r) → (.., d_max = out)
            h = F.linear(F.linear(x, Ap), self.B)
        return base_out + (self.scale * h).to(base_out.dtype)
