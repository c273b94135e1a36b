"""EVA: Explained Variance Adaptation (Paischer et al., arXiv 2410.07170).

A LoRA whose A rows are the principal directions of the layer's *input activations*, B = 0,
with the ranks redistributed across layers by explained variance:

1. per target layer, PCA of its centred inputs x (tokens × in): the eigenvectors of the
   covariance C = E[xxᵀ] − E[x]E[x]ᵀ, i.e. the right singular vectors of the centred activation
   matrix, with explained-variance ratios λ_i / tr C;
2. each layer offers its first ``m = round(r·ρ)`` components (capped at min(out, in));
   budget ``r × #layers``; the top-budget ratios of all layers pooled decide the ranks:
   rank_l = how many of layer l's ratios made the cut (0 ⇒ the layer's adapter is empty);
3. A ← the first rank_l components (``whiten``: row i divided by √S_i, S_i the i-th singular
   value of the centred activation matrix); B = 0 (a no-op at init);
4. ``adjust_scaling_factors``: α_l = α·rank_l/r, so the scale α_l/rank_l = α/r of every layer
   equals the configured one; otherwise the scale is α/rank_l.

Forward, merge and parameter count (Σ_l rank_l (in + out)) are LoRA's.

Choices (versus PEFT's ``initialize_lora_eva_weights``):

* The statistics are the model-wide calibration pass of ``rankwise.calibrate`` (Gram and mean
  over *all* calibration tokens, padding dropped by ``attention_mask``); the PCA is the exact
  eigendecomposition of that covariance through ``rankwise.linalg.eigh``. PEFT's incremental
  PCA over minibatches converges to the same components; its convergence loop (``tau``) is
  therefore not needed and not offered. ``use_label_mask`` (dropping tokens whose label is
  −100) is not offered: only the attention mask filters tokens.
* Signs follow sklearn/PEFT's ``svd_flip(u_based_decision=False)``: the largest-magnitude
  entry of each component is positive.
* Rank ties at the budget boundary go to the layer that comes first in module order (stable
  sort), where PEFT's ``argsort`` leaves them unspecified.
* Layers given rank 0 keep an empty adapter (A (0, in), B (out, 0)) instead of being unwrapped,
  so the adapted set of layers is what ``target_modules`` named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import (
    MethodConfig,
    check_alpha,
    dropout_option,
    register_method,
)
from rankwise.adapt.methods.lora import LoRABase
from rankwise.config import option


@dataclass(frozen=True, kw_only=True)
class EVAConfig(MethodConfig):
    """EVA options (defaults: PEFT's LoraConfig and EvaConfig)."""

    rank: int = option(8, "r, the average rank; the budget is r × number of target layers")
    alpha: float = option(8.0, "α; the scale is α/r (see `adjust_scaling_factors`)")
    dropout: float = dropout_option(0.0)
    rho: float = option(2.0, "ρ >= 1; each layer offers round(r·ρ) components to the "
                        "redistribution (ρ = 1: uniform ranks)")
    whiten: bool = option(False, "divide each A row by the square root of its singular value")
    adjust_scaling_factors: bool = option(True, "α_l = α·rank_l/r, keeping every layer's scale α/r")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        if not isinstance(self.rho, int | float) or not math.isfinite(self.rho) or self.rho < 1:
            raise ValueError(f"rho must be a number >= 1 (1 = uniform ranks), got {self.rho!r}")

    @property
    def scale(self) -> float:
        """α/r, the scale of every layer (with `adjust_scaling_factors`)."""
        return self.alpha / self.rank


@dataclass
class EVAAllocation:
    """Model-wide result of the EVA init.

    Attributes:
        ranks: rank_l per fqn (Σ = budget).
        components: per fqn, the offered components (m, in), orthonormal rows, fp64.
        singular_values: per fqn, S_i (m,) of the centred activation matrix.
        ratios: per fqn, explained-variance ratios (m,) λ_i / tr C.
    """

    ranks: dict[str, int]
    components: dict[str, torch.Tensor]
    singular_values: dict[str, torch.Tensor]
    ratios: dict[str, torch.Tensor]


def offered_components(rank: int, rho: float, shape: tuple[int, int]) -> int:
    """m = round(r·ρ), capped at min(out, in)."""
    return min(round(rank * rho), min(shape))


def principal_components(stats: Any, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-m PCA of one layer's centred inputs from its statistics (fp64).

    Returns:
        components (m, in) (sign: largest-|.| entry positive), singular values S (m,) of the
        centred (tokens × in) matrix (S² = n·λ), explained-variance ratios λ/tr C (m,).
    """
    from rankwise import linalg

    cov = stats.covariance()
    lam, vecs = linalg.eigh(cov)  # ascending
    lam = lam.flip(0).clamp_min(0.0)[:m]
    comps = vecs.flip(1)[:, :m].T.contiguous()  # (m, in)
    total = torch.diagonal(cov).clamp_min(0.0).sum()
    if not total > 0:
        raise ValueError("the calibration inputs of a target layer have zero variance: "
                         "EVA needs varied data; pass more (or different) batches")
    big = comps.abs().argmax(dim=1, keepdim=True)
    comps = comps * torch.sign(comps.gather(1, big))
    n = int(stats.n_tokens)
    return comps, (n * lam).sqrt(), lam / total


def allocate_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """rank_l = number of layer l's ratios among the `budget` largest of all layers pooled
    (ties: earlier layer in the dict's order first)."""
    names = [n for n, r in ratios.items() for _ in range(len(r))]
    if not names:
        return {n: 0 for n in ratios}
    pooled = torch.cat([r.to(torch.float64) for r in ratios.values()])
    order = torch.argsort(pooled, descending=True, stable=True)[:budget]
    ranks = {n: 0 for n in ratios}
    for i in order.tolist():
        ranks[names[i]] += 1
    return ranks


def eva_allocation(stats: dict[str, Any], shapes: dict[str, tuple[int, int]], rank: int,
                   rho: float) -> EVAAllocation:
    """PCA of every layer's inputs (layers reading one shared statistic are decomposed once)
    and the explained-variance rank redistribution with budget rank × #layers."""
    comps, svals, ratios = {}, {}, {}
    done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, st in stats.items():
        m = offered_components(rank, rho, shapes[name])
        key = id(st.gram)
        if key not in done or done[key][0].shape[0] < m:
            done[key] = principal_components(st, m)
        c, s, r = done[key]
        comps[name], svals[name], ratios[name] = c[:m], s[:m], r[:m]
    ranks = allocate_ranks(ratios, rank * len(stats))
    return EVAAllocation(ranks, comps, svals, ratios)


@register_method(
    "eva", summary="EVA (Paischer et al. 2024): LoRA initialised from activation PCA, data-driven ranks"
)
class EVA(LoRABase):
    """LoRA initialised from activation PCA with data-driven per-layer ranks (needs data=)."""

    config_cls = EVAConfig
    config: EVAConfig
    layer_kinds = frozenset({"linear", "conv1d"})
    needs = frozenset({"activations"})

    def __init__(self, config: EVAConfig, geometry: Geometry, *, rank: int | None = None) -> None:
        super().__init__(config, geometry)  # validates r against (out, in), allocates rank r
        self.eva_rank = config.rank if rank is None else rank
        if rank is not None:
            self._resize(rank)

    def _resize(self, rank: int) -> None:
        like = self.A
        self.A = nn.Parameter(like.new_zeros(rank, self.in_features))
        self.B = nn.Parameter(like.new_zeros(self.out_features, rank))
        self.eva_rank = rank
        cfg = self.config
        if cfg.adjust_scaling_factors or rank == 0:
            self.scale = cfg.alpha / cfg.rank  # α_l / rank_l with α_l = α·rank_l/r
        else:
            self.scale = cfg.alpha / rank

    def initialize(self, ctx: InitContext) -> None:
        """A = the first rank_l principal directions of the inputs (whitened if asked), B = 0."""
        cfg = self.config
        alloc = ctx.shared(
            f"eva:{cfg.rank}:{cfg.rho}",
            lambda: eva_allocation(ctx.all_activations(), ctx.all_shapes, cfg.rank, cfg.rho),
        )
        rank = alloc.ranks[ctx.fqn]
        self._resize(rank)
        a = alloc.components[ctx.fqn][:rank]
        if cfg.whiten:
            a = a / alloc.singular_values[ctx.fqn][:rank].clamp_min(1e-30).sqrt()[:, None]
        with torch.no_grad():
            self.A.copy_(a.to(self.A.dtype))

    def lora_branch(self, x: torch.Tensor, geo: Geometry) -> torch.Tensor:
        if self.eva_rank == 0:
            return torch.zeros((), dtype=self.A.dtype, device=self.A.device)
        return super().lora_branch(x, geo)

    def extra_state(self) -> dict[str, Any]:
        return {"rank": self.eva_rank}

    @classmethod
    def from_saved(cls, config: EVAConfig, geometry: Geometry, extra: dict[str, Any]) -> EVA:
        if "rank" not in extra:
            raise ValueError("saved eva adapter lacks its data-chosen 'rank' in the extra state: "
                             "re-save it with rankwise.adapt.save_adapter")
        return cls(config, geometry, rank=int(extra["rank"]))
