"""How an adapter sees the layer it wraps: an (out, in) matrix and two ways to apply one.

Every method is written once against this small interface, so the same LoRA/DoRA/PiSSA code
adapts ``nn.Linear``, Hugging Face ``Conv1D`` (GPT-2 stores its weight (in, out): PEFT's
``fan_in_fan_out``), ``nn.Embedding`` and ``nn.Conv2d``:

* ``weight()``: the base weight as an (out, in) view (`rankwise.surgery.weight_as_matrix`):
  Linear ``W``; Conv1D ``W.T``; Embedding ``W.T`` (embedding_dim, num_embeddings), the matrix
  that maps a one-hot token to its vector; Conv2d ``W`` flattened to (out, in * kh * kw).
* ``apply_in(x, M)``: apply a (k, in) matrix to the layer *input*, as the layer applies its own
  weight (a linear map, an embedding lookup of ``M.T``, a convolution with M as the kernel).
* ``apply_features(h, M)``: apply an (o, k) matrix along the feature axis of an intermediate
  (last axis; channel axis 1 for Conv2d), i.e. a 1x1 map.
* ``scale_features(y, v)``: multiply feature i by v_i (DoRA's m/n, VeRA's Λ_b).

So a LoRA branch is ``apply_features(apply_in(x, A), B)`` for every layer kind, and
``apply_in(x, ΔW)`` is the dense fallback for any method that only defines its delta weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise import surgery
from rankwise.linalg import compute_dtype  # noqa: F401  (re-exported: adapters merge in it)

KINDS = ("linear", "conv1d", "embedding", "conv2d")


def layer_kind(module: nn.Module) -> str:
    """One of `KINDS` for a supported module, else TypeError naming the supported types."""
    if isinstance(module, nn.Linear):
        return "linear"
    if surgery._is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    raise TypeError(
        f"cannot adapt a {type(module).__name__}: adapters wrap nn.Linear, transformers Conv1D, "
        "nn.Embedding and nn.Conv2d; target those layers instead"
    )


class Geometry:
    """Shape and apply-helpers of one base layer (holds a reference, owns nothing).

    Attributes:
        kind: "linear" | "conv1d" | "embedding" | "conv2d".
        out_features, in_features: the (out, in) matrix view's shape.
    """

    def __init__(self, module: nn.Module) -> None:
        self.kind = layer_kind(module)
        if self.kind == "conv2d":
            if module.groups != 1:
                raise TypeError(
                    f"cannot adapt a grouped Conv2d (groups={module.groups}): only groups=1 "
                    "convolutions have one (out, in*kh*kw) weight matrix; leave it out of "
                    "target_modules"
                )
            if module.padding_mode != "zeros":
                raise TypeError(
                    f"cannot adapt a Conv2d with padding_mode={module.padding_mode!r}: only "
                    "'zeros' is supported; leave it out of target_modules"
                )
        self.module = module
        self.out_features, self.in_features = surgery.linear_shape(module)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)."""
        return self.out_features, self.in_features

    @property
    def feature_dim(self) -> int:
        """Axis of output features: channels (1) for Conv2d, the last axis otherwise."""
        return 1 if self.kind == "conv2d" else -1

    @property
    def takes_indices(self) -> bool:
        """True for Embedding (integer inputs: no dropout on them)."""
        return self.kind == "embedding"

    def weight(self) -> torch.Tensor:
        """The base weight as an (out, in) view sharing storage with the parameter."""
        return surgery.weight_as_matrix(self.module)

    def compute_weight(self) -> torch.Tensor:
        """The (out, in) weight detached, in the compute dtype (fp32, or fp64 for fp64)."""
        w = self.weight().detach()
        return w.to(compute_dtype(w.dtype))

    def bias(self) -> torch.Tensor | None:
        """The base bias (out,) or None (Embedding has none)."""
        return getattr(self.module, "bias", None)

    @torch.no_grad()
    def set_weight(self, matrix: torch.Tensor) -> None:
        """Write an (out, in) matrix into the base weight in place (cast to its dtype)."""
        if tuple(matrix.shape) != self.shape:
            raise ValueError(f"weight must be {self.shape} (out, in), got {tuple(matrix.shape)}")
        self.weight().copy_(matrix.to(self.module.weight.dtype))

    def apply_in(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Apply a (k, in) matrix to the layer input x the way the layer applies its weight."""
        if self.kind in ("linear", "conv1d"):
            return F.linear(x, matrix)
        if self.kind == "embedding":
            m = self.module
            return F.embedding(x, matrix.T, m.padding_idx, m.max_norm, m.norm_type,
                               m.scale_grad_by_freq, m.sparse)
        m = self.module
        kernel = matrix.reshape(matrix.shape[0], *m.weight.shape[1:])  # (k, C_in, kh, kw)
        return F.conv2d(x, kernel, None, m.stride, m.padding, m.dilation)

    def apply_features(self, h: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Apply an (o, k) matrix along the feature axis of h (a 1x1 map for Conv2d)."""
        if self.kind == "conv2d":
            return F.conv2d(h, matrix[:, :, None, None])
        return F.linear(h, matrix)

    def scale_features(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multiply output feature i of y by v_i (v: (out,))."""
        if self.kind == "conv2d":
            return y * v.view(1, -1, 1, 1)
        return y * v

    def without_bias(self, y: torch.Tensor) -> torch.Tensor:
        """The base output y with the layer's bias taken off (W x alone)."""
        b = self.bias()
        if b is None:
            return y
        return y - (b.view(1, -1, 1, 1) if self.kind == "conv2d" else b)
