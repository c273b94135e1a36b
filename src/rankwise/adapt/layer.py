"""`AdapterLayer`: a frozen base layer plus one adapter method, mergeable in place.

    y = method(x, base_layer(x))          adapter active, unmerged
    y = base_layer(x)                     merged (the base weight holds the merged matrix)
    y = base_layer(x) + offset · x        disabled (offset = 0 except for base-mutating methods
                                          such as PiSSA, whose stored base is W − offset)

So `disable_adapter` always gives the original model's output, and `unload` restores the
original layer for every method (exact to float rounding).

Merging works on the (out, in) view of the weight in fp32 and casts back:
``W ← method.merged_weight(W)`` and back with ``method.unmerged_weight`` (exact up to rounding:
W + ΔW − ΔW; DoRA keeps the column norm ‖W + ΔW‖_c it merged with, so unmerge divides by
the same norm: Liu et al. 2024, eq. 5).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import AdapterMethod

logger = logging.getLogger(__name__)


class AdapterLayer(nn.Module):
    """Wrap `base_layer` (frozen) with `adapter` (an `AdapterMethod`).

    Attributes:
        base_layer: the original module; its weight holds W, or W − offset for base-mutating
            methods, or the merged weight while `merged`.
        adapter: the method instance (its parameters are the trainable ones).
        merged: the adapter is folded into the base weight.
        disabled: forward returns the original layer's output.
    """

    def __init__(self, base_layer: nn.Module, adapter: AdapterMethod, geometry: Geometry) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.geometry = geometry
        self.merged = False
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.train(base_layer.training)  # follow the model's mode (eval stays eval)

    @property
    def method_name(self) -> str:
        return self.adapter.name

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return base_out
        if self.disabled:
            offset = self.adapter.offset_weight()
            if offset is None:
                return base_out
            return base_out + self._apply_dense(x, offset, base_out.dtype)
        method = self.adapter
        if method.has_rules and self.training and torch.is_grad_enabled():
            if not method.rules_attached:
                raise RuntimeError(
                    f"adapter method {method.name!r} has training-time rules that are not "
                    "attached, so training would silently degrade it: call "
                    "rankwise.adapt.attach_rules(model, optimizer) after building the optimizer "
                    "(or add rankwise.adapt.rules_callback() to a transformers Trainer)"
                )
            method.train_forwards += 1
        return method(x, base_out, self.geometry)

    def _apply_dense(self, x: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype
                     ) -> torch.Tensor:
        if not self.geometry.takes_indices:
            x = x.to(matrix.dtype)
        return self.geometry.apply_in(x, matrix).to(dtype)

    # ------------------------------------------------------------------ LowRankLinear-style views
    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """The original (out, in) weight W in the compute dtype, whatever the merge state."""
        w = self.geometry.compute_weight()
        if self.merged:
            w = self.adapter.unmerged_weight(w)
        offset = self.adapter.offset_weight()
        return w if offset is None else w + offset.detach().to(w.dtype)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight the adapted layer applies (what merging writes)."""
        w = self.geometry.compute_weight()
        return w if self.merged else self.adapter.merged_weight(w)

    def delta_weight(self) -> torch.Tensor:
        """Effective update over the original layer: effective_weight() − original_weight()
        (LoRA: s·BA; PiSSA: s(BA − B₀A₀); DoRA: W' − W)."""
        return self.effective_weight() - self.original_weight()

    def trainable_names(self) -> tuple[str, ...]:
        """Names of the adapter's trainable tensors, e.g. ("A", "B")."""
        return tuple(n for n, p in self.adapter.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------ base weight edits
    def apply_offset_(self) -> None:
        """Store W − offset as the base (called once after init or load of a mutating method)."""
        offset = self.adapter.offset_weight()
        if offset is not None:
            w = self.geometry.compute_weight()
            self.geometry.set_weight(w - offset.to(w.dtype))

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the adapter into the base weight (no-op if merged)."""
        if self.merged:
            return
        self._warn_if_rules_never_ran("merging")
        w = self.geometry.compute_weight()
        self.geometry.set_weight(self.adapter.merged_weight(w))
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Undo `merge_` (no-op if not merged)."""
        if not self.merged:
            return
        w = self.geometry.compute_weight()
        self.geometry.set_weight(self.adapter.unmerged_weight(w))
        self.merged = False

    @torch.no_grad()
    def restore_base_(self) -> nn.Module:
        """Unmerge, add the offset back and return the original base layer (W restored)."""
        self.unmerge_()
        offset = self.adapter.offset_weight()
        if offset is not None:
            w = self.geometry.compute_weight()
            self.geometry.set_weight(w + offset.to(w.dtype))
        for p in self.base_layer.parameters():
            p.requires_grad_(True)
        return self.base_layer

    @torch.no_grad()
    def merged_base_(self) -> nn.Module:
        """Merge and return the base layer holding the adapted weight."""
        self.merge_()
        for p in self.base_layer.parameters():
            p.requires_grad_(True)
        return self.base_layer

    def _warn_if_rules_never_ran(self, doing: str) -> None:
        m = self.adapter
        if m.has_rules and m.train_forwards > 0 and m.rule_steps == 0:
            warnings.warn(
                f"{doing} a {m.name!r} adapter that ran {m.train_forwards} training forwards "
                "but whose training-time rule never ran (no optimizer step with attached "
                "rules): the result is not the method the config names",
                RuntimeWarning,
                stacklevel=3,
            )

    def extra_repr(self) -> str:
        state = "merged" if self.merged else ("disabled" if self.disabled else "active")
        return f"method={self.adapter.name!r}, {state}"
