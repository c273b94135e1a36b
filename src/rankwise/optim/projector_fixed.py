"""SVD-free projectors: DCT column selection, random (Gaussian / orthonormal), random
coordinates, identity. None of them computes a decomposition of the gradient."""

from __future__ import annotations

import functools
from typing import Any

import torch

from rankwise.optim.projector import Projector


def _linalg() -> Any:
    from rankwise import linalg

    return linalg


def cached_dct_basis(d: int, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II basis (d, d), columns = basis vectors, shared by all layers.

    A deterministic function of d, cached by `rankwise.linalg.dct_basis` and never stored in
    optimizer state (DCT-AdamW, Modoranu et al. 2025, §3: one basis serves every layer of
    that size).
    """
    return _linalg().dct_basis(int(d), dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _dct_rows(d: int, device: torch.device) -> torch.Tensor:
    """Qᵀ (d, d) contiguous: row j is DCT basis vector j (cached per size, never in state)."""
    return cached_dct_basis(d, device).T.contiguous()


class DCTProjector(Projector):
    """SVD-free projector: the r DCT basis vectors best aligned with the gradient (DCT-AdamW,
    Modoranu et al. 2025, §3: score = ℓ1 norm of each column of G Q).

    Basis Q (d, d) with d = the projected side's size, columns = DCT-II vectors. Right side:
    score columns of ``G Q`` (m, d); left side: rows of ``Qᵀ G`` (d, n); keep the r best by
    ℓ1 norm (``norm`` option, 1 or 2). State: r int32 indices only.
    """

    kind = "dct"
    dense = False

    @property
    def _d(self) -> int:
        return self.shape[1] if self.side == "right" else self.shape[0]

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        q = cached_dct_basis(self._d, grad.device)
        mat = grad.mT if self.side == "right" else grad  # (d, ·): scores ||G Q[:, j]|| or ||Q[:, j]ᵀ G||
        norm = float(self.options.get("norm", 1.0))
        idx = _linalg().select_aligned_columns(q, mat, self.rank, norm=norm)
        self.state["proj_idx"] = idx.to(device=grad.device, dtype=torch.int32)

    def _dense_basis(self) -> torch.Tensor:
        idx = self.state["proj_idx"]
        # gather whole rows of the cached Qᵀ (contiguous copies), not strided columns of Q:
        # the selected basis is rebuilt at every step, so the gather is on the step's path
        rows = _dct_rows(self._d, idx.device).index_select(0, idx.long())  # (r, d)
        return rows if self.side == "right" else rows.T


class RandomProjector(Projector):
    """Random projector regenerated from a seed (APOLLO: Gaussian entries N(0, 1/r)).

    Options: ``orthogonal`` (False; True draws a random orthonormal basis via
    `rankwise.linalg.random_orthonormal`), ``store_basis`` (False: only the seed is kept and the
    basis is regenerated when needed, as APOLLO-Mini's memory claim assumes; True: keep it).
    """

    kind = "random"

    @property
    def dense(self) -> bool:  # type: ignore[override]
        return bool(self.options.get("store_basis", False))

    @property
    def orthonormal(self) -> bool:  # type: ignore[override]
        return bool(self.options.get("orthogonal", False))

    def _draw(self, device: torch.device) -> torch.Tensor:
        seed = self.current_seed()
        a = min(self.shape)
        if self.options.get("orthogonal", False):
            q = _linalg().random_orthonormal(a, self.rank, seed=seed, device=device)  # (a, r)
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            q = torch.randn(a, self.rank, generator=gen) / self.rank**0.5
            q = q.to(device)
        return q.T.contiguous() if self.side == "right" else q

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        if self.options.get("store_basis", False):
            self._store(self._draw(grad.device), self.options.get("dtype") or grad.dtype)
        else:
            self.state["proj_device"] = torch.empty(0, device=grad.device)  # remembers device

    def _dense_basis(self) -> torch.Tensor:
        if "proj_basis" in self.state:
            return self.state["proj_basis"]
        device = self.state.get("proj_device", torch.empty(0)).device
        return self._draw(device)


class RandomOrthogonalProjector(RandomProjector):
    """Random orthonormal basis (stored by default, as regenerating needs a QR)."""

    kind = "random_orthogonal"

    def __init__(self, *args: Any, **options: Any) -> None:
        options.setdefault("orthogonal", True)
        options.setdefault("store_basis", True)
        super().__init__(*args, **options)


class IdentityProjector(Projector):
    """P = I (rank must equal min(m, n)): projected optimizers reduce to their full-rank rule."""

    kind = "identity"

    def __init__(self, shape: tuple[int, ...], rank: int, **kwargs: Any) -> None:
        super().__init__(shape, rank, **kwargs)
        if rank != min(self.shape):
            raise ValueError(
                f"identity projector needs rank == min(m, n) = {min(self.shape)}, got {rank}"
            )

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        self._store(torch.eye(self.rank, device=grad.device), grad.dtype)


class RandPermProjector(Projector):
    """r coordinates (columns for right projection, rows for left) drawn uniformly without
    replacement at every refresh: FRUGAL's ``randperm`` projection and its column/row
    coordinate variant (Zmushko et al. 2024, §4, "RandK"). The basis is r rows (right) or
    columns (left) of the identity; the state keeps only the r int32 indices, and `down`
    is a gather, `up` a scatter (no GEMM)."""

    kind = "randperm"
    dense = False

    @property
    def _d(self) -> int:
        return self.shape[1] if self.side == "right" else self.shape[0]

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(self.current_seed())
        idx = torch.randperm(self._d, generator=gen)[: self.rank].sort().values
        self.state["proj_idx"] = idx.to(device=grad.device, dtype=torch.int32)

    def _dense_basis(self) -> torch.Tensor:
        idx = self.state["proj_idx"].long()
        rows = torch.zeros(self.rank, self._d, device=idx.device)
        rows[torch.arange(self.rank, device=idx.device), idx] = 1.0
        return rows if self.side == "right" else rows.T

    def down(self, grad: torch.Tensor) -> torch.Tensor:
        idx = self.state["proj_idx"].long()
        return grad.index_select(1 if self.side == "right" else 0, idx)

    def up(self, low: torch.Tensor) -> torch.Tensor:
        out = low.new_zeros(self.shape)
        return self.add_up_(out, low)

    def add_up_(self, out: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        idx = self.state["proj_idx"].long()
        return out.index_add_(1 if self.side == "right" else 0, idx, low.to(out.dtype))

    def residual(self, grad: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        idx = self.state["proj_idx"].long()
        dim = 1 if self.side == "right" else 0
        return grad.clone().index_add_(dim, idx, low.to(grad.dtype), alpha=-1.0)


class RandKProjector(Projector):
    """K individual entries of the (m, n) gradient drawn uniformly without replacement at every
    refresh: FRUGAL's per-entry coordinate variant (Zmushko et al. 2024, §4, "RandK"). The
    selected entries form the state-full subspace (Adam on K values), the rest get the
    state-free rule (`residual`, signSGD in the ``frugal`` preset).

    K = ``rank * max(m, n)`` by default, the number of entries a rank-r projection of this
    matrix keeps (so ``rank_fraction`` is FRUGAL's density: K ~ density * m * n), or the
    ``k`` option. The state keeps the K sorted flat indices (int32 when m n < 2^31); moments
    have the "low" shape (1, K). `down` is a gather, `up` a scatter-add, no GEMM. Entries have
    no matrix basis, so moment_policy "reproject", Adafactor and APOLLO scaling are refused
    (groups.validate)."""

    kind = "randk"
    dense = False

    @property
    def k(self) -> int:
        m, n = self.shape
        k = self.options.get("k")
        k = int(k) if k is not None else self.rank * max(m, n)
        if not 1 <= k <= m * n:
            raise ValueError(f"randk: k={k} must be in [1, m n = {m * n}]")
        return k

    @property
    def low_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return (1, self.k)

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        numel = self.shape[0] * self.shape[1]
        gen = torch.Generator(device="cpu").manual_seed(self.current_seed())
        idx = torch.randperm(numel, generator=gen)[: self.k].sort().values
        dtype = torch.int32 if numel < 2**31 else torch.int64
        self.state["proj_idx"] = idx.to(device=grad.device, dtype=dtype)

    def _dense_basis(self) -> torch.Tensor:
        raise ValueError("the randk projector selects entries, not a subspace basis: use "
                         "moment_policy 'reset' or 'keep' (FRUGAL resets)")

    def first_vector(self) -> torch.Tensor:
        raise ValueError("the randk projector has no basis vector: lazy refresh "
                         "(lazy_threshold) needs a matrix projector")

    def _flat_idx(self) -> torch.Tensor:
        return self.state["proj_idx"].long()

    def down(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(-1).index_select(0, self._flat_idx()).view(self.low_shape)

    def up(self, low: torch.Tensor) -> torch.Tensor:
        return self.add_up_(low.new_zeros(self.shape), low)

    def add_up_(self, out: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        if not out.is_contiguous():
            return out.add_(self.up(low.to(out.dtype)))
        out.view(-1).index_add_(0, self._flat_idx(), low.reshape(-1).to(out.dtype))
        return out

    def residual(self, grad: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        res = grad.contiguous().clone()
        res.view(-1).index_add_(0, self._flat_idx(), low.reshape(-1).to(res.dtype), alpha=-1.0)
        return res
