"""SLTrain: a sparse plus low-rank weight with a random, fixed support.

Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining" (NeurIPS 2024). The weight is

    W = (alpha / r) B A + S,      B (out, r) = 0 at init, A (r, in) Kaiming-uniform(a=sqrt 5),

and S has a support Omega of exactly nnz = floor(density * out * in) flat indices, drawn
uniformly without replacement at init (the reference `randperm(m n)[:nnz]`, sorted) and never
changed. Only the nnz values are parameters, shape (nnz,), initialised U(-1/sqrt(in), 1/sqrt(in));
the support is an int32 buffer (the reference keeps int64; int32 halves it and addresses up to
2^31 entries). There is no dense weight: the method trains from scratch, so `from_linear` takes
only the shape, bias and dtype of the layer it replaces.

Forward and backward go through one autograd Function that never keeps a dense (out, in)
tensor between the two passes (the reference uses CUDA kernels for the same purpose): the
forward forms W transiently and applies it; the backward recomputes it for dL/dx and gathers
the dense weight gradient dL/dW = dY^T X at Omega for the values (Han et al. 2024, eq. 3), while
dL/dB = (alpha/r) dL/dW A^T and dL/dA = (alpha/r) B^T dL/dW.

Defaults: density 0.03 (the paper's scripts); alpha 32 (the reference `SpLoRaModel` default;
its 130M/1B scripts use alpha 16/8 at r 256/512).

Optional learned scaling (the reference's ``trainable_scaling``, inherited from ReLoRA): the
scale alpha / r is replaced by tanh(s) with a scalar parameter s initialised to 1, so
W = tanh(s) B A + S. The factor multiplies B before the autograd Function (an (out, r)
product), so ds gets its gradient from autograd and the Function is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers._base import (
    ParameterizedLinear,
    check_fraction,
    check_rank,
    cpu_generator,
    kaiming_uniform,
)

__all__ = ["SLTrainLinear", "sltrain_nnz"]


def sltrain_nnz(out_features: int, in_features: int, density: float) -> int:
    """|Omega| = floor(density * out * in), the reference's `int(density * m * n)`."""
    return int(density * out_features * in_features)


class _SparsePlusLowRank(torch.autograd.Function):
    """y = x (scale B A + scatter(values, Omega))^T without saving the dense weight."""

    @staticmethod
    def _weight(B, A, values, index, scale, shape):  # (out, in), transient
        W = (B @ A) * scale
        W.view(-1).index_add_(0, index, values)
        return W.view(shape)

    @staticmethod
    def forward(ctx, x, B, A, values, index, scale, shape):  # type: ignore[override]
        ctx.save_for_backward(x, B, A, values, index)
        ctx.scale, ctx.shape = scale, shape
        # one compute dtype: autocast's when active (a Function body runs under it, and
        # index_add_ / matmul refuse mixed dtypes), else the inputs' own
        device = x.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(x.dtype, B.dtype))
        W = _SparsePlusLowRank._weight(B.to(dtype), A.to(dtype), values.to(dtype), index, scale,
                                       shape)
        return x.to(dtype) @ W.T  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        saved_x, saved_B, saved_A, saved_values, index = ctx.saved_tensors
        x, B, A, values = (t.to(gy.dtype) for t in (saved_x, saved_B, saved_A, saved_values))
        scale, (m, n) = ctx.scale, ctx.shape
        gx = gB = gA = gv = None
        if ctx.needs_input_grad[0]:
            gx = gy @ _SparsePlusLowRank._weight(B, A, values, index, scale, (m, n))
        if any(ctx.needs_input_grad[1:4]):
            gW = gy.reshape(-1, m).T @ x.reshape(-1, n)  # dL/dW (out, in), transient
            if ctx.needs_input_grad[1]:
                gB = (gW @ A.T) * scale
            if ctx.needs_input_grad[2]:
                gA = (B.T @ gW) * scale
            if ctx.needs_input_grad[3]:
                gv = gW.view(-1).index_select(0, index)  # the dense gradient gathered at Omega
        grads = (gx, gB, gA, gv)  # back in each input's own dtype (fp32 factors under autocast)
        grads = tuple(None if g is None else g.to(t.dtype)
                      for g, t in zip(grads, (saved_x, saved_B, saved_A, saved_values), strict=True))
        return (*grads, None, None, None)


