"""Low-rank matrix completion by alternating minimisation, exact and robust (sketched) updates.

Problem: a rank-k matrix M (m, n) is observed only on a set Omega of
entries, given as COO triplets (rows, cols, values); find U (m, k), V (n, k) with M ~= U V^T.
Nothing here forms a dense m x n matrix or mask: every step works on the |Omega| triplets.

AltMin (Jain, Netrapalli & Sanghavi 2013, "Low-rank matrix completion using alternating
minimization", STOC, Algorithm 2; "JNS13"):
    init  U = top-k left singular vectors of (mn / |Omega|) P_Omega(M)   (spectral init)
    loop  V = argmin_V ||P_Omega(U V^T - M)||^2,  then U = argmin_U ||P_Omega(U V^T - M)||^2,
          orthonormalising (QR) the factor held fixed before each half-step.
Each argmin decouples by row: v_j = (sum_{i in Omega_j} u_i u_i^T + lam I)^{-1} sum u_i M_ij, a
k x k system per column. As is usual in practice, all of Omega is reused at every step (no
sample splitting), the JNS13 entry clipping is not applied, and a small ridge lam keeps rows with
fewer than k observations solvable.

Two solvers for these per-row systems (`method`):
- "exact": form every k x k Gram, Cholesky-solve. O(|Omega| k^2 + p k^3) per half-step.
- "robust": Gu, Song, Yin, Zhang, "Low Rank Matrix Completion via Robust Alternating
  Minimization in Nearly Linear Time" (ICLR'24): solve each regression only approximately, by a
  few warm-started preconditioned conjugate-gradient steps whose preconditioner comes from a
  sketch (sketch-and-precondition). Per row a, the design A_a = F[Omega_a] (n_a, k) is compressed
  by a CountSketch S (s = sketch_factor * k buckets, O(n_a k) to apply; rows with at most s
  entries are kept whole) and the Cholesky factor of (S A_a)^T (S A_a) + lam I (= R^T R of a QR of
  [S A_a; sqrt(lam) I], "CholeskyQR") preconditions PCG, which needs only products with A_a
  (O(n_a k) each). Cost O(|Omega| k * cg_iters + p s k^2) per half-step: linear in |Omega| k
  instead of |Omega| k^2. The paper's analysis tolerates the per-step errors; its exact sketch
  type and iteration counts are not fixed by the paper's statement of the algorithm, so the defaults
  here (s = 2k, 3 PCG steps) are ours, checked by the tests (recovery to 1e-6) and by
  benchmarks/lowrank_kernels.py. `preconditioner="jacobi"` (diagonal of A^T A) is the O(|Omega| k)
  alternative: under incoherence A_a^T A_a ~= (n_a / n) I, so the diagonal is already good.

Ridge: `ridge` is relative, lam = ridge * |Omega| / (m n): with the fixed factor orthonormal,
E[A_a^T A_a] = |Omega| / (m n) * I, so ridge = 1 weighs the penalty like the data. The default
1e-10 only regularises empty or under-observed rows; noisy real data wants ~1e-2..1.

Stopping rule: relative change of the fitted values on Omega between sweeps < `tol`, or
`max_iters` sweeps. Progress: a tqdm bar (`progress=True`) and `callback(info)` after every sweep
(info: iteration, residual = ||P(UV^T) - y|| / ||y||, change, seconds, U, V; return True to stop).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from rankwise.linalg._altmin import _Side, _solve_exact, _solve_pcg
from rankwise.linalg._checks import validate_fraction, validate_int, validate_rank, validate_shape
from rankwise.linalg.rank import factorized_params
from rankwise.linalg.svd import make_generator, orthonormalize, svd

__all__ = ["complete", "observed_values", "sparse_top_singular_vectors"]

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | Sequence[int] | Sequence[float] | Any
_CHUNK = 1 << 22  # elements per chunk of entry-wise products (~32 MiB fp64)


def _as_index(x: ArrayLike, name: str, size: int, length: int | None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer indices, got dtype {t.dtype}: cast with .long()")
    t = t.reshape(-1).long()
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries but rows has {length}: pass one index per value")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise ValueError(
            f"{name} indices must lie in [0, {size}) for shape dimension {size}, got range "
            f"[{int(t.min())}, {int(t.max())}]: check the shape argument"
        )
    return t


def _check_entries(rows, cols, values, shape, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    m, n = validate_shape(shape)
    rows = _as_index(rows, "rows", m, None)
    cols = _as_index(cols, "cols", n, rows.numel())
    vals = torch.as_tensor(values)
    if not vals.dtype.is_floating_point:
        vals = vals.to(torch.float64)
    vals = vals.reshape(-1).to(dtype)
    if vals.numel() != rows.numel():
        raise ValueError(f"values has {vals.numel()} entries but rows has {rows.numel()}: one value per (row, col)")
    if rows.numel() == 0:
        raise ValueError("no observed entries: pass at least one (row, col, value) triplet")
    if not bool(torch.isfinite(vals).all()):
        raise ValueError("values contain NaN or Inf: drop unobserved entries instead of marking them NaN")
    return rows, cols, vals, m, n


def observed_values(U: torch.Tensor, V: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Entries (U V^T)[rows, cols] (|Omega|,) without forming U V^T: O(|Omega| k)."""
    rows, cols = torch.as_tensor(rows).long(), torch.as_tensor(cols).long()
    out = torch.empty(rows.numel(), dtype=U.dtype, device=U.device)
    step = max(1, _CHUNK // max(U.shape[1], 1))
    for s in range(0, rows.numel(), step):
        out[s : s + step] = (U[rows[s : s + step]] * V[cols[s : s + step]]).sum(1)
    return out


def _sparse(rows, cols, vals, m, n) -> torch.Tensor:
    """CSR (m, n) from COO triplets, duplicates summed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (m, n), check_invariants=False)
        return coo.coalesce().to_sparse_csr()


def sparse_top_singular_vectors(
    rows: ArrayLike,
    cols: ArrayLike,
    values: ArrayLike,
    shape: tuple[int, int],
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 4,
    seed: int | torch.Generator | None = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of the sparse matrix with the given COO entries (randomized subspace iteration).

    Halko-Martinsson-Tropp Alg. 4.4 with sparse products (O(|Omega| l) each, l = rank + oversample);
    QR and the small l x n SVD go through rankwise.linalg. Duplicate (row, col) pairs are summed.

    Returns:
        U (m, r), S (r,), Vh (r, n).
    """
    rows, cols, vals, m, n = _check_entries(rows, cols, values, shape, dtype)
    rank = validate_rank(rank, m, n)
    width = min(rank + validate_int(oversample, "oversample"), m, n)
    X = _sparse(rows, cols, vals, m, n)
    Xt = _sparse(cols, rows, vals, n, m)
    gen = make_generator(seed)
    Y = X @ torch.randn(n, width, generator=gen, dtype=dtype)
    Q = orthonormalize(Y)
    for _ in range(validate_int(power_iters, "power_iters")):
        Q = orthonormalize(X @ orthonormalize(Xt @ Q))
    B = (Xt @ Q).mT  # (l, n) = Q^T X
    Ub, S, Vh = svd(B)
    return (Q @ Ub)[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()


def complete(
    rows: ArrayLike,
    cols: ArrayLike,
    values: ArrayLike,
    shape: tuple[int, int],
    rank: int,
    *,
    method: Literal["exact", "robust"] = "exact",
    max_iters: int = 100,
    tol: float = 1e-10,
    ridge: float = 1e-10,
    init: Literal["spectral", "random"] | torch.Tensor = "spectral",
    cg_iters: int = 3,
    cg_tol: float = 1e-12,
    preconditioner: Literal["sketch", "jacobi"] = "sketch",
    sketch_factor: int = 2,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float64,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` completion of an (m, n) matrix from observed COO entries by AltMin.

    Args:
        rows, cols: (|Omega|,) integer indices of the observed entries (tensor, array or list).
        values: (|Omega|,) observed values M[rows, cols].
        shape: (m, n).
        rank: k, 1 <= k <= min(m, n).
        method: "exact" (k x k Cholesky solves, JNS13) or "robust" (sketch-preconditioned CG,
            Gu et al. 2024); see the module docstring.
        max_iters: maximum number of sweeps (a sweep updates V then U).
        tol: stop when ||f_t - f_{t-1}|| / ||f_t|| < tol for the fitted values f on Omega.
        ridge: relative ridge (lam = ridge * |Omega| / (m n)); see the module docstring.
        init: "spectral" (JNS13, sparse randomized SVD), "random" (orthonormal Gaussian), or an
            (m, k) starting U.
        cg_iters, cg_tol: PCG steps per half-step of the robust solver (warm-started), and the
            per-row relative residual at which they stop early.
        preconditioner: "sketch" (CountSketch + QR, the paper's) or "jacobi" (diagonal).
        sketch_factor: CountSketch buckets per row = sketch_factor * k.
        seed: seed of the spectral/random init and of the sketches.
        dtype: compute dtype (float64 default: the tests recover to 1e-8).
        callback: called after each sweep with an info dict (see module docstring); returning
            True stops the iteration.
        progress: show a tqdm bar with the residual.

    Returns:
        U (m, k), V (n, k) in `dtype` with M ~= U @ V.T; U has orthonormal columns.

    Raises:
        ValueError / TypeError: malformed entries (out-of-range indices, NaN values, length
            mismatch), bad shape/rank/options.

    Length: over 80 lines only because of its 15 documented options; the body is the sweep loop
    (~45 lines), with option checks, init and sweep statistics in their own helpers.
    """
    rows, cols, vals, m, n = _check_entries(rows, cols, values, shape, dtype)
    k = validate_rank(rank, m, n)
    max_iters, cg_iters, sketch_factor, tol, lam = _check_options(
        method, preconditioner, max_iters, cg_iters, sketch_factor, tol, ridge, rows.numel(), m, n, k)
    gen = make_generator(seed)
    U = _initial_u(init, rows, cols, vals, m, n, k, gen, dtype)
    by_col = _Side(cols, rows, vals, n, m)  # solve V: rows of V are columns of M
    by_row = _Side(rows, cols, vals, m, n)
    s = sketch_factor * k
    V = torch.zeros(n, k, dtype=dtype)  # fitted factor of the current model U V^T
    ynorm = float(vals.norm()) or 1.0
    prev = None
    start = time.perf_counter()

    def half_step(side: _Side, fixed: torch.Tensor, warm: torch.Tensor):  # noqa: ANN202
        Fs = side.designs(fixed)  # padded per-row designs, shared by the solve and the fit below
        if method == "exact":
            return _solve_exact(side, fixed, lam, Fs), Fs
        return _solve_pcg(side, fixed, lam, warm, iters=cg_iters, tol=cg_tol,
                          preconditioner=preconditioner, s=s, gen=gen, Fs=Fs), Fs

    from tqdm.auto import tqdm

    bar = tqdm(range(max_iters), desc=f"complete ({method})", disable=not progress, leave=False)
    info: dict[str, Any] = {}
    for it in bar:
        # V-step with U orthonormal; warm start = current model in this basis.
        V, _ = half_step(by_col, U, V)
        Qv, Rv = torch.linalg.qr(V)
        # U-step with the orthonormal basis Qv of V; the model U V^T = (U Rv^T) Qv^T.
        U_fit, Fs = half_step(by_row, Qv, U @ Rv.mT)
        U, Ru = torch.linalg.qr(U_fit)
        V = Qv @ Ru.mT  # model U_fit Qv^T = U (Qv Ru^T)^T
        # fitted values on Omega, padded per chunk (padding is 0 in both fit and y)
        fit = [(F @ U_fit[r].unsqueeze(-1)).squeeze(-1) for (r, _, _, _), F in zip(by_row.chunks, Fs, strict=True)]
        residual, change = _sweep_stats(fit, prev, by_row, ynorm)
        prev = fit
        info = {"iteration": it + 1, "residual": residual, "change": change,
                "seconds": time.perf_counter() - start, "U": U, "V": V}
        bar.set_postfix(residual=f"{residual:.2e}", change=f"{change:.1e}")
        logger.debug("complete sweep %d: residual %.3e change %.3e", it + 1, residual, change)
        if (callback is not None and callback(info)) or change < tol:
            break
    bar.close()
    logger.info("complete (%s, rank %d): %d sweeps, residual on Omega %.3e", method, k,
                info.get("iteration", 0), info.get("residual", float("nan")))
    return U, V


def _check_options(method: str, preconditioner: str, max_iters: int, cg_iters: int,
                   sketch_factor: int, tol: float, ridge: float, n_obs: int, m: int, n: int,
                   k: int) -> tuple[int, int, int, float, float]:
    """Validate `complete`'s options before any work; returns them normalised with the absolute
    ridge lam = ridge |Omega| / (m n). Warns when |Omega| < (m + n) k, the degrees of freedom of
    a rank-k (m, n) matrix, below which the completion is not identifiable."""
    if method not in ("exact", "robust"):
        raise ValueError(f"method must be 'exact' or 'robust', got {method!r}")
    if preconditioner not in ("sketch", "jacobi"):
        raise ValueError(f"preconditioner must be 'sketch' or 'jacobi', got {preconditioner!r}")
    max_iters = validate_int(max_iters, "max_iters", minimum=1)
    cg_iters = validate_int(cg_iters, "cg_iters", minimum=1)
    sketch_factor = validate_int(sketch_factor, "sketch_factor", minimum=1)
    tol = validate_fraction(tol, "tol", low=0.0, high=1.0, high_open=False)
    if not isinstance(ridge, int | float) or not ridge >= 0 or math.isinf(ridge):
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
    dof = factorized_params(m, n, k)
    if n_obs < dof:
        logger.warning(
            "complete: %d observed entries for %d degrees of freedom ((m + n) k): the completion "
            "is not identifiable; expect a large error (observe more entries or lower the rank)",
            n_obs, dof)
    return max_iters, cg_iters, sketch_factor, tol, float(ridge) * n_obs / (m * n)


def _initial_u(init: str | torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               vals: torch.Tensor, m: int, n: int, k: int, gen: torch.Generator | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The orthonormal starting U (m, k): spectral (JNS13), random Gaussian, or given."""
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (m, k):
            raise ValueError(f"init U must have shape ({m}, {k}), got {tuple(init.shape)}")
        return orthonormalize(init.to(dtype))
    if init == "spectral":
        return sparse_top_singular_vectors(rows, cols, vals, (m, n), k, seed=gen, dtype=dtype)[0]
    if init == "random":
        return orthonormalize(torch.randn(m, k, generator=gen, dtype=dtype))
    raise ValueError(f"init must be 'spectral', 'random' or an (m, k) tensor, got {init!r}")


def _sweep_stats(fit: list[torch.Tensor], prev: list[torch.Tensor] | None, side: _Side,
                 ynorm: float) -> tuple[float, float]:
    """(residual ||f - y|| / ||y||, change ||f - f_prev|| / ||f||) of the fitted values f on Omega."""
    residual = math.sqrt(sum(float((f - c[3]).square().sum())
                             for f, c in zip(fit, side.chunks, strict=True))) / ynorm
    if prev is None:
        return residual, math.inf
    fnorm = math.sqrt(sum(float(f.square().sum()) for f in fit))
    change = math.sqrt(sum(float((f - g).square().sum())
                           for f, g in zip(fit, prev, strict=True))) / max(fnorm, 1e-300)
    return residual, change
