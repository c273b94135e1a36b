"""FactorizedLinear: a dense linear replaced by two real matmuls, `y = B (A x) + bias`.

This is the storage form of every post-training factorisation in rankwise (LoRD, FWSVD,
ASVD, SVD-LLM, WeLore, D-Rank, AFM; rankwise.compress cites each paper):
A (rank, in) is applied first, B (out, rank) second and carries the bias. A rank-r layer stores
`r * (in + out)` weights (+ `out` bias) against `in * out` dense, and costs `2 r (in + out)`
FLOPs per token against `2 in out`, so it is smaller *and* faster only below the break-even rank
`in * out / (in + out)`: `from_dense` refuses ranks at or above it unless told otherwise.

Safetensors / state-dict naming (documented, stable; `save_compressed` relies on it). For a
module at fully qualified name `fqn`:

    {fqn}.A.weight   (rank, in_features)    applied first
    {fqn}.B.weight   (out_features, rank)   applied second
    {fqn}.B.bias     (out_features,)        only when the layer has a bias

Because A and B are ordinary `nn.Linear` children, PEFT, quantisers and `torch.compile` see two
plain linears; nothing here needs custom kernels or `trust_remote_code`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rankwise import linalg
from rankwise.layers._base import check_features, linear_bias
from rankwise.linalg import break_even_rank, factorized_params, validate_rank

__all__ = ["FactorizedLinear", "dense_parameters", "factorized_parameters", "saves_parameters"]


def dense_parameters(out_features: int, in_features: int, bias: bool = False) -> int:
    """Parameters of a dense `(out, in)` linear (+ bias)."""
    return out_features * in_features + (out_features if bias else 0)


def factorized_parameters(out_features: int, in_features: int, rank: int, bias: bool = False) -> int:
    """Parameters of a rank-`rank` FactorizedLinear: `rank (in + out)` (+ bias on B)."""
    return factorized_params(out_features, in_features, rank) + (out_features if bias else 0)


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank-`rank` factors are strictly smaller than the dense weight.

    `rank (m + n) < m n`, i.e. `rank <= rankwise.linalg.break_even_rank(m, n)`. The
    bias is the same on both sides, so it does not enter the comparison.
    """
    return rank <= break_even_rank(out_features, in_features)


class FactorizedLinear(nn.Module):
    """`y = B (A x) + bias`, A `(rank, in)` then B `(out, rank)`; a drop-in for `nn.Linear`.

    Args:
        in_features: input width n.
        out_features: output width m.
        rank: inner width r (1 <= r <= min(m, n)).
        bias: whether B carries a bias of shape (m,).
        device, dtype: as for `nn.Linear`.

    Attributes:
        A: `nn.Linear(n, r, bias=False)`, weight (r, n).
        B: `nn.Linear(r, m, bias=bias)`, weight (m, r).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        validate_rank(rank, out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_factors(
        cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None
    ) -> FactorizedLinear:
        """Build from factors B (out, r) and A (r, in) (+ bias (out,)); dtype/device of B."""
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"factors must be B (out, r) and A (r, in) with matching r, got B {tuple(B.shape)} "
                f"and A {tuple(A.shape)}: pass B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T"
            )
        if bias is not None and tuple(bias.shape) != (B.shape[0],):
            raise ValueError(f"bias must have shape ({B.shape[0]},), got {tuple(bias.shape)}")
        for name, t in (("B", B), ("A", A), ("bias", bias)):
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"factor {name} contains NaN or Inf: check the source weights and statistics")
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None, device=B.device, dtype=B.dtype)
        with torch.no_grad():
            layer.A.weight.copy_(A.to(B.dtype))
            layer.B.weight.copy_(B)
            if bias is not None:
                layer.B.bias.copy_(bias.to(B.dtype))
        return layer

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, rank: int, *, allow_no_saving: bool = False
    ) -> FactorizedLinear:
        """Plain truncated SVD of `linear.weight` (LoRD, Kaushal et al. 2023): `B A = U_r S_r V_r^T`,
        the best rank-r approximation in Frobenius and spectral norm (Eckart & Young 1936).

        The SVD runs in fp32 (fp64 when the weight is fp64) and the factors are balanced
        (`B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T`), then cast back to the layer's dtype.

        Args:
            linear: the dense layer, weight (out, in).
            rank: kept rank r.
            allow_no_saving: permit `r >= out*in/(out+in)` (e.g. to check that full rank is
                lossless); by default such a rank raises, since it would add parameters.
        """
        weight = _weight_of(linear)
        m, n = weight.shape
        validate_rank(rank, m, n)
        if not allow_no_saving and not saves_parameters(m, n, rank):
            raise ValueError(
                f"rank {rank} does not save parameters for a ({m}, {n}) weight (break-even "
                f"{m * n / (m + n):.1f}): choose rank < {m * n / (m + n):.1f}, keep the layer dense, "
                "or pass allow_no_saving=True"
            )
        work = weight.detach().to(linalg.compute_dtype(weight.dtype))
        if not torch.isfinite(work).all():
            raise ValueError("weight contains NaN or Inf: the layer cannot be factorised")
        U, S, Vh = linalg.truncated_svd(work, rank)
        B, A = linalg.split_factors(U, S, Vh)
        bias = linear_bias(linear)
        return cls.from_factors(B.to(weight.dtype), A.to(weight.dtype), bias)

    # ------------------------------------------------------------------ forward / views
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))  # (..., in) -> (..., r) -> (..., out)

    @property
    def rank(self) -> int:
        return self.A.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in)), the live parameters."""
        return self.B.weight, self.A.weight

    def dense_weight(self) -> torch.Tensor:
        """The dense weight `B A` (out, in) this layer represents (as
        `ParameterizedLinear.dense_weight`)."""
        return self.B.weight @ self.A.weight

    def delta_weight(self) -> torch.Tensor:
        """Deprecated name of `dense_weight` (B A is the whole weight, not an update ΔW: in
        rankwise ``delta_weight`` means ΔW, as in the adapters)."""
        warnings.warn("FactorizedLinear.delta_weight() is deprecated: it is the whole weight B A; "
                      "call dense_weight()", DeprecationWarning, stacklevel=2)
        return self.dense_weight()

    def trainable_names(self) -> tuple[str, ...]:
        return ("A.weight", "B.weight") + (("B.bias",) if self.B.bias is not None else ())

    def num_parameters(self) -> int:
        return factorized_parameters(self.out_features, self.in_features, self.rank, self.B.bias is not None)

    def to_dense(self) -> nn.Linear:
        """An `nn.Linear` with weight `B A` and the same bias (exact up to rounding)."""
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.B.bias is not None,
            device=self.B.weight.device, dtype=self.B.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.B.bias is not None:
                dense.bias.copy_(self.B.bias)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.B.bias is not None}"
        )


def _weight_of(linear: nn.Module) -> torch.Tensor:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"expected an nn.Linear-like module with a 2-D weight (out, in), got {type(linear).__name__}"
        )
    return weight
