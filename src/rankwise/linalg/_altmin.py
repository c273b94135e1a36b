"""The per-row least-squares half-steps of alternating minimisation (see rankwise.linalg.complete).

With the other factor F fixed, AltMin's half-step min_X ||P_Omega(X F^T - M)||^2 + lam ||X||_F^2
decouples by row a: x_a = (A_a^T A_a + lam I)^{-1} A_a^T y_a with the design A_a = F[Omega_a]
(n_a, k) and y_a the observed values of row a (Jain, Netrapalli & Sanghavi 2013, "Low-rank matrix
completion using alternating minimization", Algorithm 2). `_solve_exact` forms every k x k Gram
and Cholesky-solves it; `_solve_pcg` runs a few warm-started preconditioned conjugate-gradient
steps whose preconditioner is the Cholesky factor of a CountSketch of A_a (Gu, Song, Yin & Zhang
2024, "Low rank matrix completion via robust alternating minimization in nearly linear time",
ICLR) or the Jacobi diagonal.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger("rankwise.linalg.complete")  # one logger for the whole solver

_CHUNK_ENTRIES = 1 << 16  # padded entries per row chunk of the batched solvers


class _Side:
    """The observed entries grouped by the row a they constrain (b: the fixed factor's row).

    Rows are ordered by observation count and cut into chunks padded to the chunk's largest
    count (power-law counts waste little), so every per-row product is a batched matmul:
    the design of chunk c is F_c = fixed[b_pad] * valid, shape (rows, L, k).
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, p: int, q: int) -> None:
        order = torch.argsort(a, stable=True)
        self.a, self.b, self.y, self.p, self.q = a[order], b[order], y[order], p, q
        self.counts = torch.bincount(self.a, minlength=p)
        starts = torch.cumsum(self.counts, 0) - self.counts
        by_count = torch.argsort(self.counts, stable=True)
        counts = self.counts[by_count].tolist()
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        i = next((t for t, c in enumerate(counts) if c > 0), p)  # empty rows: no chunk
        while i < p:
            j = i + 1
            while j < p and (j + 1 - i) * counts[j] <= _CHUNK_ENTRIES:
                j += 1
            rows, top = by_count[i:j], counts[j - 1]
            idx = starts[rows, None] + torch.arange(top)
            valid = torch.arange(top) < self.counts[rows, None]
            idx = torch.where(valid, idx, torch.zeros_like(idx))
            self.chunks.append((rows, self.b[idx], valid.to(y.dtype).unsqueeze(-1), self.y[idx] * valid))
            i = j

    def designs(self, fixed: torch.Tensor) -> list[torch.Tensor]:
        """Padded per-row designs F_c (rows, L, k) of every chunk for this fixed factor."""
        return [fixed[b_pad] * valid for _, b_pad, valid, _ in self.chunks]

    def rhs(self, Fs: list[torch.Tensor]) -> torch.Tensor:
        """A^T y per row: (p, k)."""
        out = torch.zeros(self.p, Fs[0].shape[-1] if Fs else 1, dtype=self.y.dtype)
        for (rows, _, _, y_pad), F in zip(self.chunks, Fs, strict=True):
            out[rows] = (F.mT @ y_pad.unsqueeze(-1)).squeeze(-1)
        return out

    def matvec(self, Fs: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
        """A^T A x per row (p, k) for x = X (p, k): two batched products, O(|Omega| k)."""
        out = torch.zeros_like(X)
        for (rows, _, _, _), F in zip(self.chunks, Fs, strict=True):
            out[rows] = (F.mT @ (F @ X[rows].unsqueeze(-1))).squeeze(-1)
        return out

    def grams(self, Fs: list[torch.Tensor], k: int) -> torch.Tensor:
        """A^T A per row (p, k, k): O(|Omega| k^2) by batched matmuls."""
        G = torch.zeros(self.p, k, k, dtype=self.y.dtype)
        for (rows, _, _, _), F in zip(self.chunks, Fs, strict=True):
            G[rows] = F.mT @ F
        return G


def _solve_exact(side: _Side, fixed: torch.Tensor, lam: float, Fs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Every row's (A^T A + lam I) x = A^T y by Cholesky (lstsq for singular rows): (p, k)."""
    k = fixed.shape[1]
    Fs = side.designs(fixed) if Fs is None else Fs
    G = side.grams(Fs, k)
    G.diagonal(dim1=-2, dim2=-1).add_(lam)
    L, info = torch.linalg.cholesky_ex(G)
    rhs = side.rhs(Fs).unsqueeze(-1) if Fs else torch.zeros(side.p, k, 1, dtype=fixed.dtype)
    if bool(info.any()):  # rank-deficient rows with a negligible ridge: least-norm solve instead
        bad = info != 0
        logger.debug("complete: %d singular row systems, solved by lstsq", int(bad.sum()))
        out = torch.empty(side.p, k, 1, dtype=fixed.dtype)
        good = ~bad
        out[good] = torch.cholesky_solve(rhs[good], L[good])
        out[bad] = torch.linalg.lstsq(G[bad], rhs[bad], driver="gelsd").solution
        return out.squeeze(-1)
    return torch.cholesky_solve(rhs, L).squeeze(-1)


def _sketch_cholesky(side: _Side, Fs: list[torch.Tensor], k: int, lam: float, s: int, gen) -> torch.Tensor:
    """Lower L (p, k, k) with L L^T = (S A_a)^T (S A_a) + lam I ~= A_a^T A_a + lam I.

    S is a CountSketch with s buckets for rows with more than s observations (O(n_a k) to apply)
    and the identity for the others (their design is already small). The factor is taken by
    Cholesky of the sketched Gram (CholeskyQR: the R of qr(S A_a) up to signs) in O(s k^2).
    """
    dt = Fs[0].dtype if Fs else torch.float64
    eye = torch.eye(k, dtype=dt)
    floor = max(lam, torch.finfo(dt).eps)  # rows without observations and without ridge
    L = (math.sqrt(floor) * eye).repeat(side.p, 1, 1)
    for (rows, _, _, _), F in zip(side.chunks, Fs, strict=True):
        r, top = F.shape[:2]
        if top <= s:
            SA = F
        else:
            bucket = torch.randint(0, s, (r, top), generator=gen)
            sign = torch.randint(0, 2, (r, top, 1), generator=gen).to(dt) * 2 - 1
            short = (side.counts[rows] <= s)[:, None]
            bucket = torch.where(short, torch.arange(top).clamp_max(s - 1).expand(r, top), bucket)
            sign = torch.where(short[..., None], torch.ones_like(sign), sign)
            target = (torch.arange(r)[:, None] * s + bucket).reshape(-1)  # flat sketch row of each entry
            SA = torch.zeros(r * s, k, dtype=dt).index_add_(0, target, (F * sign).reshape(-1, k)).view(r, s, k)
        G = SA.mT @ SA + lam * eye
        Lc, info = torch.linalg.cholesky_ex(G)
        if bool(info.any()):  # singular sketch (fewer than k observations, no ridge): jitter it
            scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(floor)
            Lc, _ = torch.linalg.cholesky_ex(G + (1e-10 * scale)[:, None, None] * eye)
        L[rows] = Lc
    return L


def _solve_pcg(side: _Side, fixed: torch.Tensor, lam: float, X0: torch.Tensor, *, iters: int,
               tol: float, preconditioner: str, s: int, gen, Fs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Warm-started preconditioned CG on (A^T A + lam I) x = A^T y, all rows at once: (p, k)."""
    k = fixed.shape[1]
    Fs = side.designs(fixed) if Fs is None else Fs
    if not Fs:
        return torch.zeros_like(X0)
    if preconditioner == "sketch":
        L = _sketch_cholesky(side, Fs, k, lam, s, gen)

        def M_inv(r: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    else:
        diag = torch.full((side.p, k), lam, dtype=fixed.dtype)
        for (rows, _, _, _), F in zip(side.chunks, Fs, strict=True):
            diag[rows] += F.square().sum(1)
        diag = diag.clamp_min(torch.finfo(fixed.dtype).tiny)

        def M_inv(r: torch.Tensor) -> torch.Tensor:
            return r / diag

    def H(x: torch.Tensor) -> torch.Tensor:
        return side.matvec(Fs, x) + lam * x

    b = side.rhs(Fs)
    X = X0.clone()
    r = b - H(X)
    z = M_inv(r)
    d = z.clone()
    rz = (r * z).sum(1)
    tiny = torch.finfo(fixed.dtype).tiny
    bnorm = b.norm(dim=1).clamp_min(tiny)
    for _ in range(iters):
        if float((r.norm(dim=1) / bnorm).max()) <= tol:
            break
        Hd = H(d)
        dHd = (d * Hd).sum(1)
        alpha = torch.where(dHd > tiny, rz / dHd.clamp_min(tiny), torch.zeros_like(rz))
        X += alpha[:, None] * d
        r -= alpha[:, None] * Hd
        z = M_inv(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        d = z + beta[:, None] * d
        rz = rz_new
    return X
