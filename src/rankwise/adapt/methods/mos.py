"""MoS: Mixture of Shards (Wang et al., ICLR 2025, arXiv 2410.00938).

LoRA whose factors are not owned by a layer but assembled from global pools of *shards*:

    y = W x + b + (α/r) B A dropout(x),    A (r, in), B (out, r) materialised per forward

* **pools** (inter-/intra-layer sharing): one trainable pool of A-shards per input size and
  one of B-shards per output size, shared by every adapted layer of that size (q/k/v/o/up of
  a Llama block share the A pool of hidden-size inputs, ...). A pool holds
  ``(budget_rank − private_rank) · k · |layers|`` shards, i.e. the parameter budget of a LoRA of
  rank ``budget_rank − private_rank`` on each of those layers;
* **vector sharding** (``num_chunks`` = k): each rank vector (a row of A, a column of B) is the
  concatenation of k shards of length in/k (out/k);
* **subset selection**: each layer's r − p shared rank vectors pick their (r − p)·k shards from
  the pool by a fixed index; **pair dissociation**: A's and B's indices are drawn independently;
* **shard privatization**: the first p = ``private_rank`` rows of A / columns of B are private
  trainable parameters of the layer.

Params: Σ pools + Σ_l p·(in + out), whatever r is (≈ a LoRA of rank ``budget_rank``).
Init: A-shards and private A rows kaiming-uniform U(−1/√in, 1/√in) (LoRA's A), B-shards and
private B columns 0, so the adapter is a no-op at init. Merge materialises A, B: exact.

Choices (not fixed by the paper; only the earlier chunk-repeat module of the official repo was
readable): the router is a *fixed random index* (drawn once from the seeded per-layer
generator, saved with the adapter), without replacement inside a layer while the pool is large
enough and balanced (every shard used ⌈slots/pool⌉ times at most) beyond; the "random scaling
vectors" of the official scripts are not offered; pools are grouped by vector length.

Storage: the pool is a parameter of one *owner* layer (the first of its group by name); the
other layers hold a plain reference, so ``model.parameters()``, the optimizer and the saved
file see each pool once. On load the owner is loaded first (layers load in sorted order) and
registers its pool under the saved pool id; the other layers of that load link to it.
"""

from __future__ import annotations

import math
import uuid
import weakref
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
from rankwise.linalg import kaiming_uniform, make_generator

ROLES = ("A", "B")
# pool id -> the pool parameter most recently loaded by its owner (see the module docstring)
_LOADED: weakref.WeakValueDictionary[str, nn.Parameter] = weakref.WeakValueDictionary()


