"""DyLoRA: one LoRA trained for every rank b ≤ r_max at once (Valipour et al., EACL 2023,
arXiv 2210.07558).

    y = W x + b_W + (α/b) · B[:, :b] A[:b] dropout(x)

A (r_max, in), B (out, r_max) as LoRA (A kaiming-uniform, B = 0: a no-op at init); stored
r_max·(in + out) parameters. Training samples b uniformly from {min_rank .. rank} once per
optimizer step for the whole model (a training rule: `rankwise.adapt.attach_rules`; training
without it raises), so every prefix of the ranks becomes a good rank-b adapter (nested dropout).
In the default ``update="frozen"`` mode only row b of A and column b of B receive gradients
(rows before b are detached); ``"full"`` trains all of the first b.

Inference: any 1 ≤ b ≤ rank (`set_rank`, default rank), scale α/b, no retraining; merge uses
the current b and remembers it, so unmerge is exact even if the rank is changed in between.

Choices (not fixed by the paper; the official code was not available): ``"frozen"`` is the default
mode (the paper's Algorithm 1 updates only the b-th row/column); α defaults to LoRA's 8 with
scale α/b (α/√b with ``use_rslora``); the rank of each step is drawn from a CPU generator
seeded with (``seed``, step), never from the global RNG, identically for every layer.
The kohya-ss derivative (all r ranks forwarded, scale (α/r)√(r/(b+1))) is not followed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, check_integer, register_method
from rankwise.adapt.methods.lora import LoRABase, LoRAConfig
from rankwise.config import option
from rankwise.linalg import make_generator

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.rules import RuleState


@dataclass(frozen=True, kw_only=True)
class DyLoRAConfig(LoRAConfig):
    """DyLoRA options: LoRA's (``rank`` is r_max) and the rank-sampling fields below."""

    min_rank: int = option(1, "smallest rank sampled during training")
    update: str = option("frozen", "\"frozen\" (only row/column b trains at each step) or \"full\"")
    seed: int = option(0, "seed of the per-step rank draws")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) \
                or not 1 <= self.min_rank <= self.rank:
            raise ValueError(f"min_rank must be an integer in [1, rank={self.rank}], "
                             f"got {self.min_rank!r}")
        if self.update not in ("frozen", "full"):
            raise ValueError(f"update must be 'frozen' or 'full', got {self.update!r}")
        check_integer("seed", self.seed)


def sample_rank(config: DyLoRAConfig, step: int) -> int:
    """The training rank b of optimizer step `step`, uniform on {min_rank .. rank}."""
    gen = make_generator((config.seed * 1_000_003 + step) % (2**63))
    return int(torch.randint(config.min_rank, config.rank + 1, (1,), generator=gen))


@register_method(
    "dylora", summary="DyLoRA (Valipour et al. 2023): one LoRA trained for every rank b <= r at once"
)
class DyLoRA(LoRABase):
    """LoRA whose first b ranks form a rank-b adapter for every b (scale α/b)."""

    config_cls = DyLoRAConfig
    config: DyLoRAConfig
    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})
    has_rules = True

    def __init__(self, config: DyLoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.train_rank = sample_rank(config, 0)
        self.active_rank = config.rank  # inference rank
        self.merge_rank = config.rank

    def set_rank(self, rank: int) -> None:
        """Use the first `rank` ranks at inference (and for merging)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.config.rank:
            raise ValueError(f"rank must be an integer in [1, {self.config.rank}], got {rank!r}")
        self.active_rank = rank

    def scale_for(self, rank: int) -> float:
        """α/b (α/√b with rsLoRA)."""
        return self.lora_scale(self.config.alpha, rank, self.config.use_rslora)

    def factors(self, rank: int, *, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:b] (b, in), B[:, :b] (out, b)); `frozen` detaches all but row/column b."""
        A, B = self.A[:rank], self.B[:, :rank]
        if frozen and rank > 1:
            A = torch.cat([A[: rank - 1].detach(), A[rank - 1:]])
            B = torch.cat([B[:, : rank - 1].detach(), B[:, rank - 1:]], dim=1)
        return A, B

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """ΔW = (α/b) B[:, :b] A[:b] (out, in) at `rank` (default: the inference rank)."""
        b = self.active_rank if rank is None else rank
        A, B = self.factors(b)
        return self.scale_for(b) * (B @ A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        b = self.train_rank if training else self.active_rank
        A, B = self.factors(b, frozen=training and self.config.update == "frozen")
        h = geo.apply_in(self.dropout(x.to(A.dtype)), A)
        return base_out + (self.scale_for(b) * geo.apply_features(h, B)).to(base_out.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        self.merge_rank = self.active_rank
        return weight + self.delta_weight(self.merge_rank).detach().to(weight.dtype)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return merged - self.delta_weight(self.merge_rank).detach().to(merged.dtype)

    @classmethod
    def group_after_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Draw the next step's rank, the same for every layer of one config."""
        for m in methods:
            m.train_rank = sample_rank(m.config, state.step + 1)  # type: ignore[attr-defined]

    def extra_state(self) -> dict[str, Any]:
        return {"active_rank": self.active_rank}

    def rule_state(self) -> dict[str, Any]:
        """The rank drawn for the next training step (checkpointed for an exact resume)."""
        return {"train_rank": int(self.train_rank)}

    def load_rule_state(self, state: dict[str, Any]) -> None:
        self.train_rank = int(state["train_rank"])

    @classmethod
    def from_saved(cls, config: DyLoRAConfig, geometry: Geometry, extra: dict[str, Any]
                   ) -> DyLoRA:
        method = cls(config, geometry)
        method.set_rank(int(extra.get("active_rank", config.rank)))
        return method


def set_dylora_rank(model: nn.Module, rank: int) -> nn.Module:
    """Set the inference rank of every DyLoRA adapter of `model` (merged layers are re-merged
    at the new rank). Returns `model`."""
    from rankwise.adapt.api import adapter_layers

    for layer in adapter_layers(model).values():
        if isinstance(layer.adapter, DyLoRA):
            merged = layer.merged
            layer.unmerge_()
            layer.adapter.set_rank(rank)
            if merged:
                layer.merge_()
    return model
