"""Sparse Spectral Training: all singular values trained, a sampled few singular vectors.

Zhao et al., "Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural
Networks". The weight is kept in spectral form

    W = U diag(sigma) V^T,   U (out, a), sigma (a,), V^T (a, in),   a = min(out, in),

initialised by the SVD of the layer's weight. Every singular value is a trainable parameter;
of the singular vectors only r sampled pairs (u_i, v_i), i in I, are trainable at a time, drawn
by multinomial sampling without replacement with p_i = |sigma_i| / sum |sigma| (the abstract's
"multinomial sampling weighted by the significance of the singular values"). Periodically the
sampled columns are written back and I is redrawn (`resample_`), and the spectral form is
re-orthonormalised by an SVD of the current W (`resvd_`), which leaves W unchanged.

Layout (why): the frozen U, V^T are `requires_grad=False` parameters; the sampled columns live
in two small trainable parameters U_s (out, r), Vh_s (r, in), so the optimizer state is
2 (r (out + in) + a) instead of 2 out in. The forward substitutes them into U, V^T
(`index_copy`), so the gradient reaches only the sampled vectors and sigma.

Not fixed by the paper (no official code found): the sampling and re-SVD periods, whether the
optimizer state of sigma is reset on a re-SVD, and the paper's "enhanced gradient", which drops
the sigma_i factor from the vector gradients (dL/du_i = G v_i instead of G v_i sigma_i); it is
available as `enhanced_grad=True` and off by default (with Adam a per-column rescaling mostly
cancels anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers._base import ParameterizedLinear, check_rank, linear_bias, linear_weight
from rankwise.layers.restarts import reset_optimizer_state_
from rankwise.layers.schedules import LayerSchedule, _check_every
from rankwise.linalg import compute_dtype, make_generator

__all__ = ["SSTSchedule", "SSTLinear", "sample_indices"]


def sample_indices(
    sigma: torch.Tensor, rank: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`rank` distinct indices drawn with probability proportional to |sigma| (sorted, int64, CPU).

    All-zero sigma falls back to uniform sampling.
    """
    weights = sigma.detach().abs().double().cpu()
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("singular values contain NaN or Inf: the training diverged; lower the LR")
    if float(weights.sum()) <= 0.0:
        weights = torch.ones_like(weights)
    # multinomial without replacement needs at least `rank` nonzero weights
    positive = int((weights > 0).sum())
    if positive < rank:
        weights = weights + (weights == 0).double() * 1e-12 * max(float(weights.max()), 1.0)
    return torch.multinomial(weights, rank, replacement=False, generator=generator).sort().values


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` (broadcast) backward."""

    @staticmethod
    def forward(ctx, x, scale):  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return g * scale, None


class SSTLinear(ParameterizedLinear):
    """`y = U diag(sigma) V^T x + b`, sigma and r sampled (u_i, v_i) pairs trainable.

    Build with `from_linear` (SVD of the weight).

    Attributes:
        U (out, a), Vh (a, in): frozen parameters (the non-sampled vectors are read from here).
        sigma (a,): trainable. U_s (out, r), Vh_s (r, in): trainable copies of the sampled
        columns / rows. sampled (r,) int64 buffer: I.
    """

    method = "sst"

    def __init__(
        self,
        U: torch.Tensor,
        sigma: torch.Tensor,
        Vh: torch.Tensor,
        rank: int,
        bias: torch.Tensor | None = None,
        enhanced_grad: bool = False,
        generator: torch.Generator | int | None = None,
    ) -> None:
        m, a = U.shape
        n = Vh.shape[1]
        if sigma.shape != (a,) or Vh.shape[0] != a:
            raise ValueError(
                f"need U (out, a), sigma (a,), Vh (a, in); got {tuple(U.shape)}, "
                f"{tuple(sigma.shape)}, {tuple(Vh.shape)}"
            )
        super().__init__(n, m, bias is not None, U.device, U.dtype)
        self.rank = check_rank(rank, m, n)
        self.enhanced_grad = bool(enhanced_grad)
        self.U = nn.Parameter(U.detach().clone(), requires_grad=False)
        self.Vh = nn.Parameter(Vh.detach().clone().to(U.dtype), requires_grad=False)
        self.sigma = nn.Parameter(sigma.detach().clone().to(U.dtype))
        idx = sample_indices(self.sigma, self.rank, make_generator(generator)).to(U.device)
        self.register_buffer("sampled", idx)
        self.U_s = nn.Parameter(self.U.detach()[:, idx].clone())
        self.Vh_s = nn.Parameter(self.Vh.detach()[idx, :].clone())
        self._set_bias_(bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        enhanced_grad: bool = False,
        generator: torch.Generator | int | None = None,
    ) -> SSTLinear:
        """Spectral form of `linear.weight` (full SVD, exact) with r sampled vector pairs."""
        from rankwise import linalg

        weight = linear_weight(linear)
        check_rank(rank, *weight.shape)
        U, S, Vh = linalg.svd(weight.detach().to(compute_dtype(weight.dtype)))
        dt = weight.dtype
        bias = linear_bias(linear)
        return cls(U.to(dt), S.to(dt), Vh.to(dt), rank, bias, enhanced_grad, generator)

    # ------------------------------------------------------------------ forward
    def _vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U (out, a) and Vh (a, in) with the trainable sampled vectors substituted."""
        U_s, Vh_s = self.U_s, self.Vh_s
        if self.enhanced_grad:
            inv = 1.0 / self.sigma.detach()[self.sampled].abs().clamp_min(1e-6)
            U_s = _ScaleGrad.apply(U_s, inv.unsqueeze(0))
            Vh_s = _ScaleGrad.apply(Vh_s, inv.unsqueeze(1))
        return self.U.index_copy(1, self.sampled, U_s), self.Vh.index_copy(0, self.sampled, Vh_s)

    def dense_weight(self) -> torch.Tensor:
        U, Vh = self._vectors()
        return (U * self.sigma) @ Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Forming W (out a in multiply-adds) and applying it once is cheaper than two
        # per-token products through the a-wide spectrum ((out + in) a per token) as soon as
        # a batch holds more than ~a tokens; autograd still routes the gradient to sigma, U_s, Vh_s.
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    # ------------------------------------------------------------------ schedule actions
    @torch.no_grad()
    def sync_(self) -> None:
        """Write the trained sampled vectors back into U, Vh."""
        self.U.index_copy_(1, self.sampled, self.U_s)
        self.Vh.index_copy_(0, self.sampled, self.Vh_s)

    @torch.no_grad()
    def resample_(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a new index set I (p ~ |sigma|) and load its vectors into U_s, Vh_s.

        The layer's output is unchanged; the optimizer state of U_s / Vh_s now refers to other
        vectors and should be reset by the caller (SSTSchedule does it). Returns I.
        """
        self.sync_()
        idx = sample_indices(self.sigma, self.rank, generator).to(self.sampled.device)
        self.sampled.copy_(idx)
        self.U_s.copy_(self.U[:, idx])
        self.Vh_s.copy_(self.Vh[idx, :])
        return idx

    @torch.no_grad()
    def resvd_(self) -> None:
        """Re-orthonormalise: SVD of the current W, U sigma V^T <- svd(W); W is unchanged.

        The sampled index set is kept (it now points at the new vectors with those ranks).
        """
        from rankwise import linalg

        self.sync_()
        W = self._dense_weight_fp32()
        U, S, Vh = linalg.svd(W)
        self.U.copy_(U)
        self.sigma.copy_(S)
        self.Vh.copy_(Vh)
        self.U_s.copy_(self.U[:, self.sampled])
        self.Vh_s.copy_(self.Vh[self.sampled, :])

    def to_factorized(self, rank: int | None = None) -> nn.Module:
        """FactorizedLinear of the spectral form: all a triplets (exact), or the top-`rank` by |sigma|."""
        from rankwise.layers.factorized import FactorizedLinear

        with torch.no_grad():
            U, Vh = self._vectors()
            sigma = self.sigma.detach()
            keep = (
                sigma.numel()
                if rank is None
                else check_rank(rank, self.out_features, self.in_features)
            )
            order = torch.argsort(sigma.abs(), descending=True)[:keep]
            root = sigma[order].abs().sqrt()
            B = U[:, order] * (root * torch.sign(sigma[order]))  # sign folded into B
            A = root.unsqueeze(1) * Vh[order, :]
            bias = self.bias.detach() if self.bias is not None else None
            return FactorizedLinear.from_factors(B, A, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spectrum={self.sigma.numel()}, sampled={self.rank}"


class SSTSchedule(LayerSchedule):
    """Every `every` updates redraw the sampled singular vectors; every `svd_every`, re-SVD first.

    The optimizer state of the sampled vectors (and of sigma after a re-SVD, whose entries are
    then re-sorted) is reset to a first step. The paper does not fix the periods.
    """

    layer_type = SSTLinear
    method = "sst"
    needs_optimizer = True

    def __init__(self, model, optimizer=None, *, every=100, svd_every=500, seed=0) -> None:
        super().__init__(model, every=every, optimizer=optimizer, seed=seed)
        self.svd_every = _check_every(svd_every, "svd_every")
        if self.svd_every is not None and self.svd_every % self.every:
            raise ValueError(f"svd_every ({svd_every}) must be a multiple of every ({every})")

    def run(self) -> None:
        resvd = self.svd_every is not None and self.step % self.svd_every == 0
        touched: list[torch.Tensor] = []
        for layer in self.layers.values():
            if resvd:
                layer.resvd_()
                touched.append(layer.sigma)
            layer.resample_(self.generator)
            touched += [layer.U_s, layer.Vh_s]
        reset_optimizer_state_(self.optimizer, touched, mode="full", reset_step=True)
