"""SaRA: train only the small-magnitude ("ineffective") pretrained weights, progressively, under a
nuclear-norm constraint (Hu, Zhang, Yi et al., "SaRA: High-Efficient Diffusion Model Fine-tuning
with Progressive Sparse Low-Rank Adaptation").

    M = {(i, j) : |W_ij| < threshold}                    mask, chosen on the weight at init
    W_eff = W with W[M] replaced by the trainable values v (|M|,)
    ΔW = scatter_M(v − W[M]) (+ the frozen deltas of earlier masks, below)

Trainable: v, one flat tensor per adapted layer, initialised to W[M] (the official code's |w|
flips the sign of small negative weights; initialising with w
instead makes the init an exact no-op).
The forward adds x ↦ ΔW x to the base output; autograd returns ∂L/∂v = (∂L/∂W)[M] only.
Saved: v, the flat mask indices, and the frozen deltas: a sparse adapter.

Training-time rules (``rankwise.adapt.attach_rules``), present when enabled:

* **Low-rank constraint** (``lambda_rank`` > 0): before each optimizer step, one layer drawn
  at random among those with min(out, in) > ``nuclear_min_dim`` gets the gradient of
  λ·‖W_eff ⊙ M‖_* added to ∂L/∂v: λ·(U Vᵀ)[M] with U, Vᵀ the singular vectors of the nonzero
  singular values of W_eff ⊙ M (via ``rankwise.linalg.svd``); the drawn layer is skipped when
  it has ≤ ``nuclear_min_masked`` masked entries. Checked against the official code (the paper
  leaves this open): in ``optim/adamw.py`` the penalty's gradient lands on a detached copy of the
  dense parameter and never reaches the trainable values; in ``optim/adamw2.py`` (the dense,
  masked-update variant, which also has the ``mask.sum() > 100`` guard) it does reach the
  masked entries. We follow adamw2: the gradient reaches v. The draw uses a generator seeded
  with the step number (reproducible, global RNG untouched) instead of Python's ``random``.
* **Progressive re-selection** (``progressive_iter``): after exactly that many optimizer updates
  the mask is re-selected with the same threshold on the *current* W_eff; deltas of positions
  that leave the mask are frozen (kept as a sparse buffer), v is rebuilt as W_eff[M'] and swapped
  into the optimizer with fresh state. The official ``adamw.py`` does the same at the start of
  step progressive_iter + 1 and rebuilds the optimizer, discarding that step's gradient (we
  keep it); ``adamw2.py`` instead intersects the new mask with the first one.

With ``lambda_rank = 0`` and ``progressive_iter = None`` the method has no rules. Choice: the
mask is per adapted layer (``target_modules``), not over every parameter tensor of the model.
Defaults (readme/optimizer): threshold 2e-3, λ 5e-4, progressive_iter 2500; the official
learning rate is 1e-3·exp(−350·threshold) (`default_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod, MethodConfig, check_integer, register_method
from rankwise.config import option
from rankwise.linalg import make_generator

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.rules import RuleState


@dataclass(frozen=True, kw_only=True)
class SaRAConfig(MethodConfig):
    """SaRA options (``rank`` is unused: SaRA's update has no fixed rank)."""

    threshold: float = option(2e-3, "positions with |w| < threshold train")
    lambda_rank: float = option(5e-4, "λ of the nuclear-norm penalty (0 disables it)")
    progressive_iter: int | None = option(2500, "re-select the mask after this many optimizer "
                                          "steps (None: never)")
    nuclear_min_dim: int = option(64, "only layers with min(out, in) > this get the penalty "
                                  "(official: 64)")
    nuclear_min_masked: int = option(100, "a drawn layer with at most this many masked entries "
                                     "is skipped (official adamw2.py: 100)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.threshold, int | float) or not (self.threshold > 0) \
                or not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number > 0, got {self.threshold!r}")
        if not isinstance(self.lambda_rank, int | float) or not (self.lambda_rank >= 0):
            raise ValueError(f"lambda_rank must be >= 0, got {self.lambda_rank!r}")
        p = self.progressive_iter
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"progressive_iter must be an integer >= 1 or None, got {p!r}")
        for name in ("nuclear_min_dim", "nuclear_min_masked"):
            d = getattr(self, name)
            check_integer(name, d, minimum=0)


def default_lr(threshold: float) -> float:
    """The official default learning rate 1e-3·exp(−350·threshold) (≈ 5e-4 at 2e-3)."""
    return 1e-3 * math.exp(-350.0 * threshold)


