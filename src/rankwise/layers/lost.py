"""LOST: an SVD split into a dominant low-rank part plus a channel-wise sparse part.

Li et al., "LOST: Low-rank and Sparse Pre-training for Large Language Models" (2025). The paper
SVDs each weight at initialisation, keeps the top-r singular triplets as a trainable low-rank
component and builds a *channel-wise* (whole rows or columns) sparse component from the remaining
singular values/vectors; both are trained end to end from scratch.

What the abstract confirms is above; the rest is our reading, not fixed by the paper (the
official repository could not be read):

    W0 = U S V^T;   B = U_r S_r^{1/2} (out, r),  A = S_r^{1/2} V_r^T (r, in)   (Eckart-Young part)
    E  = W0 - B A = sum_{i>r} s_i u_i v_i^T                                     (residual)
    channels = the k columns (channel_dim="in") or rows ("out") of E with the largest L2 norm
    S  = E restricted to those channels: (out, k) or (k, in), trainable, channel indices fixed
    y  = B (A x) + S x[channels]            (in)   |   y[channels] += S x    (out)

so at init BA + scatter(S) equals W0 on the kept channels and the rank-r truncation elsewhere;
with every channel kept it is W0 exactly (the tests check it). There is no scale between the parts.
Defaults (not fixed by the paper, chosen here): channel_dim "in", density 0.05 of the channels.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rankwise.layers._base import (
    ParameterizedLinear,
    check_fraction,
    check_rank,
    linear_bias,
    linear_weight,
)
from rankwise.linalg import compute_dtype

__all__ = ["LOSTLinear"]

ChannelDim = Literal["in", "out"]


class LOSTLinear(ParameterizedLinear):
    """`y = B (A x) + S x[channels] + b` (channel_dim "in"), or S added to the `channels` rows.

    Build with `from_linear` (the SVD split); the constructor takes ready tensors.

    Attributes:
        B (out, r), A (r, in), S (out, k) or (k, in): parameters. channels (k,) int64 buffer.
    """

    method = "lost"

    def __init__(
        self,
        B: torch.Tensor,
        A: torch.Tensor,
        S: torch.Tensor,
        channels: torch.Tensor,
        channel_dim: ChannelDim = "in",
        bias: torch.Tensor | None = None,
    ) -> None:
        m, n = B.shape[0], A.shape[1]
        super().__init__(n, m, bias is not None, B.device, B.dtype)
        if channel_dim not in ("in", "out"):
            raise ValueError(
                f"channel_dim must be 'in' (columns) or 'out' (rows), got {channel_dim!r}"
            )
        k = channels.numel()
        want = (m, k) if channel_dim == "in" else (k, n)
        if tuple(S.shape) != want:
            raise ValueError(
                f"S must have shape {want} for {k} {channel_dim}-channels, got {tuple(S.shape)}"
            )
        self.rank = check_rank(A.shape[0], m, n)
        self.channel_dim = channel_dim
        self.B = nn.Parameter(B.detach().clone())
        self.A = nn.Parameter(A.detach().clone().to(B.dtype))
        self.S = nn.Parameter(S.detach().clone().to(B.dtype))
        self.register_buffer("channels", channels.detach().clone().long().to(B.device))
        self._set_bias_(bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        density: float | None = 0.05,
        channels: int | None = None,
        channel_dim: ChannelDim = "in",
        generator: torch.Generator | None = None,
    ) -> LOSTLinear:
        """The LOST split of `linear.weight` (its pretrained or freshly initialised value).

        Args:
            rank: r of the low-rank part.
            density: fraction of the channels (in (0, 1)) that get a sparse column/row;
                k = max(1, round(density * channels)). Ignored when `channels` is given.
            channels: k directly, 0 <= k <= number of channels (k = all reconstructs W).
            channel_dim: "in" selects columns (input channels), "out" rows.
            generator: unused (the split is deterministic); accepted for convert_.
        """
        from rankwise import linalg

        weight = linear_weight(linear)
        m, n = weight.shape
        rank = check_rank(rank, m, n)
        if channel_dim not in ("in", "out"):
            raise ValueError(
                f"channel_dim must be 'in' (columns) or 'out' (rows), got {channel_dim!r}"
            )
        total = n if channel_dim == "in" else m
        if channels is None:
            if density is None:
                raise ValueError(
                    "pass density=... (fraction of channels) or channels=... (a count)"
                )
            frac = check_fraction(
                density, "density", f"{channel_dim}-channels kept in the sparse part"
            )
            k = max(1, round(frac * total))
        else:
            if (
                isinstance(channels, bool)
                or not isinstance(channels, int)
                or not 0 <= channels <= total
            ):
                raise ValueError(f"channels must be an int in [0, {total}], got {channels!r}")
            k = channels
        work = weight.detach().to(compute_dtype(weight.dtype))
        U, S, Vh = linalg.truncated_svd(work, rank)
        B, A = linalg.split_factors(U, S, Vh)
        residual = work - B @ A  # (out, in): the tail sum_{i>r} s_i u_i v_i^T
        norms = residual.norm(dim=0 if channel_dim == "in" else 1)
        idx = (
            torch.topk(norms, k).indices.sort().values
            if k
            else norms.new_zeros(0, dtype=torch.long)
        )
        sparse = residual[:, idx] if channel_dim == "in" else residual[idx, :]
        bias = linear_bias(linear)
        dt = weight.dtype
        return cls(B.to(dt), A.to(dt), sparse.to(dt), idx, channel_dim, bias)

    @property
    def num_channels(self) -> int:
        return self.channels.numel()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.B, self.A

    def delta_weight(self) -> torch.Tensor:
        """The low-rank part B A, (out, in)."""
        return self.B @ self.A

    def sparse_dense(self) -> torch.Tensor:
        """S scattered into its channels of a dense (out, in) zero matrix (differentiable)."""
        dense = self.S.new_zeros(self.out_features, self.in_features)
        dim = 1 if self.channel_dim == "in" else 0
        return dense.index_add(dim, self.channels, self.S)

    def dense_weight(self) -> torch.Tensor:
        return self.delta_weight() + self.sparse_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, A, S = self.B.to(x.dtype), self.A.to(x.dtype), self.S.to(x.dtype)
        y = (x @ A.T) @ B.T  # (..., in) -> (..., r) -> (..., out)
        if self.num_channels:
            if self.channel_dim == "in":
                y = y + x.index_select(-1, self.channels) @ S.T  # (..., k) -> (..., out)
            else:
                y = y.index_add(-1, self.channels, x @ S.T)  # (..., k) into the kept rows
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        frac = self.num_channels / (
            self.in_features if self.channel_dim == "in" else self.out_features
        )
        return (
            f"{super().extra_repr()}, rank={self.rank}, channels={self.num_channels} "
            f"({self.channel_dim}, {frac:.3g})"
        )
