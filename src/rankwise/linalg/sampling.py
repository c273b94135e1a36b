"""Row sampling by leverage scores and l_p Lewis weights; sampled regression; token selection.

Woodruff & Yasuda 2023, "Sharper Bounds for l_p Sensitivity Sampling" (ICML); Lewis weights as
in Cohen & Peng 2015, "l_p Row Sampling by Lewis Weights" (STOC).
For A (n, d) with rows a_i:
- l2 leverage  tau_i = a_i^T (A^T A)^+ a_i = ||Q_i||^2 (Q from a thin QR/SVD); sum tau = rank(A).
  Ridge leverage tau_i(lam) = a_i^T (A^T A + lam I)^{-1} a_i (sum < d) handles d > n or a
  rank-deficient A without a cut-off.
- l_p Lewis weights: the fixed point w_i = (a_i^T (A^T W^{1-2/p} A)^{-1} a_i)^{p/2}, sum w = d;
  computed by the Cohen-Peng iteration w <- (tau_i(W^{1/2-1/p} A) w_i^{2/p-1})^{p/2}, a
  contraction for p < 4. For p <= 2 they upper-bound the l_p sensitivities
  s_i = sup_x |a_i^T x|^p / ||A x||_p^p; for p = 2 they equal the leverage scores.
- Sampling: inclusion probabilities q_i = min(1, c s_i) with c set so that sum q = m (the usual
  min(1, m s_i / sum s) raised by water-filling, so the expected sample size is exactly m); keep
  row i with probability q_i (Bernoulli) or draw exactly m rows with these inclusion
  probabilities (systematic sampling, Madow 1949), and rescale kept rows by q_i^{-1/p}, so that
  E ||S A x||_p^p = ||A x||_p^p. With m = O(d log d / eps^2) leverage samples, ||S A x||_2 =
  (1 +- eps) ||A x||_2 for all x w.h.p., and sampled least squares is (1 + eps)-optimal.
- Fast leverage (Drineas, Magdon-Ismail, Mahoney, Woodruff 2012): R from QR of a CountSketch
  Pi A (s x d), then tau_i ~= ||(A R^{-1} G)_i||^2 with a d x t Gaussian G: O(nnz(A) + n d t + s d^2).

Token selection for calibration (`select_calibration_tokens`): a whitened compressor (SVD-LLM, Wang
et al. 2024; EoRA, Liu et al. 2024) sees its calibration activations X (N, d) only through the Gram
X^T X, and a leverage sample gives a spectral approximation of that Gram, (1 +- eps) X^T X, with
O(d log d / eps^2) tokens, where uniform sampling needs N max_i tau_i times more (the coherence):
activations with a few massive-outlier tokens are exactly the coherent case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from rankwise.linalg._checks import compute_dtype, validate_int, validate_matrix
from rankwise.linalg.svd import Seed, make_generator, svd

__all__ = [
    "inclusion_probabilities",
    "leverage_scores",
    "lewis_weights",
    "lp_regression",
    "sample_rows",
    "sampled_regression",
    "select_calibration_tokens",
    "weighted_gram",
]


def _rcond(A: torch.Tensor, rcond: float | None) -> float:
    return rcond if rcond is not None else max(A.shape) * torch.finfo(A.dtype).eps


def leverage_scores(
    A: torch.Tensor,
    *,
    method: Literal["qr", "svd", "sketch"] = "qr",
    ridge: float = 0.0,
    rcond: float | None = None,
    sketch_rows: int | None = None,
    jl_dim: int | None = None,
    seed: Seed = 0,
) -> torch.Tensor:
    """l2 leverage scores tau (n,) of the rows of A (n, d), in the compute dtype.

    Args:
        A: (n, d) real matrix.
        method: "qr" (thin QR; falls back to "svd" when A is numerically rank-deficient), "svd"
            (singular values below rcond * S_max dropped, so sum tau = numerical rank), or
            "sketch" (fast approximation, module docstring).
        ridge: relative ridge: lam = ridge * ||A||_F^2 / d; tau_i(lam) = a_i^T (A^T A + lam I)^{-1}
            a_i, computed as the leverage of the first n rows of [A; sqrt(lam) I].
        rcond: relative cut-off of the "svd" path (default max(n, d) * eps).
        sketch_rows, jl_dim: "sketch" only: CountSketch rows (default 2 d^2: a CountSketch
            embeds a d-dimensional subspace with O(d^2) rows; with 4 d rows the row scores were
            off by up to 130 % on Student-t data) and Gaussian JL columns t (default None: exact
            row norms of A R^{-1}).
        seed: the sketch's randomness.
    """
    validate_matrix(A, "A", batched=False)
    X = A.to(compute_dtype(A.dtype))
    n, d = X.shape
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge}")
    if ridge > 0:
        lam = ridge * float(X.square().sum()) / d
        aug = torch.cat([X, math.sqrt(lam) * torch.eye(d, dtype=X.dtype)])
        return leverage_scores(aug, method=method, rcond=rcond, sketch_rows=sketch_rows,
                               jl_dim=jl_dim, seed=seed)[:n]
    if method == "svd" or (method == "qr" and n < d):
        U, S, _ = svd(X)
        keep = S > _rcond(X, rcond) * S[0].clamp_min(torch.finfo(X.dtype).tiny)
        return U[:, keep].square().sum(1)
    if method == "qr":
        Q, R = torch.linalg.qr(X)
        diag = R.diagonal().abs()
        if bool((diag <= _rcond(X, rcond) * diag.max().clamp_min(torch.finfo(X.dtype).tiny)).any()):
            return leverage_scores(X, method="svd", rcond=rcond)
        return Q.square().sum(1)
    if method != "sketch":
        raise ValueError(f"method must be 'qr', 'svd' or 'sketch', got {method!r}")
    gen = make_generator(seed)
    s = validate_int(sketch_rows, "sketch_rows", minimum=d) if sketch_rows is not None else max(4 * d, 2 * d * d)
    bucket = torch.randint(0, s, (n,), generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen).to(X.dtype) * 2 - 1
    PiA = torch.zeros(s, d, dtype=X.dtype).index_add_(0, bucket, X * sign[:, None])  # CountSketch
    R = torch.linalg.qr(PiA, mode="r").R
    if jl_dim is None:
        B = torch.linalg.solve_triangular(R, X, upper=True, left=False)  # A R^{-1}
    else:
        G = torch.randn(d, validate_int(jl_dim, "jl_dim", minimum=1), generator=gen, dtype=X.dtype)
        B = X @ torch.linalg.solve_triangular(R, G / math.sqrt(G.shape[1]), upper=True)
    return B.square().sum(1)


def lewis_weights(A: torch.Tensor, p: float, *, max_iters: int = 200, tol: float = 1e-10) -> torch.Tensor:
    """l_p Lewis weights w (n,) of A (n, d), 0 < p < 4, by the Cohen-Peng fixed-point iteration.

    sum w = rank(A) at the fixed point; p = 2 gives the leverage scores. For p >= 4 the plain
    iteration need not converge: use p < 4.
    """
    validate_matrix(A, "A", batched=False)
    if not 0 < p < 4:
        raise ValueError(f"p must lie in (0, 4) for the Lewis-weight iteration, got {p}")
    X = A.to(compute_dtype(A.dtype))
    n, d = X.shape
    w = torch.full((n,), d / n, dtype=X.dtype)
    floor = torch.finfo(X.dtype).tiny
    for _ in range(validate_int(max_iters, "max_iters", minimum=1)):
        scale = w.clamp_min(floor).pow(0.5 - 1.0 / p)
        tau = leverage_scores(X * scale[:, None])
        new = (tau * w.clamp_min(floor).pow(2.0 / p - 1.0)).clamp_min(0).pow(p / 2.0)
        done = float((new - w).abs().max()) <= tol * float(new.max())
        w = new
        if done:
            break
    return w


def inclusion_probabilities(scores: torch.Tensor, n_samples: int) -> torch.Tensor:
    """q (n,) = min(1, c * scores) with c chosen so that sum q = min(n_samples, #positive scores).

    Water-filling: rows whose scaled score passes 1 are kept surely and the rest share the
    remaining budget in proportion to their scores.
    """
    s = torch.as_tensor(scores).to(torch.float64).reshape(-1)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("scores must be finite and >= 0 (leverage scores, Lewis weights, sensitivities)")
    m = validate_int(n_samples, "n_samples", minimum=1)
    positive = int((s > 0).sum())
    if positive == 0:
        raise ValueError("all scores are zero: nothing to sample (is A all zeros?)")
    m = min(m, positive)
    q = torch.zeros_like(s)
    sure = torch.zeros_like(s, dtype=torch.bool)
    for _ in range(s.numel() + 1):
        budget = m - int(sure.sum())
        rest = s.masked_fill(sure, 0)
        q = torch.where(sure, torch.ones_like(s), rest * (budget / float(rest.sum())))
        over = (q > 1) & ~sure
        if not bool(over.any()):
            break
        sure |= over
    return q.clamp(0, 1)


def sample_rows(
    scores: torch.Tensor,
    n_samples: int,
    *,
    p: float = 2.0,
    mode: Literal["bernoulli", "systematic"] = "bernoulli",
    seed: Seed = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample rows with inclusion probabilities from `scores`; returns (indices, weights q^{-1/p}).

    mode "bernoulli" keeps each row independently (sample size random, mean n_samples);
    "systematic" keeps exactly n_samples rows with the same inclusion probabilities (rows in a
    random order, one uniform offset; Madow's systematic sampling). Multiply the kept rows of A
    (and b) by the weights: E ||S A x||_p^p = ||A x||_p^p.
    """
    q = inclusion_probabilities(scores, n_samples)
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    gen = make_generator(seed)
    if mode == "bernoulli":
        idx = torch.nonzero(torch.rand(q.shape, generator=gen, dtype=q.dtype) < q).reshape(-1)
    elif mode == "systematic":
        order = torch.randperm(q.numel(), generator=gen)
        edges = torch.cumsum(q[order], 0)
        total = int(round(float(edges[-1])))
        u = float(torch.rand((), generator=gen, dtype=q.dtype))
        points = (torch.arange(total, dtype=q.dtype) + u).clamp_max(float(edges[-1]) * (1 - 1e-15))
        idx = order[torch.searchsorted(edges, points, right=True)].sort().values
    else:
        raise ValueError(f"mode must be 'bernoulli' or 'systematic', got {mode!r}")
    return idx, q[idx].pow(-1.0 / p)


def weighted_gram(X: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i^2 x_i x_i^T (d, d) in fp64 over the sampled rows of X (N, d): the sample's estimate
    of X^T X (weights from `sample_rows` with p = 2)."""
    validate_matrix(X, "X", batched=False)
    Xs = X[indices].to(torch.float64) * weights.to(torch.float64)[:, None]
    return Xs.mT @ Xs


def lp_regression(
    A: torch.Tensor,
    b: torch.Tensor,
    p: float = 2.0,
    *,
    weights: torch.Tensor | None = None,
    max_iters: int = 100,
    tol: float = 1e-10,
) -> torch.Tensor:
    """argmin_x sum_i w_i^p |a_i^T x - b_i|^p for A (n, d), b (n,); p = 2 by least squares,
    1 <= p < 2 or p > 2 by iteratively reweighted least squares (IRLS, residuals floored at
    1e-12 * ||b||_inf for p < 2). Returns x (d,)."""
    validate_matrix(A, "A", batched=False)
    if p < 1:
        raise ValueError(f"p must be >= 1 (a convex regression), got {p}")
    X = A.to(compute_dtype(A.dtype))
    y = torch.as_tensor(b).to(X.dtype).reshape(-1)
    if y.numel() != X.shape[0]:
        raise ValueError(f"b has {y.numel()} entries but A has {X.shape[0]} rows")
    w = torch.ones_like(y) if weights is None else weights.to(X.dtype).reshape(-1)

    def wls(c: torch.Tensor) -> torch.Tensor:
        r = c.sqrt()
        return torch.linalg.lstsq(X * r[:, None], y * r, driver="gelsd").solution

    x = wls(w.pow(2.0 if p == 2 else p))
    if p == 2:
        return x
    floor = 1e-12 * float(y.abs().max().clamp_min(1e-300))
    for _ in range(validate_int(max_iters, "max_iters", minimum=1)):
        res = (X @ x - y).abs().clamp_min(floor)
        new = wls(w.pow(p) * res.pow(p - 2))
        if float((new - x).norm()) <= tol * max(float(x.norm()), 1e-300):
            return new
        x = new
    return x


def sampled_regression(
    A: torch.Tensor,
    b: torch.Tensor,
    n_samples: int,
    *,
    p: float = 2.0,
    scores: Literal["lewis", "leverage", "uniform"] | torch.Tensor = "lewis",
    mode: Literal["bernoulli", "systematic"] = "bernoulli",
    seed: Seed = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate l_p regression from a row sample of [A b]; returns (x (d,), sampled indices).

    scores "lewis" uses the l_p Lewis weights of [A b] (leverage scores when p = 2), "leverage"
    the l2 leverage of [A b], "uniform" equal scores (the baseline), or a given (n,) tensor.
    """
    Ab = torch.cat([A.to(compute_dtype(A.dtype)), torch.as_tensor(b).to(compute_dtype(A.dtype)).reshape(-1, 1)], 1)
    if isinstance(scores, torch.Tensor):
        s = scores
    elif scores == "lewis":
        s = lewis_weights(Ab, p) if p != 2 else leverage_scores(Ab)
    elif scores == "leverage":
        s = leverage_scores(Ab)
    elif scores == "uniform":
        s = torch.ones(Ab.shape[0], dtype=Ab.dtype)
    else:
        raise ValueError(f"scores must be 'lewis', 'leverage', 'uniform' or a tensor, got {scores!r}")
    idx, w = sample_rows(s, n_samples, p=p, mode=mode, seed=seed)
    return lp_regression(Ab[idx, :-1], Ab[idx, -1], p, weights=w), idx


def select_calibration_tokens(
    features: torch.Tensor | Sequence[torch.Tensor],
    n_tokens: int,
    *,
    method: Literal["leverage", "lewis", "uniform"] = "leverage",
    p: float = 1.0,
    ridge: float = 1e-6,
    seed: Seed = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `n_tokens` calibration tokens out of N by their leverage in the activations.

    Args:
        features: (N, d) activations of one layer's input, or a sequence of (N, d_l) for several
            layers: then one token set serves all of them, sampled from the mixture
            mean_l(s^(l) / sum s^(l)) (each layer's distribution, each at least 1/L of it).
        n_tokens: exactly this many distinct tokens are kept (systematic sampling).
        method: "leverage" (ridge leverage, the l2 choice for Gram-based compressors),
            "lewis" (l_p Lewis weights with this `p`; p = 1 leans less on outliers), or
            "uniform" (the baseline: every token equally likely, weights equal).
        ridge: relative ridge of the leverage (see `leverage_scores`): keeps scores finite when
            d approaches N.
        seed: sampling seed.

    Returns:
        indices (n_tokens,) sorted, weights (n_tokens,): use sum_i w_i^2 x_i x_i^T (`weighted_gram`)
        as the Gram, an unbiased estimate of X^T X.
    """
    mats = [features] if isinstance(features, torch.Tensor) else list(features)
    if not mats:
        raise ValueError("features is empty: pass an (N, d) tensor or a list of them")
    N = mats[0].shape[0]
    for X in mats:
        validate_matrix(X, "features", batched=False)
        if X.shape[0] != N:
            raise ValueError(f"all feature matrices need the same number of tokens N = {N}, got {X.shape[0]}")
    n_tokens = validate_int(n_tokens, "n_tokens", minimum=1)
    if n_tokens > N:
        raise ValueError(f"n_tokens {n_tokens} exceeds the {N} available tokens: choose n_tokens <= {N}")
    if method == "uniform":
        scores = torch.ones(N, dtype=torch.float64)
    elif method in ("leverage", "lewis"):
        scores = torch.zeros(N, dtype=torch.float64)
        for X in mats:
            if method == "leverage":
                s = leverage_scores(X.to(torch.float64), ridge=ridge)
            else:
                s = lewis_weights(X.to(torch.float64), p) if ridge == 0 else _ridge_lewis(X, p, ridge)
            scores += s / s.sum().clamp_min(torch.finfo(torch.float64).tiny)
        scores /= len(mats)
    else:
        raise ValueError(f"method must be 'leverage', 'lewis' or 'uniform', got {method!r}")
    return sample_rows(scores, n_tokens, p=2.0, mode="systematic", seed=seed)


def _ridge_lewis(X: torch.Tensor, p: float, ridge: float) -> torch.Tensor:
    """Lewis weights of the first N rows of [X; sqrt(lam) I] (a ridge, as in `leverage_scores`)."""
    X = X.to(torch.float64)
    d = X.shape[1]
    lam = ridge * float(X.square().sum()) / d
    return lewis_weights(torch.cat([X, math.sqrt(lam) * torch.eye(d, dtype=X.dtype)]), p)[: X.shape[0]]