@register_method(
    "sara", summary="SaRA (Hu et al. 2024): train the small-magnitude pretrained weights, sparse"
)
class SaRA(AdapterMethod):
    """Trainable values v of the masked positions; buffers: mask indices and frozen deltas."""

    config_cls = SaRAConfig
    config: SaRAConfig
    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})

    def __init__(self, config: SaRAConfig, geometry: Geometry, *, n_masked: int = 0,
                 n_frozen: int = 0) -> None:
        super().__init__(config, geometry)
        self.has_rules = config.lambda_rank > 0 or config.progressive_iter is not None
        dtype, device = self.param_dtype(geometry), geometry.module.weight.device
        self.values = nn.Parameter(torch.zeros(n_masked, dtype=dtype, device=device))
        self.register_buffer("index", torch.zeros(n_masked, dtype=torch.int64, device=device))
        self.register_buffer("frozen_index",
                             torch.zeros(n_frozen, dtype=torch.int64, device=device))
        self.register_buffer("frozen_delta", torch.zeros(n_frozen, dtype=dtype, device=device))
        # the original weight at the masked positions: rebuilt from the base, never stored
        self.register_buffer("w0", torch.zeros(n_masked, dtype=dtype, device=device),
                             persistent=False)
        self._geometry = geometry  # re-selection reads the (unmerged, original) base weight
        self.reselected_at: int | None = None

    # ------------------------------------------------------------------ init / load
    def _base_flat(self) -> torch.Tensor:
        """The stored base weight, flat, in the adapter dtype (the original W while unmerged)."""
        return self._geometry.compute_weight().reshape(-1).to(self.values.dtype)

    def _set_mask(self, index: torch.Tensor, values: torch.Tensor, w_orig: torch.Tensor) -> None:
        device = self.values.device
        self.index = index.to(device)
        self.w0 = w_orig[index].to(device)
        self.values = nn.Parameter(values.to(device=device, dtype=self.values.dtype))

    def initialize(self, ctx: InitContext) -> None:
        """M = {|w| < threshold} on the original weight; v = W[M] (exact no-op)."""
        w = ctx.weight().reshape(-1).to(self.values.dtype)
        index = torch.nonzero(w.abs() < self.config.threshold).reshape(-1)
        self._set_mask(index, w[index], w)

    def extra_state(self) -> dict[str, Any]:
        return {"n_masked": int(self.index.numel()), "n_frozen": int(self.frozen_index.numel())}

    @classmethod
    def from_saved(cls, config: SaRAConfig, geometry: Geometry, extra: dict[str, Any]) -> SaRA:
        if "n_masked" not in extra:
            raise ValueError("saved sara adapter lacks 'n_masked' in its extra state: re-save it "
                             "with rankwise.adapt.save_adapter")
        return cls(config, geometry, n_masked=int(extra["n_masked"]),
                   n_frozen=int(extra.get("n_frozen", 0)))

    def after_load(self, geometry: Geometry) -> None:
        """Rebuild W[M] from the (original) base weight the adapter was loaded onto."""
        self._geometry = geometry
        self.w0 = self._base_flat()[self.index].to(self.values.device)

    # ------------------------------------------------------------------ delta / forward
    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in): v − W[M] on the mask plus the frozen deltas of earlier masks."""
        n = self.out_features * self.in_features
        flat = self.values.new_zeros(n)
        if self.frozen_index.numel():
            flat = flat.index_put((self.frozen_index,), self.frozen_delta, accumulate=True)
        flat = flat.index_put((self.index,), self.values - self.w0, accumulate=True)
        return flat.view(self.out_features, self.in_features)

    def masked_weight(self) -> torch.Tensor:
        """W_eff ⊙ M (out, in): the current values at the masked positions, zero elsewhere."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        return flat.index_put((self.index,), self.values).view(self.out_features, -1)

    # ------------------------------------------------------------------ rules
    def nuclear_grad(self) -> torch.Tensor:
        """∂‖W_eff ⊙ M‖_*/∂v = (U Vᵀ)[M] over the nonzero singular values."""
        from rankwise import linalg

        X = self.masked_weight().detach()
        U, S, Vh = linalg.svd(X)
        keep = S > S.max().clamp_min(torch.finfo(S.dtype).tiny) * max(X.shape) * \
            torch.finfo(S.dtype).eps
        G = U[:, keep] @ Vh[keep]
        return G.reshape(-1)[self.index].to(self.values.dtype)

    @torch.no_grad()
    def reselect_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-select M on the current W_eff; freeze the deltas that leave the mask; swap the new
        v into `optimizer` (its state for v starts fresh)."""
        old = self.values
        w_orig = self._base_flat()
        if not torch.equal(w_orig[self.index], self.w0):
            raise RuntimeError("SaRA mask re-selection needs the unmerged layer: call "
                               "rankwise.adapt.unmerge_(model) before training on")
        delta = self.delta_weight().reshape(-1)
        w_eff = w_orig + delta
        index = torch.nonzero(w_eff.abs() < self.config.threshold).reshape(-1)
        outside = torch.ones_like(delta, dtype=torch.bool)
        outside[index] = False
        frozen = torch.nonzero(outside & (delta != 0)).reshape(-1)
        self.frozen_index = frozen
        self.frozen_delta = delta[frozen].clone()
        self._set_mask(index, w_eff[index], w_orig)
        self.values.requires_grad_(old.requires_grad)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [self.values if p is old else p for p in group["params"]]
            optimizer.state.pop(old, None)

    @classmethod
    def group_before_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Add λ·∂‖W⊙M‖_*/∂v to one randomly drawn eligible layer's gradient."""
        eligible = [m for m in methods if isinstance(m, SaRA) and m.config.lambda_rank > 0
                    and min(m.out_features, m.in_features) > m.config.nuclear_min_dim
                    and m.values.grad is not None]
        if not eligible:
            return
        gen = make_generator(int(state.step))
        m = eligible[int(torch.randint(len(eligible), (1,), generator=gen))]
        if m.values.numel() > m.config.nuclear_min_masked:
            m.values.grad.add_(m.nuclear_grad(), alpha=m.config.lambda_rank)

    @classmethod
    def group_after_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Re-select every layer's mask once `progressive_iter` steps have completed."""
        for m in methods:
            if isinstance(m, SaRA) and m.config.progressive_iter == state.step + 1:
                m.reselect_(state.optimizer)
                m.reselected_at = state.step + 1
