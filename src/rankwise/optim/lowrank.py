"""`LowRankOptimizer`: one torch.optim.Optimizer for the GaLore family, configured per group.

Every named method (GaLore, Q-GaLore, Fira, FRUGAL, APOLLO, GradNormLoRP, DCT-AdamW) is a
setting of a few axes, each implemented once:

=============  ====================================================================
axis           group keys (defaults in `GROUP_DEFAULTS`, groups.py)
=============  ====================================================================
projector      ``projector`` (None = plain AdamW group; "svd", "randomized", "dct",
               "random", "random_orthogonal", "randperm", "identity"), ``rank`` or
               ``rank_fraction``, ``update_proj_gap`` T, ``proj_side``, ``proj_bits``
               (8/4, Q-GaLore), ``proj_options`` (dict: oversample, lazy_threshold, ...)
rule           ``rule``: "adam" | "adafactor" | "sgd" (momentum betas[0], no dampening,
               as torch.optim.SGD); ``adam_style`` "torch" | "galore"
               (functional.py says how they differ); ``state_bits`` 32 | 8
precision      ``state_dtype`` (None = the parameter's dtype, as galore-torch; "float32"),
               ``stochastic_rounding`` (bf16 weights written back unbiasedly)
residual       ``residual``: "drop" (GaLore) | "fira" (Fira eq. 6 + limiter) |
               "sign" / "sgd" (FRUGAL's state-free update, lr x ``residual_scale``)
scaling        ``scaling``: None | "channel" | "tensor" (APOLLO: the raw gradient scaled
               by ||N||/||R||; ``limiter`` = Fira's norm-growth limiter)
subspace       ``moment_policy`` on refresh: "keep" (GaLore), "reproject", "reset"
change         (zero moments and restart bias correction, FRUGAL)
=============  ====================================================================

The update itself is `lowrank_update.py`. `step()` first checks every gradient of the step
for NaN/inf in one pass (`precision.all_finite`) and refuses (or, with
``nonfinite="skip"``, skips) the whole step before any parameter or state is touched.

State is tensors only (``step``, ``moment_step``, moments, ``proj_*``, ``limiter_norm``), so
``state_dict()`` is weights_only-loadable and resume is exact. `layerwise.py` runs the same
per-parameter update from gradient hooks during backward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from rankwise.optim import distributed as dist_
from rankwise.optim import groups as groups_
from rankwise.optim import lowrank_update as upd
from rankwise.optim.groups import GROUP_DEFAULTS, resolve_rank
from rankwise.optim.precision import all_finite
from rankwise.optim.projector import Projector, make_projector

logger = logging.getLogger(__name__)

__all__ = ["GROUP_DEFAULTS", "LowRankOptimizer", "resolve_rank"]


class LowRankOptimizer(torch.optim.Optimizer):
    """Low-rank gradient projection optimizer over ordinary param groups.

    Args:
        params: parameters or param-group dicts (any key of `GROUP_DEFAULTS` per group;
            galore-torch's ``proj_type`` is accepted as ``proj_side``). A group with
            ``rank`` (or ``rank_fraction``) and no ``projector`` uses "svd", as galore-torch.
        **defaults: values for keys a group does not set.

    Example (galore-torch's GaLoreAdamW: its groups, its Adam arithmetic, its moments kept
    across refreshes):
        >>> groups = rankwise.optim.param_groups(model, rank=128)  # attn/mlp vs the rest
        >>> opt = LowRankOptimizer(groups, lr=1e-2, projector="svd", scale=0.25,
        ...                        adam_style="galore", eps=1e-6, moment_policy="keep")
    """

    def __init__(self, params: Iterable[Any], **defaults: Any) -> None:
        unknown = set(defaults) - set(GROUP_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown optimizer options {sorted(unknown)}: see GROUP_DEFAULTS")
        if isinstance(defaults.get("state_dtype"), torch.dtype):
            defaults["state_dtype"] = str(defaults["state_dtype"]).removeprefix("torch.")
        self._param_index: dict[int, int] = {}
        super().__init__(params, {**GROUP_DEFAULTS, **defaults})

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = groups_.normalise(param_group)
        unknown = set(group) - set(GROUP_DEFAULTS) - {"params", "name"}
        if unknown:
            raise TypeError(f"unknown param-group keys {sorted(unknown)}: see GROUP_DEFAULTS")
        super().add_param_group(group)
        groups_.validate(self.param_groups[-1], len(self.param_groups) - 1)
        self._param_index = {}

    def _seed(self, p: torch.Tensor, group: dict[str, Any]) -> int:
        if not self._param_index:
            params = (q for g in self.param_groups for q in g["params"])
            self._param_index = {id(q): i for i, q in enumerate(params)}
        return int(group["seed"]) * 1_000_003 + self._param_index[id(p)] + 1

    def projector_for(self, p: torch.Tensor) -> Projector:
        """The projector view over `p`'s state (for inspection and benchmarks)."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return self._projector(p, group, self.state[p])

    def _projector(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> Projector:
        opts = dict(group["proj_options"] or {})
        opts.setdefault("dtype", groups_.state_dtype(p, group))  # the basis follows the state
        if group["proj_bits"] is not None:
            opts["bits"] = group["proj_bits"]
            opts.setdefault("group_size", group["proj_group_size"])
        shape = tuple(p.shape)
        return make_projector(
            group["projector"],
            shape,
            resolve_rank(shape, group),
            side=group["proj_side"],
            state=state,
            seed=self._seed(p, group),
            **opts,
        )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient.

        All gradients are checked for NaN/inf first (one reduction each, one sync): a refused
        step raises FloatingPointError (or, with ``nonfinite="skip"`` in every group, logs and
        returns) with every parameter and every state tensor untouched.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in todo:
            if p.grad.is_sparse:
                raise RuntimeError("LowRankOptimizer does not support sparse gradients")
        if not all_finite([p.grad for p, _ in todo]):
            skip = all(g["nonfinite"] == "skip" for _, g in todo)
            self._refuse(f"{len(todo)} gradients", skip)
            return loss
        for p, group in todo:
            self._update(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Update one parameter from its gradient (the layer-wise hooks call this; the
        finiteness check then covers this parameter only: layers updated earlier in the same
        backward stay updated)."""
        grad = p.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError("LowRankOptimizer does not support sparse gradients")
        if not all_finite([grad]):
            self._refuse(f"the gradient of a {tuple(p.shape)} parameter",
                         group["nonfinite"] == "skip")
            return
        self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if group["block_order"] is not None:
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            upd.block_step(p, p.grad, group, state, index, self._seed(p, group))
        elif group["projector"] is None:
            upd.plain_adamw(p, p.grad, group, state, self._seed(p, group))
        else:
            proj = self._projector(p, group, state)
            upd.lowrank_step(p, p.grad, group, state, proj, self._seed(p, group))

    @staticmethod
    def _refuse(what: str, skip: bool) -> None:
        if skip:
            logger.warning("non-finite values in %s: update skipped (parameters and state "
                           "unchanged)", what)
            return
        raise FloatingPointError(
            f"{what} hold NaN/inf (or overflow float32); nothing was updated: fix the loss "
            "scale or learning rate, or pass nonfinite='skip' to skip such steps"
        )

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict without torch's cast of every state tensor to the parameter dtype
        (which would turn int8 codes, int32 indices and int64 seeds into floats, and fp32
        state of a bf16 parameter into bf16)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        by_id = dict(zip(ids, params, strict=True))
        for pid, st in saved.items():
            p = by_id[pid]
            self.state[p] = {
                key: (val.to(device=dist_.local(p).device, copy=True)
                      if isinstance(val, torch.Tensor) and key not in ("step", "moment_step")
                      else val.clone() if isinstance(val, torch.Tensor) else val)
                for key, val in st.items()
            }

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state: every tensor of every parameter's state."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
