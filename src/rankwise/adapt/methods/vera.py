"""VeRA: vector-based random matrix adaptation (Kopiczko et al., arXiv 2310.11454).

    y = W x + b + Λ_b B Λ_d A dropout(x),   Λ_d = diag(d) (r,),  Λ_b = diag(b) (out,)

A (r, in_max) and B (out_max, r) are frozen random matrices shared by every adapted layer,
allocated for the largest in/out among the targets and sliced ``A[:, :in]``, ``B[:out, :]``.
Only d and b train: r + out parameters per layer. No α scale.

Init as PEFT (``vera/model.py`` ``_init_vera_A_vera_B``): a CPU generator seeded with
``projection_prng_key`` draws A, then B, each kaiming-uniform with gain √2, i.e.
U(−√(6/fan_in), √(6/fan_in)) with fan_in = in_max for A and r for B; so for the same key and
targets the bases equal PEFT's bit for bit. d = d_initial, b = 0 (a no-op at init).

Choices: the bases are *regenerable* and never saved (PEFT's ``save_projection=False``): a saved
adapter holds d, b, the key (config) and the shared shape (extra state); loading redraws A, B
(fp32 CPU draws are deterministic, so bit-identical). PEFT allows one key per model because it
stores one pair of buffers; here every layer records its own key and shape, so layers adapted
by separate `adapt_` calls with different keys are consistent and are accepted.
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


@dataclass(frozen=True, kw_only=True)
class VeRAConfig(MethodConfig):
    """VeRA options (defaults: PEFT ``VeraConfig``)."""

    rank: int = option(256, "r, rows of the shared A (may exceed a layer's dimensions)")
    projection_prng_key: int = option(0, "seed of the shared random A, B")
    d_initial: float = option(0.1, "initial value of every entry of d (≤ 0.1 recommended)")
    dropout: float = dropout_option(0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("projection_prng_key", self.projection_prng_key)
        if not isinstance(self.d_initial, int | float) or not math.isfinite(self.d_initial):
            raise ValueError(f"d_initial must be a finite number, got {self.d_initial!r}")


def vera_bases(key: int, rank: int, out_max: int, in_max: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A (r, in_max), B (out_max, r)) for `key`, drawn in fp32 on the CPU, then cast
    to `dtype` / moved to `device`; cached per (key, shapes, dtype, device), read-only."""

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        gen = generator(key)
        a = torch.empty(rank, in_max).uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max),
                                               generator=gen)
        b = torch.empty(out_max, rank).uniform_(-math.sqrt(6 / rank), math.sqrt(6 / rank),
                                                generator=gen)
        return a, b

    return shared_pair(("vera", key, rank, out_max, in_max), ((rank, in_max), (out_max, rank)),
                       draw, dtype=dtype, device=device)


@register_method(
    "vera", summary="VeRA (Kopiczko et al. 2024): trainable scaling vectors around shared random A, B"
)
class VeRA(RegeneratedBases):
    """Trainable scaling vectors d (r,), b (out,) around shared frozen random A, B."""

    config_cls = VeRAConfig
    config: VeRAConfig
    basis_sizes = "basis_shape"

    def __init__(self, config: VeRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        dtype = self.param_dtype(geometry)
        device = geometry.module.weight.device
        self.lambda_d = nn.Parameter(torch.zeros(config.rank, dtype=dtype, device=device))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        self.register_buffer("A", None, persistent=False)  # (r, in) slice of the shared A
        self.register_buffer("B", None, persistent=False)  # (out, r) slice of the shared B
        self.basis_shape: tuple[int, int] | None = None  # (out_max, in_max) of the shared bases
        self.dropout = self.input_dropout(config.dropout)

    def _attach_bases(self, out_max: int, in_max: int) -> None:
        check_bases_fit("VeRA", (out_max, in_max), (self.out_features, self.in_features))
        self.basis_shape = (out_max, in_max)
        like = self.lambda_d
        A, B = vera_bases(self.config.projection_prng_key, self.config.rank, out_max, in_max,
                          dtype=like.dtype, device=like.device)
        self.A = A[:, : self.in_features]
        self.B = B[: self.out_features, :]

    def initialize(self, ctx: InitContext) -> None:
        """Shared bases sized by all targets of this call; d = d_initial, b = 0."""
        self._attach_bases(*max_shape(ctx.all_shapes))
        with torch.no_grad():
            self.lambda_d.fill_(self.config.d_initial)
            self.lambda_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = diag(b) B diag(d) A (out, in)."""
        return self.lambda_b[:, None] * (self.B * self.lambda_d) @ self.A

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        h = F.linear(self.dropout(x.to(self.A.dtype)), self.A) * self.lambda_d
        return base_out + (F.linear(h, self.B) * self.lambda_b).to(base_out.dtype)
