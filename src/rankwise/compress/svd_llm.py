"""SVD-LLM's closed-form update ("step 2" of SVD-LLM, Wang et al.
ICLR 2025: the least-squares update of the left factor) and its joint form.

After whitened truncation (step 1) every layer was fitted to inputs of the *original* model.
Once earlier layers are compressed, a layer sees different inputs X (its propagated inputs).
Step 2 keeps the right factor A (r, n) and re-solves the left factor by least squares,

    B = argmin_B || Y - B A X ||_F^2 = W C A^T (A G A^T)^-1,     G = X X^T,          (1)

with target outputs Y = W X_ref: SVD-LLM's reference uses the original layer on the current
inputs (X_ref = X, C = G, `target="current"`); `target="original"` uses the original model's
inputs to this layer (C = X_ref X^T, the cross-Gram), so that each layer also corrects the error
that reaches it from below.

`joint` solves the same objective over *both* factors in closed form. With `G = S S^T`,
`||W X_ref - W_hat X||^2 = ||(W* - W_hat) S||^2 + const` where `W* = W C G^-1` is the
unconstrained optimum, so the best rank-r `W_hat = [W* S]_r S^-1` (one whitened SVD of W*).
With X_ref = X this is plain SVD-LLM whitening on the propagated Gram.

All Grams come from rankwise.compress.sequential (running sums, no stored activations).
"""

from __future__ import annotations

import torch

from rankwise.compress.svd import SVDConfig, Whitening, build_whitening, whitened_factors

__all__ = ["joint_factors", "update_left_factor"]


def _ridge(M: torch.Tensor, ridge: float) -> torch.Tensor:
    if ridge <= 0:
        return M
    scale = M.diagonal().abs().mean().clamp_min(1e-300)
    return M + ridge * scale * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def update_left_factor(
    weight: torch.Tensor,
    A: torch.Tensor,
    gram: torch.Tensor,
    *,
    cross: torch.Tensor | None = None,
    ridge: float = 1e-8,
) -> torch.Tensor:
    """Least-squares left factor of eq. (1): `B = W C A^T (A G A^T)^-1`, (m, r) fp64.

    Args:
        weight: original W (m, n).
        A: fixed right factor (r, n).
        gram: G = sum x x^T of the layer's current inputs (n, n).
        cross: C = sum x_ref x^T (n, n); None means C = G (SVD-LLM's target W X).
        ridge: relative Tikhonov term on `A G A^T` (guards a rank-deficient G).

    Never increases `||W X_ref - B A X||_F` over any other B (it is the minimiser).
    """
    W = weight.detach().to(torch.float64)
    A64 = A.detach().to(torch.float64)
    G = gram.to(torch.float64)
    C = G if cross is None else cross.to(torch.float64)
    if G.shape != (W.shape[1], W.shape[1]) or C.shape != G.shape:
        raise ValueError(f"Grams must be ({W.shape[1]}, {W.shape[1]}), got {tuple(G.shape)}, {tuple(C.shape)}")
    M = _ridge(A64 @ G @ A64.T, ridge)  # (r, r), symmetric positive (semi-)definite
    rhs = W @ C @ A64.T  # (m, r)
    B = torch.linalg.solve(M, rhs.T).T  # M symmetric: solve(M, rhs^T)^T = rhs M^-1
    if not torch.isfinite(B).all():
        raise ValueError("the least-squares update produced NaN/Inf: the Gram is degenerate; raise ridge")
    return B


def joint_factors(
    weight: torch.Tensor,
    rank: int,
    gram: torch.Tensor,
    *,
    cross: torch.Tensor | None = None,
    config: SVDConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r B (m, r), A (r, n) for `min ||W X_ref - B A X||_F` (see the module doc).

    Args:
        weight: original W (m, n).
        rank: r.
        gram: G of the current inputs (n, n).
        cross: C = sum x_ref x^T; None means X_ref = X (plain whitened SVD on G).
        config: whitening options (a Gram whitener, "cholesky" or "eigh"; `damping` also
            regularises the solve `W C G^-1`).
    """
    config = config or SVDConfig(whitener="cholesky")
    if config.whitener not in ("cholesky", "eigh"):
        raise ValueError(f"joint_factors needs a Gram whitener ('cholesky' or 'eigh'), got {config.whitener!r}")
    from rankwise.compress.base import InputStats

    W = weight.detach().to(torch.float64)
    G = gram.to(torch.float64)
    wh: Whitening = build_whitening(config, InputStats(gram=G, n_tokens=1), W)
    if cross is None:
        target = W
    else:
        # W* = W C G^-1 = W C R^-T R^-1 with G (+ damping) = R R^T
        target = wh.right_solve(wh.right_solve(W @ cross.to(torch.float64), transpose=True))
    return whitened_factors(target, rank, wh)
