"""One whitened-SVD compressor: LoRD, FWSVD, ASVD and SVD-LLM differ only in the whitener.

Every method here solves, per linear W (m, n),

    min_{rank(W_hat) <= r}  || L (W - W_hat) R ||_F,        W_hat = L^-1 [L W R]_r R^-1

exactly by one SVD of the whitened weight `L W R` (Eckart-Young), then stores
`B = L^-1 U_r sqrt(S_r)` (m, r) and `A = sqrt(S_r) V_r^T R^-1` (r, n) (Eckart-Young-Mirsky).
The whitener chooses L (m, m diagonal) and R (n, n):

| whitener    | L               | R                                  | method (paper)             |
|-------------|-----------------|------------------------------------|----------------------------|
| "none"      | I               | I                                  | LoRD, plain SVD            |
| "act-scale" | I               | diag(abs_mean^alpha + 1e-6)        | ASVD (Yuan 2023), a = 0.5  |
| "fisher"    | I or diag(...)  | diag(sqrt(sum_i F_ij)^alpha) / I   | FWSVD (Hsu 2022), in/out   |
| "cholesky"  | I               | chol(G), G = sum x x^T             | SVD-LLM (Wang 2025)        |
| "eigh"      | I               | Q diag(sqrt(lambda)), G = Q L Q^T  | EoRA (Liu 2024) eq. (1)    |

With a Gram whitener `R R^T = G = X X^T`, so `R^-1 X` has orthonormal rows and
`||(W - W_hat) X||_F^2 = sum_{i > r} sigma_i(W R)^2` (SVD-LLM's truncation-awareness):
the spectrum this compressor reports *is* the calibration loss of each discarded direction,
which is what the rank allocators in rankwise.compress.allocate consume.

Singular covariance (rank-deficient X, dead channels): "cholesky" retries with diagonal jitter
(rankwise.linalg's fallback), "eigh" clamps eigenvalues at a relative floor. `damping` adds
`damping * mean(diag G) * I` first (GPTQ's percdamp), which also regularises held-out behaviour.
FWSVD's 1e-5 floor is relative to the mean importance (scale-free; documented deviation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress.base import InputStats, ObservedStats
from rankwise.layers.factorized import FactorizedLinear
from rankwise.linalg import all_finite

logger = logging.getLogger(__name__)

__all__ = [
    "WHITENERS",
    "SVDConfig",
    "WhitenedSVD",
    "Whitening",
    "build_whitening",
    "whitened_factors",
    "whitened_svd",
]

WHITENERS = ("none", "act-scale", "fisher", "cholesky", "eigh")
_NEEDS = {"none": (), "act-scale": ("abs_mean",), "fisher": ("sq_grad",),
          "cholesky": ("gram",), "eigh": ("gram",)}


@dataclass(frozen=True, kw_only=True)
class SVDConfig:
    """Configuration of `WhitenedSVD`.

    Attributes:
        whitener: one of WHITENERS (see the module table).
        alpha: exponent of the diagonal scalings (ASVD default 0.5; FWSVD is alpha = 1).
        fisher_axis: "in" (one weight per input column, as ASVD's Fisher option) or "out"
            (one per output row, FWSVD's row weighting).
        damping: relative diagonal loading of the Gram, `G + damping * mean(diag G) * I`.
        eig_floor: "eigh" clamps eigenvalues below `eig_floor * max(lambda)` to that floor.
    """

    whitener: str = "cholesky"
    alpha: float = 0.5
    fisher_axis: str = "in"
    damping: float = 0.0
    eig_floor: float = 1e-10

    def __post_init__(self) -> None:
        if self.whitener not in WHITENERS:
            raise ValueError(f"unknown whitener {self.whitener!r}: choose one of {list(WHITENERS)}")
        if self.fisher_axis not in ("in", "out"):
            raise ValueError(f"fisher_axis must be 'in' or 'out', got {self.fisher_axis!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}: use 0 for none, e.g. 1e-2")

    @property
    def needs(self) -> tuple[str, ...]:
        """Statistics (rankwise.calibrate names) this whitener consumes."""
        return _NEEDS[self.whitener]


@dataclass
class Whitening:
    """`W' = diag(left) W R`; `None` means identity. Shapes: left (m,), right (n,) or (n, n).

    `right_inv` is R^-1 in the same form as `right` (a vector for diagonal R); for SVD-LLM's
    Cholesky factor it is None and `right_lower` is set: R^-1 is applied by triangular solves
    (`right_solve`), never formed, which saves two (n, n) fp64 matrices per Gram.
    """

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    right_inv: torch.Tensor | None = None
    right_lower: bool = False

    def right_solve(self, X: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """X R^-1 (X R^-T with `transpose`) in fp64; X (..., n)."""
        from rankwise import linalg

        X = X.to(torch.float64)
        if self.right is None:
            return X
        if self.right_lower:
            return linalg.solve_lower_right(X, self.right, transpose=transpose)
        if self.right_inv is None:
            raise ValueError("this whitening has no inverse of its right factor")
        ri = self.right_inv.to(torch.float64)
        if ri.dim() == 1:
            return X * ri[None, :]
        return X @ (ri.mT if transpose else ri)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """`L W R` (m, n), in the dtype of `weight`."""
        w = weight
        if self.left is not None:
            w = w * self.left.to(w.dtype)[:, None]
        if self.right is not None:
            r = self.right.to(w.dtype)
            w = w * r[None, :] if r.dim() == 1 else w @ r
        return w

    def unwhiten(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors of `L^-1 U S Vh R^-1`: B (m, r), A (r, n), computed in fp64."""
        U, S, Vh = U.to(torch.float64), S.to(torch.float64), Vh.to(torch.float64)
        root = S.clamp_min(0).sqrt()
        B = U * root[None, :]
        A = Vh * root[:, None]
        if self.left is not None:
            B = B / self.left.to(B.dtype)[:, None]
        return B, self.right_solve(A)


def _gram_factor(gram: torch.Tensor, kind: str, damping: float, eig_floor: float):
    """(R, R^-1) with R R^T = G (+ damping), fp64. Cholesky: R lower-triangular and R^-1 None
    (applied by triangular solves, see `Whitening.right_solve`).

    An fp64 Gram is symmetrised in place (`rankwise.linalg.symmetrize_`: the same numbers as
    (G + G^T) / 2, a no-op on a symmetric Gram) and factored without a copy; the damping is added
    to its diagonal for that call and the saved diagonal put back exactly. So the Cholesky path
    holds two (n, n) matrices, G and R: streaming compression counts them (an n = 5632 Gram is
    254 MB).
    """
    from rankwise import linalg

    if not all_finite(gram):  # no full-size temporaries (see rankwise.linalg.all_finite)
        raise ValueError("the Gram contains NaN or Inf: the calibration activations overflowed")
    if gram.dtype == torch.float64 and gram.dim() == 2:
        g = linalg.symmetrize_(gram)
    else:
        g = gram.to(torch.float64)
        g = torch.add(g, g.T).mul_(0.5)
    diag = g.diagonal()
    saved = diag.clone() if g is gram else None
    try:
        if damping > 0:
            diag.add_(damping * diag.mean().clamp_min(1e-300))
        if kind == "cholesky":
            # lower, R R^T = G; jitter fallback when singular
            return linalg.cholesky_whitener(g, symmetrize=False), None
        return linalg.eigh_whitener(g, eps=eig_floor)  # symmetric root; eigenvalues clamped
    finally:
        if saved is not None:
            diag.copy_(saved)


def build_whitening(config: SVDConfig, stats: InputStats | None, weight: torch.Tensor) -> Whitening:
    """The whitening of one layer from its statistics (see the module table)."""
    kind = config.whitener
    if kind == "none":
        return Whitening()
    if stats is None:
        raise ValueError(
            f"whitener {kind!r} needs calibration statistics {config.needs}: run calibration "
            "(compress_(..., calibration=...)) or use whitener='none'"
        )
    m, n = weight.shape
    if kind == "act-scale":
        if stats.abs_sum is None:
            raise ValueError("whitener 'act-scale' needs the abs_mean statistic: collect it")
        s = stats.abs_mean.to(torch.float64).reshape(n)
        d = s.clamp_min(0) ** config.alpha + 1e-6  # ASVD: S = diag(s^alpha + 1e-6)
        return Whitening(right=d, right_inv=1.0 / d)
    if kind == "fisher":
        if stats.sq_grad is None:
            raise ValueError(
                "whitener 'fisher' needs squared gradients (sq_grad): calibrate with a loss, "
                "e.g. capture_input_stats(..., stats=('sq_grad',))"
            )
        f = stats.sq_grad.to(torch.float64).reshape(m, n)
        imp = f.sum(1) if config.fisher_axis == "out" else f.sum(0)  # FWSVD I_i = sum_j F_ij
        imp = imp + 1e-5 * imp.mean().clamp_min(1e-300)  # relative floor (scale-free)
        d = imp.sqrt() ** config.alpha
        if config.fisher_axis == "out":
            return Whitening(left=d)
        return Whitening(right=d, right_inv=1.0 / d)
    if stats.gram is None:
        raise ValueError(f"whitener {kind!r} needs the Gram statistic: collect stats=('gram',)")
    if stats.gram.shape != (n, n):
        raise ValueError(f"Gram of shape {tuple(stats.gram.shape)} does not match in_features {n}")
    R, R_inv = _gram_factor(stats.gram, kind, config.damping, config.eig_floor)
    return Whitening(right=R, right_inv=R_inv, right_lower=R_inv is None)


def whitened_svd(weight: torch.Tensor, whitening: Whitening):
    """Thin SVD (U (m, k), S (k,), Vh (k, n)) of `L W R`, k = min(m, n).

    The whitened weight is formed in fp64 (Gram factors are fp64) and factorised in fp32, or in
    fp64 when `weight` is fp64 (the numerics policy of rankwise.linalg).
    """
    from rankwise import linalg

    work = linalg.compute_dtype(weight.dtype)
    whitened = whitening.apply(weight.to(torch.float64)).to(work)
    return linalg.svd(whitened)


def whitened_factors(weight: torch.Tensor, rank: int, whitening: Whitening) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m, r), A (r, n) with `B A = L^-1 [L W R]_r R^-1` (optimal in the whitened norm)."""
    U, S, Vh = whitened_svd(weight, whitening)
    if not 1 <= rank <= S.shape[0]:
        raise ValueError(f"rank {rank} must be in [1, {S.shape[0]}] for a {tuple(weight.shape)} weight")
    return whitening.unwhiten(U[:, :rank], S[:rank], Vh[:rank])


class WhitenedSVD(ObservedStats):
    """Compressor (see rankwise.compress.base) for the five whiteners of this module.

    One thin SVD of the whitened weight per layer is cached (fp32; fp64 if the weight is), so
    spectra for allocation and factors at any rank cost one SVD in total.

    Example:
        >>> c = WhitenedSVD(SVDConfig(whitener="cholesky"))
        >>> c.observe("fc", fc, x)          # x (..., in), repeatable
        >>> new = c.compress("fc", fc, rank=32)   # FactorizedLinear
    """

    def __init__(self, config: SVDConfig | None = None, *, cache: bool = True) -> None:
        self.config = config or SVDConfig()
        self.name = self.config.whitener
        self.stats_: dict[str, InputStats] = {}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Whitening]] = {}
        self._shared: dict[int, tuple[torch.Tensor, Whitening]] = {}  # id(gram) -> whitening
        self._siblings: dict[str, Whitening] = {}  # fqn -> whitening of a released shared Gram
        self.cache = cache
        # Streaming compression sets this: a Gram is dropped as soon as its whitening exists
        # (the largest, n = 5632 for a 1B Llama's down_proj, is 254 MB in fp64).
        self.release_grams = False

    @property
    def needs(self) -> tuple[str, ...]:
        return self.config.needs

    def forget(self, fqn: str | None = None) -> None:
        """Drop cached SVDs (of one layer, or all) to free memory."""
        super().forget(fqn)
        if fqn is None:
            self._shared.clear()
            self._siblings.clear()

    def release(self, fqn: str) -> None:
        """Drop everything held for `fqn` (statistics, SVD, and its Gram's whitening once no
        other observed layer shares that Gram): streaming frees each layer as it is done."""
        super().release(fqn)
        self._siblings.pop(fqn, None)
        live = {id(s.gram) for s in self.stats_.values() if s.gram is not None}
        for key in [k for k in self._shared if k not in live]:
            del self._shared[key]

    def _svd(self, fqn: str, module: nn.Module):
        if fqn in self._cache:
            return self._cache[fqn]
        weight = _weight(module)
        if not all_finite(weight):
            raise ValueError(f"weight of {fqn!r} contains NaN or Inf: it cannot be factorised")
        stats = self.stats_.get(fqn)
        gram = stats.gram if stats is not None and self.config.whitener in ("cholesky", "eigh") else None
        hit = self._shared.get(id(gram)) if gram is not None else None
        if fqn in self._siblings:  # a sibling's whitening of the Gram they shared, now released
            wh = self._siblings.pop(fqn)
        elif hit is not None and hit[0] is gram:  # q/k/v (gate/up) share one Gram: factor it once
            wh = hit[1]
        else:
            wh = build_whitening(self.config, stats, weight.detach())
            if gram is not None and self.release_grams:
                for other, st in self.stats_.items():
                    if st.gram is gram:
                        st.gram = None
                        if other != fqn:
                            self._siblings[other] = wh
            elif gram is not None:
                self._shared[id(gram)] = (gram, wh)
        del gram
        entry = (*whitened_svd(weight.detach(), wh), wh)
        if self.cache:
            self._cache[fqn] = entry
        return entry

    def spectrum(self, fqn: str, module: nn.Module) -> torch.Tensor:
        """Singular values of the whitened weight `L W R` (descending, length min(m, n))."""
        return self._svd(fqn, module)[1]

    def factors(self, fqn: str, module: nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """B (m, r), A (r, n) with `B A = L^-1 [L W R]_r R^-1`, in the SVD's working dtype."""
        U, S, Vh, wh = self._svd(fqn, module)
        if not 1 <= rank <= S.shape[0]:
            raise ValueError(f"rank {rank} for {fqn!r} must be in [1, {S.shape[0]}]")
        return wh.unwhiten(U[:, :rank], S[:rank], Vh[:rank])

    def compress(self, fqn: str, module: nn.Module, rank: int) -> FactorizedLinear:
        weight = _weight(module)
        B, A = self.factors(fqn, module, rank)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        return FactorizedLinear.from_factors(B.to(weight.dtype), A.to(weight.dtype), bias)


def _weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError(f"expected a linear layer with a 2-D weight (out, in), got {type(module).__name__}")
    return w
