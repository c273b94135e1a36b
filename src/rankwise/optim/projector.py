"""One projector abstraction for low-rank gradient optimizers (GaLore family).

A projector holds an r-dimensional subspace for one (m, n) gradient and maps between the full
space and the subspace (GaLore, Zhao et al. 2024, §3 and Algorithm 2, with its "std" side rule):

* right projection (m >= n): P (r, n), rows orthonormal; ``down(G) = G Pᵀ`` (m, r),
  ``up(X) = X P`` (m, n);
* left projection (m < n): P (m, r), columns orthonormal; ``down(G) = Pᵀ G`` (r, n),
  ``up(X) = P X`` (m, n).

Design choice (the reason for this file): a projector object owns *no* state of its own. Its
tensors live in a dict the caller passes in (the optimizer's per-parameter state), under keys
prefixed ``proj_``. The object is cheap and is rebuilt from the dict at every step, so the
optimizer state stays tensors-only: ``torch.load(weights_only=True)``, resume and FSDP's
state-dict helpers all work (galore-torch keeps a Python projector object in its state, which
breaks all three). Bases are recomputed in fp32 by `rankwise.linalg` (the one home for SVD,
QR and DCT) and cast to the gradient's dtype.

Implementations (registry names): ``svd`` (exact) and ``randomized`` (randomized SVD) in
projector_svd.py; ``dct`` (SVD-free column selection from a cached DCT basis: stores only r
int32 indices), ``random`` (Gaussian N(0, 1/r), APOLLO: stores only a seed),
``random_orthogonal``, ``randperm`` (r random columns/rows, FRUGAL), ``randk`` (K random
entries, FRUGAL's RandK) and ``identity``
(rank = min(m, n); the parity baseline) in projector_fixed.py. `QuantizedProjector`
(projector_q.py) wraps any dense one with int8/int4 storage and Q-GaLore's lazy refresh.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

SIDES = ("std", "reverse_std", "left", "right")
#: largest (m, n) whose back-projection `Projector.add_up_` forms as a temporary (64 MB fp32)
ADD_UP_TEMP_MAX = 1 << 24
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive refresh seeds apart


def resolve_side(shape: tuple[int, ...], side: str = "std") -> str:
    """Which side a (m, n) gradient is projected on: ``"left"`` or ``"right"``.

    ``std`` is GaLore's rule (right when m >= n, so the projector is the small min(m, n) x r
    matrix and the moments are max(m, n) x r); ``reverse_std`` is the opposite.
    """
    if side in ("left", "right"):
        return side
    if side not in SIDES:
        raise ValueError(f"projection side {side!r} is unknown: choose one of {SIDES}")
    std = _linalg().projection_side(tuple(shape))
    if side == "std":
        return std
    return "left" if std == "right" else "right"


def check_matrix(shape: tuple[int, ...], rank: int, what: str = "parameter") -> None:
    """Raise a ValueError naming the fix when `shape` cannot be projected at `rank`."""
    if len(shape) != 2:
        raise ValueError(
            f"{what} has shape {tuple(shape)}: low-rank gradient projection needs a 2-D matrix; "
            "put 1-D and >2-D parameters in a group with projector=None (plain AdamW), "
            "as rankwise.optim.param_groups does"
        )
    a = min(shape)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank {rank!r} for {what} {tuple(shape)} must be a positive int")
    if rank > a:
        raise ValueError(
            f"rank {rank} exceeds min(m, n) = {a} for {what} of shape {tuple(shape)}: "
            f"choose rank <= {a} (or give rank_fraction instead of rank)"
        )


def refresh_seed(seed: int, count: int) -> int:
    """Deterministic seed of the `count`-th refresh of a projector with base `seed` (63 bits)."""
    return (int(seed) + _MIX * (int(count) + 1)) % (2**63 - 1)


class Projector:
    """Base class: subspace bookkeeping over a caller-owned state dict.

    Args:
        shape: (m, n) of the gradient.
        rank: subspace dimension r, 1 <= r <= min(m, n).
        side: "std" | "reverse_std" | "left" | "right" (see `resolve_side`).
        state: dict receiving this projector's tensors (keys ``proj_*``); a new dict if None.
        seed: base seed for randomized/random projectors (the optimizer passes a per-parameter
            seed, identical on every rank, so data-parallel replicas agree).
        **options: implementation options (ignored by implementations that have none).
    """

    kind: ClassVar[str] = ""
    #: True when the basis is a dense float tensor that QuantizedProjector can compress.
    dense: ClassVar[bool] = True

    def __init__(
        self,
        shape: tuple[int, ...],
        rank: int,
        *,
        side: str = "std",
        state: dict[str, Any] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        check_matrix(tuple(shape), rank)
        self.shape = (int(shape[0]), int(shape[1]))
        self.rank = rank
        self.side = resolve_side(self.shape, side)
        self.state: dict[str, Any] = {} if state is None else state
        self.options = options
        if "proj_seed" not in self.state:
            self.state["proj_seed"] = torch.tensor(int(seed), dtype=torch.int64)
        self._cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ to implement
    def _compute(self, grad: torch.Tensor, step: int) -> None:
        """Compute a new subspace from `grad` (m, n) in fp32 and write it to `self.state`."""
        raise NotImplementedError

    def _dense_basis(self) -> torch.Tensor:
        """The current basis as a dense tensor: (r, n) for right, (m, r) for left."""
        return self.state["proj_basis"]

    # ------------------------------------------------------------------ shared
    @property
    def low_shape(self) -> tuple[int, int]:
        """Shape of a projected matrix: (m, r) for right projection, (r, n) for left."""
        m, n = self.shape
        return (m, self.rank) if self.side == "right" else (self.rank, n)

    @property
    def basis_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (self.rank, n) if self.side == "right" else (m, self.rank)

    @property
    def initialized(self) -> bool:
        return "proj_count" in self.state

    @property
    def refreshes(self) -> int:
        """How many times the subspace has been computed."""
        return int(self.state["proj_count"]) if self.initialized else 0

    def current_seed(self) -> int:
        """Seed of the latest refresh (randomized algorithms draw from it)."""
        return refresh_seed(int(self.state["proj_seed"]), max(self.refreshes - 1, 0))

    def update(self, grad: torch.Tensor, step: int) -> None:
        """Recompute the subspace from `grad` (m, n) at optimizer step `step` (0-based)."""
        if tuple(grad.shape) != self.shape:
            raise ValueError(f"gradient shape {tuple(grad.shape)} != projector shape {self.shape}")
        count = self.refreshes
        self.state["proj_count"] = torch.tensor(count + 1, dtype=torch.int64)
        self._cache = None
        self._compute(grad.detach().float(), step)

    def gap(self, default: int) -> int:
        """Current refresh gap: `default` unless lazy refresh has grown it (kept in state)."""
        return int(self.state["proj_gap"]) if "proj_gap" in self.state else int(default)

    def due(self, step: int, gap: int) -> bool:
        """True when a refresh is due at `step` (0-based): first call, or step % gap == 0."""
        return not self.initialized or step % self.gap(gap) == 0

    def maybe_update(self, grad: torch.Tensor, step: int, gap: int) -> bool:
        """Refresh the subspace if due; returns whether it did.

        With the ``lazy_threshold`` option (Q-GaLore, Zhang et al. 2024, §3.3), each refresh compares the
        new leading basis vector with the previous one (cosine, signed as in the official code
        unless ``lazy_abs=True``), pushes it in a FIFO of ``lazy_queue`` (5) values, and once
        the FIFO is full and its mean >= threshold multiplies this layer's gap by
        ``lazy_gamma`` (2). The FIFO is never cleared, so the gap can keep growing.
        """
        if not self.due(step, gap):
            return False
        threshold = self.options.get("lazy_threshold")
        prev = self.first_vector().float().clone() if threshold is not None and self.initialized else None
        self.update(grad, step)
        if threshold is not None:
            self._lazy_push(prev, gap, float(threshold))
        return True

    def _lazy_push(self, prev: torch.Tensor | None, gap: int, threshold: float) -> None:
        size = int(self.options.get("lazy_queue", 5))
        st = self.state
        if "proj_gap" not in st:
            st["proj_gap"] = torch.tensor(int(gap), dtype=torch.int64)
            st["proj_cos"] = torch.zeros(size, dtype=torch.float32)
            st["proj_cos_n"] = torch.tensor(0, dtype=torch.int64)
        if prev is None:
            return
        new = self.first_vector().float().to(prev.device)
        cos = torch.dot(prev, new) / (prev.norm() * new.norm() + 1e-12)
        if self.options.get("lazy_abs", False):
            cos = cos.abs()
        queue = st["proj_cos"]
        queue.copy_(torch.cat([queue[1:], cos.reshape(1).to(queue)]))
        st["proj_cos_n"] = torch.clamp(st["proj_cos_n"] + 1, max=size)
        if int(st["proj_cos_n"]) >= size and float(queue.mean()) >= threshold:
            grown = int(int(st["proj_gap"]) * float(self.options.get("lazy_gamma", 2)))
            st["proj_gap"] = torch.tensor(max(grown, 1), dtype=torch.int64)

    def basis(self) -> torch.Tensor:
        """Dense basis P: (r, n) rows orthonormal (right) or (m, r) columns orthonormal (left)."""
        if not self.initialized:
            raise RuntimeError("projector has no subspace yet: call update(grad, step) first")
        if self._cache is None:
            self._cache = self._dense_basis()
        return self._cache

    def _columns_form(self, dtype: torch.dtype) -> torch.Tensor:
        # rankwise.linalg.project_* take P with orthonormal columns on both sides; our right
        # basis is stored as rows (r, n), as GaLore's Vh[:r], so pass its transpose (a view).
        p = self.basis().to(dtype)
        return p.mT if self.side == "right" else p

    def down(self, grad: torch.Tensor) -> torch.Tensor:
        """Project (m, n) -> (m, r) [right] or (r, n) [left]."""
        return _linalg().project_down(grad, self._columns_form(grad.dtype), self.side)

    def up(self, low: torch.Tensor) -> torch.Tensor:
        """Back-project (m, r) [right] or (r, n) [left] -> (m, n) (no scale applied)."""
        return _linalg().project_up(low, self._columns_form(low.dtype), self.side)

    def add_up_(self, out: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``out += up(low)`` in place: one GEMM into a temporary, then one add, for matrices
        of at most `ADD_UP_TEMP_MAX` entries (on SmolLM2 this step was 0.84x galore-torch's
        vs 1.03x with GEMM accumulation into W, measured interleaved: BLAS's beta=1 path is
        the slower one); larger ones accumulate by addmm_, without an (m, n) temporary."""
        p = self._columns_form(low.dtype)
        if out.numel() <= ADD_UP_TEMP_MAX:
            return out.add_(low @ p.mT if self.side == "right" else p @ low)
        if self.side == "right":
            return out.addmm_(low, p.mT)
        return out.addmm_(p, low)

    def residual(self, grad: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``grad - up(low)`` as a new tensor, by one GEMM (addmm with alpha = -1)."""
        p = self._columns_form(low.dtype)
        if self.side == "right":
            return torch.addmm(grad, low, p.mT, alpha=-1.0)
        return torch.addmm(grad, p, low, alpha=-1.0)

    @property
    def orthonormal(self) -> bool:
        """True when the basis is exactly orthonormal (up to rounding), so that the residual
        G - up(down(G)) is orthogonal to the subspace (Fira's norm shortcut relies on it)."""
        return True

    def first_vector(self) -> torch.Tensor:
        """Leading basis vector (Q-GaLore compares it across refreshes)."""
        p = self.basis()
        return p[0] if self.side == "right" else p[:, 0]

    def state_bytes(self) -> int:
        """Bytes of this projector's tensors (everything under ``proj_*``)."""
        return sum(
            v.numel() * v.element_size()
            for k, v in self.state.items()
            if k.startswith("proj_") and isinstance(v, torch.Tensor)
        )

    def _store(self, basis: torch.Tensor, dtype: torch.dtype) -> None:
        self.state["proj_basis"] = basis.to(dtype).contiguous()


def _linalg() -> Any:
    from rankwise import linalg

    return linalg


PROJECTORS: dict[str, type[Projector]] = {}


def register_projector(cls: type[Projector]) -> type[Projector]:
    """Add a Projector subclass to the registry under ``cls.kind`` (usable as a decorator)."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no `kind` name: set kind = 'my_projector'")
    PROJECTORS[cls.kind] = cls
    return cls


def make_projector(kind: str, shape: tuple[int, ...], rank: int, **kwargs: Any) -> Projector:
    """Build a registered projector by name; ``bits=8|4`` wraps it in QuantizedProjector."""
    bits = kwargs.pop("bits", None)
    try:
        cls = PROJECTORS[kind]
    except KeyError:
        raise ValueError(
            f"projector {kind!r} is unknown: choose one of {sorted(PROJECTORS)} "
            "or register your own with rankwise.optim.register_projector"
        ) from None
    if bits is None:
        return cls(shape, rank, **kwargs)
    from rankwise.optim.projector_q import QuantizedProjector

    return QuantizedProjector(cls, shape, rank, bits=bits, **kwargs)


def _register_builtin() -> None:
    from rankwise.optim import projector_fixed, projector_svd

    for cls in (
        projector_svd.SVDProjector,
        projector_svd.RandomizedSVDProjector,
        projector_fixed.DCTProjector,
        projector_fixed.RandomProjector,
        projector_fixed.RandomOrthogonalProjector,
        projector_fixed.RandPermProjector,
        projector_fixed.RandKProjector,
        projector_fixed.IdentityProjector,
    ):
        register_projector(cls)


_register_builtin()

from rankwise.optim.projector_fixed import (  # noqa: E402  (re-exported: the public names)
    DCTProjector,
    IdentityProjector,
    RandKProjector,
    RandomOrthogonalProjector,
    RandomProjector,
    RandPermProjector,
    cached_dct_basis,
)
from rankwise.optim.projector_svd import RandomizedSVDProjector, SVDProjector  # noqa: E402

__all__ = [
    "PROJECTORS",
    "DCTProjector",
    "IdentityProjector",
    "Projector",
    "RandKProjector",
    "RandPermProjector",
    "RandomOrthogonalProjector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "cached_dct_basis",
    "check_matrix",
    "make_projector",
    "refresh_seed",
    "register_projector",
    "resolve_side",
]