@dataclass(frozen=True, kw_only=True)
class MoSConfig(MethodConfig):
    """MoS options (names of the official scripts in brackets)."""

    rank: int = option(8, "r, the active rank of every layer's materialised A, B [lora_r]")
    budget_rank: int = option(2, "equivalent rank of the trainable budget per layer, pools + "
                              "private [valid_param_lora_r]")
    private_rank: int = option(0, "p, rank vectors private to each layer [valid_param_private_r]")
    num_chunks: int = option(2, "k, shards per rank vector [num_chunk_per_vec]")
    alpha: float = option(16.0, "α; scale α/r [lora_alpha]")
    dropout: float = dropout_option(0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("budget_rank", "num_chunks"):
            check_integer(name, getattr(self, name), minimum=1)
        p = self.private_rank
        check_integer("private_rank", p, minimum=0)
        if p > self.rank or p > self.budget_rank:
            raise ValueError(
                f"private_rank {p} exceeds rank {self.rank} or budget_rank {self.budget_rank}: "
                "choose private_rank <= min(rank, budget_rank)"
            )
        if p < self.rank and self.budget_rank == p:
            raise ValueError(
                f"budget_rank {self.budget_rank} = private_rank leaves an empty shared pool for "
                f"the other {self.rank - p} rank vectors: raise budget_rank (or private_rank "
                "to rank)"
            )
        check_alpha(self.alpha)

    @property
    def shared_rank(self) -> int:
        """r − p: rank vectors assembled from the pools."""
        return self.rank - self.private_rank


def pool_size(config: MoSConfig, n_layers: int) -> int:
    """Shards in one pool serving `n_layers` layers: (budget − p) · k · n_layers."""
    return (config.budget_rank - config.private_rank) * config.num_chunks * n_layers


def route(n_slots: int, n_shards: int, generator: torch.Generator) -> torch.Tensor:
    """Fixed random subset selection: `n_slots` shard indices in [0, n_shards), without
    replacement while possible, else balanced (concatenated permutations)."""
    if n_slots == 0:
        return torch.zeros(0, dtype=torch.int64)
    reps = -(-n_slots // n_shards)
    perms = [torch.randperm(n_shards, generator=generator) for _ in range(reps)]
    return torch.cat(perms)[:n_slots]


@register_method(
    "mos", summary="MoS (Wang et al. 2025): LoRA assembled from shards of shared pools"
)
class MoS(MaterializedFactors):
    """Pool-assembled LoRA: pools (owner layer only), private rows, fixed shard indices."""

    config_cls = MoSConfig
    config: MoSConfig
    layer_kinds = frozenset({"linear", "conv1d"})

    def __init__(self, config: MoSConfig, geometry: Geometry,
                 pools: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.rank)
        k = config.num_chunks
        for what, d in (("input", self.in_features), ("output", self.out_features)):
            if d % k:
                raise ValueError(f"num_chunks {k} does not divide the {what} size {d} of a "
                                 f"({self.out_features}, {self.in_features}) layer: choose a "
                                 "divisor of every adapted layer's sizes")
        dtype, device = self.param_dtype(geometry), geometry.module.weight.device
        p, s = config.private_rank, config.shared_rank
        self.A_private = nn.Parameter(torch.zeros(p, self.in_features, dtype=dtype, device=device))
        self.B_private = nn.Parameter(torch.zeros(self.out_features, p, dtype=dtype, device=device))
        self.register_buffer("A_index", torch.zeros(s, k, dtype=torch.int64, device=device))
        self.register_buffer("B_index", torch.zeros(s, k, dtype=torch.int64, device=device))
        self.pools: dict[str, dict[str, Any]] = {}  # role -> {"id", "shape", "owner"}
        self._links: dict[str, nn.Parameter] = {}  # pools owned by another layer
        for role, spec in (pools or {}).items():
            self._attach(role, spec, None)
        self.scale = config.alpha / config.rank
        self.dropout = self.input_dropout(config.dropout)

    # ------------------------------------------------------------------ pools
    def _attach(self, role: str, spec: dict[str, Any], pool: nn.Parameter | None) -> None:
        """Hold `pool` (or, when loading, an empty owner pool of the saved shape)."""
        self.pools[role] = {"id": str(spec["id"]), "shape": [int(v) for v in spec["shape"]],
                            "owner": bool(spec["owner"])}
        if spec["owner"]:
            if pool is None:
                like = self.A_private
                pool = nn.Parameter(like.new_zeros(self.pools[role]["shape"]))
            self.register_parameter(f"pool_{role}", pool)
        elif pool is not None:
            self._links[role] = pool

    def pool(self, role: str) -> torch.Tensor:
        """The (n_shards, length) pool of A- or B-shards this layer reads."""
        if role in self._links:
            return self._links[role]
        own = self._parameters.get(f"pool_{role}")
        if own is None:
            raise RuntimeError(f"this MoS layer has no {role}-pool yet: adapt or load it first")
        return own

    def _make_pool(self, ctx: InitContext, role: str) -> dict[str, Any]:
        dim = self.in_features if role == "A" else self.out_features
        axis = 1 if role == "A" else 0
        members = sorted(n for n, shape in ctx.all_shapes.items() if shape[axis] == dim)
        k = self.config.num_chunks

        def factory() -> dict[str, Any]:
            n = pool_size(self.config, len(members))
            if role == "A":  # LoRA's kaiming-uniform A: U(−1/√in, 1/√in)
                gen = make_generator(layer_seed(ctx.seed, f"mos-pool-A-{dim}"))
                values = (torch.rand(n, dim // k, generator=gen) * 2 - 1) / math.sqrt(dim)
            else:
                values = torch.zeros(n, dim // k)
            like = self.A_private
            param = nn.Parameter(values.to(dtype=like.dtype, device=like.device))
            return {"param": param, "id": uuid.uuid4().hex, "owner": members[0]}

        made = ctx.shared(f"mos:{role}:{dim}:{self.config}", factory)
        return {"param": made["param"], "id": made["id"], "owner": made["owner"] == ctx.fqn}

    def initialize(self, ctx: InitContext) -> None:
        """Pools (first use in this call), independent fixed indices for A and B, private rows."""
        s, k = self.config.shared_rank, self.config.num_chunks
        for role in ROLES:
            made = self._make_pool(ctx, role)
            param = made["param"]
            self._attach(role, {"id": made["id"], "shape": list(param.shape),
                                "owner": made["owner"]}, param)
            index = route(s * k, param.shape[0], ctx.generator).view(s, k)
            getattr(self, f"{role}_index").copy_(index)
        with torch.no_grad():
            a = kaiming_uniform(self.A_private.shape, self.in_features, ctx.generator)
            self.A_private.copy_(a)
            self.B_private.zero_()

    def extra_state(self) -> dict[str, Any]:
        return {"pools": self.pools}

    @classmethod
    def from_saved(cls, config: MoSConfig, geometry: Geometry, extra: dict[str, Any]) -> MoS:
        pools = extra.get("pools")
        if not isinstance(pools, dict) or set(pools) != set(ROLES):
            raise ValueError("saved mos adapter lacks its pool specs in the extra state: re-save "
                             "it with rankwise.adapt.save_adapter")
        return cls(config, geometry, pools)

    def after_load(self, geometry: Geometry) -> None:
        """The owner publishes its loaded pool; the other layers link to it."""
        for role, spec in self.pools.items():
            if spec["owner"]:
                _LOADED[spec["id"]] = self._parameters[f"pool_{role}"]
                continue
            pool = _LOADED.get(spec["id"])
            if pool is None or list(pool.shape) != spec["shape"]:
                raise ValueError(
                    f"the MoS {role}-pool {spec['id']} was not loaded before a layer sharing it: "
                    "load the whole adapter directory with rankwise.adapt.load_adapter, whose "
                    "layers include the pool's owner"
                )
            self._links[role] = pool

    # ------------------------------------------------------------------ factors
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The materialised A (r, in) and B (out, r): private rows first, then pooled shards."""
        s = self.config.shared_rank
        A_shared = self.pool("A")[self.A_index].reshape(s, self.in_features)
        B_shared = self.pool("B")[self.B_index].reshape(s, self.out_features).T
        return (torch.cat([self.A_private, A_shared], 0),
                torch.cat([self.B_private, B_shared], 1))