class SLTrainLinear(ParameterizedLinear):
    """`y = x ((alpha/r) B A + S)^T + b` with S stored as (nnz,) values on a fixed support.

    Args:
        in_features, out_features: n, m.
        rank: r, 1 <= r <= min(m, n).
        density: delta in (0, 1), the fraction of the m n entries S may hold.
        alpha: scale numerator (scale = alpha / r).
        trainable_scaling: learn the scale instead: tanh(s), s a scalar parameter init 1
            (the reference's option; alpha is then unused).
        bias: keep a bias (initialised U(-1/sqrt(m), 1/sqrt(m)) as in the reference).
        generator: CPU generator (or seed) for the support and the initial values.

    Attributes:
        B (m, r), A (r, n), values (nnz,): parameters (and scaling (1,) when learned).
        index (nnz,) int32 buffer: flat indices i * n + j of Omega, sorted.
    """

    method = "sltrain"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        density: float = 0.03,
        alpha: float = 32.0,
        bias: bool = True,
        generator: torch.Generator | int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        trainable_scaling: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        m, n = out_features, in_features
        self.rank = check_rank(rank, m, n)
        self.density = check_fraction(density, "density", "weight entries S may hold")
        nnz = sltrain_nnz(m, n, self.density)
        if nnz < 1:
            raise ValueError(
                f"density {density} leaves no nonzero in a ({m}, {n}) weight: choose density >= "
                f"{1 / (m * n):.2g}"
            )
        if m * n > 2**31 - 1:
            raise ValueError(
                f"a ({m}, {n}) weight has more entries than an int32 support can index"
            )
        self.alpha = float(alpha)
        gen = cpu_generator(generator)
        factory = {"device": device, "dtype": dtype}
        index = torch.randperm(m * n, generator=gen)[:nnz].sort().values
        self.register_buffer("index", index.to(device=device, dtype=torch.int32))
        self.B = nn.Parameter(torch.zeros(m, self.rank, **factory))
        self.A = nn.Parameter(kaiming_uniform((self.rank, n), n, gen).to(**factory))
        self.values = nn.Parameter(kaiming_uniform((nnz,), n, gen).to(**factory))
        self._init_bias_(gen)
        self.trainable_scaling = bool(trainable_scaling)
        if self.trainable_scaling:
            self.scaling = nn.Parameter(torch.ones(1, **factory))

    @property
    def scale(self) -> float | torch.Tensor:
        """alpha / r, or tanh(s) (a differentiable 0-d tensor) with learned scaling."""
        if self.trainable_scaling:
            return torch.tanh(self.scaling).reshape(())
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        density: float = 0.03,
        alpha: float = 32.0,
        generator: torch.Generator | int | None = None,
        trainable_scaling: bool = False,
    ) -> SLTrainLinear:
        """A fresh SLTrain layer with the shape, bias presence, device and dtype of `linear`.

        SLTrain pretrains from scratch: the dense weight is not used (and may be discarded).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"SLTrainLinear.from_linear needs an nn.Linear, got {type(linear).__name__}"
            )
        w = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            density,
            alpha,
            bias=linear.bias is not None,
            generator=generator,
            device=w.device,
            dtype=w.dtype,
            trainable_scaling=trainable_scaling,
        )

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense (out, in) tensor (zeros off the support); differentiable in `values`."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        return flat.index_add(0, self.index.long(), self.values).view(
            self.out_features, self.in_features
        )

    def delta_weight(self) -> torch.Tensor:
        """The low-rank part (alpha/r) B A, (out, in)."""
        return (self.B @ self.A) * self.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in)) of the low-rank part (without the alpha/r scale)."""
        return self.B, self.A

    def dense_weight(self) -> torch.Tensor:
        return self.delta_weight() + self.sparse_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, scale = self.B.to(x.dtype), self.scale
        if self.trainable_scaling:  # tanh(s) B: autograd carries ds, the Function sees scale 1
            B, scale = B * scale.to(x.dtype), 1.0
        y = _SparsePlusLowRank.apply(
            x,
            B,
            self.A.to(x.dtype),
            self.values.to(x.dtype),
            self.index.long(),
            scale,
            (self.out_features, self.in_features),
        )
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, density={self.density}, nnz={self.nnz}"
