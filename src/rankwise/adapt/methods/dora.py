"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024, arXiv 2402.09353).

    V = W + s·B A,   n = ‖V‖_row (L2 norm of each of the `out` rows, over `in`; for Conv2d over
    (C_in, kh, kw) per output channel),   W' = (m / n) ⊙_row V,   y = W' x + b

with trainable magnitude m (out,), initialised to ‖W‖_row, so W' = W at init (B = 0). This is
PEFT's axis: ``get_weight_norm`` takes ``torch.linalg.norm(W + sBA, dim=1)`` on the (out, in)
weight, one norm per output feature (the paper's "column norm" of its (in, out) layout).

Forward without forming W' (PEFT ``DoraLinearLayer.forward``; DoRA, Liu et al. 2024, eq. 5):
    y = base_out + (m/n − 1) ⊙ (W x̃) + (m/n) ⊙ s·B A x̃,   x̃ = dropout(x)
where W x̃ is read off the base output (minus bias) when dropout is off or in eval mode.
n is detached from the graph (paper §4.3), so only the gradient differs from full autodiff.

Merge: W ← (m/n) ⊙ (W + sBA) with n computed from the unmerged weight and kept, so that
unmerge W = W'/(m/n) − sBA is exact to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry, compute_dtype
from rankwise.adapt.method import register_method
from rankwise.adapt.methods.lora import LoRABase, LoRAConfig


@register_method("dora")
class DoRA(LoRABase):
    """LoRA direction + trainable per-output magnitude m (out,)."""

    config_cls = LoRAConfig
    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})

    def __init__(self, config: LoRAConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        dtype, device = self.A.dtype, self.A.device
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=dtype, device=device))
        # the norm used by merge_, kept for an exact unmerge (not saved: merge state is runtime)
        self.register_buffer("merge_norm", torch.ones(self.out_features, dtype=torch.float32),
                             persistent=False)

    def initialize(self, ctx: InitContext) -> None:
        """LoRA's A, B (B = 0) and m = ‖W + sBA‖_row = ‖W‖_row."""
        super().initialize(ctx)
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm(ctx.weight()))

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n = ‖W + s·B A‖ per output row (out,), fp32, detached.

        Expanded so that no (out, in) tensor is formed (Pythagoras on each row):
        ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s B_i·(W Aᵀ)_i + s² B_i (A Aᵀ) B_iᵀ. ‖W_i‖² is cached
        while W is unchanged (the base is frozen), W Aᵀ is one (out, in, r) GEMM (the flops of
        forming BA), the rest is O((out + in) r²). The whole n is cached while W, A and B keep
        their versions: several forwards between two optimizer steps (evaluation, gradient
        checkpointing's recomputation) compute it once, where PEFT recomputes it per forward
        in training mode.
        """
        dtype = compute_dtype(weight.dtype)
        A, B = self.A.detach(), self.B.detach()
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), dtype,
               A.data_ptr(), A._version, B.data_ptr(), B._version, self.scale,
               torch.is_inference_mode_enabled())  # an inference tensor can't enter autograd
        cached = getattr(self, "_norm_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        w, a, b, s = weight.detach().to(dtype), A.to(dtype), B.to(dtype), float(self.scale)
        wkey = key[:4]
        base = getattr(self, "_base_sq", None)
        if base is None or base[0] != wkey:
            base = (wkey, w.square().sum(dim=1))
            self._base_sq = base
        cross = (b * (w @ a.T)).sum(dim=1)
        lsq = ((b @ (a @ a.T)) * b).sum(dim=1)
        norm = (base[1] + (2.0 * s) * cross + (s * s) * lsq).clamp_min_(0.0).sqrt_()
        self._norm_cache = (key, norm)
        return norm

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        dtype = self.A.dtype
        norm = self.weight_norm(geo.weight().detach()).to(dtype)
        factor = self.magnitude / norm  # (out,) m/n, n detached (paper §4.3)
        if not geo.takes_indices:
            x = x.to(dtype)
        x_tilde = self.dropout(x)
        lora = geo.apply_features(geo.apply_in(x_tilde, self.A), self.B)
        if not (self.training and self.config.dropout > 0):
            # base_out = W x + b, so y = (m/n) ⊙ (W x + s·B A x) + b: two passes over the
            # output instead of PEFT's five ((m/n − 1) W x + (m/n) s B A x, then + base_out)
            b = geo.bias()
            wx = geo.without_bias(base_out).to(dtype)
            y = geo.scale_features(torch.add(wx, lora, alpha=self.scale), factor)
            if b is not None:
                y = y + (b.view(1, -1, 1, 1) if geo.kind == "conv2d" else b).to(dtype)
            return y.to(base_out.dtype)
        wx = geo.apply_in(x_tilde, geo.weight().to(dtype))
        extra = geo.scale_features(wx, factor - 1) + geo.scale_features(lora * self.scale, factor)
        return base_out + extra.to(base_out.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' = (m/n) ⊙_row (W + sBA), caching n for `unmerged_weight`."""
        norm = self.weight_norm(weight)
        self.merge_norm = norm.clone()  # replaces the buffer (keeps the compute dtype)
        factor = (self.magnitude.detach().to(norm.dtype) / norm)[:, None]
        return factor * (weight + self.delta_weight().detach().to(weight.dtype))

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """W = W' / (m/n) − sBA with the n cached at merge time."""
        norm = self.merge_norm.to(merged.dtype)
        factor = (self.magnitude.detach().to(norm.dtype) / norm)[:, None]
        return merged / factor - self.delta_weight().detach().to(merged.dtype)
