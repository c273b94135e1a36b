"""Pure update rules shared by every low-rank optimizer (no state objects, no projector).

Each function takes tensors and hyperparameters and returns tensors or updates the moment
tensors it is given in place (trailing ``_``). The stateful shell (`rankwise.optim.lowrank`)
decides *which* tensors (full-size or projected) go in. For a low-rank matrix R the
"full-size dimension" is the one that was not reduced (GaLore, Zhao et al. 2024, Algorithm 2):
rows of R (m, r) for right projection, columns of R (r, n) for left.

Two Adam styles exist in the papers and we keep both, because they differ measurably
(Adam, Kingma & Ba 2015, Algorithm 1 with eps moved inside the bias correction, vs the
HF/GaLore form of Zhao et al. 2024, Algorithm 1):

* ``"torch"``  (torch.optim.AdamW, FRUGAL, DCT-AdamW): decay ``W *= 1 - lr*wd`` *before* the
  update; ``denom = sqrt(V)/sqrt(bc2) + eps``; step ``lr/bc1``.
* ``"galore"`` (GaLore, Fira, APOLLO official code, HF-style): ``denom = sqrt(V) + eps``; step
  ``lr*sqrt(bc2)/bc1``; decay ``W -= lr*wd*W`` *after* the update.
"""

from __future__ import annotations

import math

import torch

ADAM_STYLES = ("torch", "galore")


def adam_moments_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
) -> None:
    """Adam's moment EMAs in place: ``M <- b1 M + (1-b1) g``, ``V <- b2 V + (1-b2) g^2``."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_denom(
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    style: str = "torch",
) -> tuple[torch.Tensor, float]:
    """Adam's denominator and step size: the update is ``W -= step_size * M / denom``.

    * torch style: ``denom = sqrt(V)/sqrt(bc2) + eps``, ``step_size = lr / bc1`` (the
      arithmetic of torch.optim.AdamW's single-tensor path, so plain groups match it bitwise);
    * galore style: ``denom = sqrt(V) + eps``, ``step_size = lr * sqrt(bc2) / bc1``.

    `step` is the 1-based count *after* this step's moment update.
    """
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if style == "torch":
        # in place after the one allocation: same values as torch's `(sqrt(V) / c).add_(eps)`
        return exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(eps), lr / bc1
    if style == "galore":
        return exp_avg_sq.sqrt().add_(eps), lr * math.sqrt(bc2) / bc1
    raise ValueError(f"adam_style {style!r} is unknown: choose one of {ADAM_STYLES}")


def decoupled_decay_(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay in place: ``W <- W (1 - lr * wd)`` (Loshchilov & Hutter)."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)


# --------------------------------------------------------------------------- Adafactor


def adafactor_beta2(step: int, decay_rate: float = -0.8) -> float:
    """Adafactor's increasing second-moment decay ``1 - t^decay_rate`` (Shazeer & Stern, eq. 7)."""
    return 1.0 - math.pow(step, decay_rate)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / math.sqrt(x.numel())


def adafactor_update_(
    grad: torch.Tensor,
    exp_avg_sq_row: torch.Tensor,
    exp_avg_sq_col: torch.Tensor,
    exp_avg: torch.Tensor | None,
    step: int,
    *,
    lr: float,
    beta1: float | None,
    decay_rate: float = -0.8,
    eps1: float = 1e-30,
    clip_threshold: float = 1.0,
) -> torch.Tensor:
    """One Adafactor update (factored second moment) for a 2-D tensor, as in HF Adafactor.

    grad (rows, cols); exp_avg_sq_row (rows,); exp_avg_sq_col (cols,); exp_avg (rows, cols) or
    None. Returns the lr-multiplied, RMS-clipped, momentum-averaged update U (rows, cols) to
    *subtract* from the parameter (``relative_step=False, scale_parameter=False``, as GaLore-Adafactor, Zhao et al. 2024, §5).
    """
    beta2t = adafactor_beta2(step, decay_rate)
    sq = grad.square().add_(eps1)
    exp_avg_sq_row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
    exp_avg_sq_col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
    r_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
    update = (r_factor * c_factor).mul_(grad)
    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    update.mul_(lr)
    if exp_avg is not None:
        assert beta1 is not None
        exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
        update = exp_avg.clone()
    return update


# --------------------------------------------------------------------------- channel scaling


def channel_dim(low: torch.Tensor, side: str) -> int:
    """The dim of a projected matrix to reduce over so that one factor per full-size channel
    remains: right projection gives R (m, r) -> norms over dim 1 (one per row);
    left projection gives R (r, n) -> norms over dim 0 (one per column)."""
    if side == "right":
        return 1
    if side == "left":
        return 0
    raise ValueError(f"side {side!r} is unknown: expected 'left' or 'right'")


def channel_scale(numer: torch.Tensor, denom: torch.Tensor, side: str) -> torch.Tensor:
    """Per-channel ratio ``||numer_c|| / (||denom_c|| + 1e-8)`` shaped to broadcast on (m, n).

    Fira eq. (6) uses it with numer = Adam direction N, denom = projected gradient R (both
    low-rank); APOLLO's "channel" mode uses the same ratio. Returns (m, 1) for right projection,
    (1, n) for left.
    """
    dim = channel_dim(numer, side)
    ratio = numer.norm(dim=dim, keepdim=True) / (denom.norm(dim=dim, keepdim=True) + 1e-8)
    return ratio


def tensor_scale(numer: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """APOLLO-Mini's tensor-wise ratio ``||N||_F / (||R||_F + 1e-8)`` (a 0-d tensor)."""
    return numer.norm() / (denom.norm() + 1e-8)


def norm_growth_factor(
    norm: torch.Tensor, prev_norm: torch.Tensor, gamma: float = 1.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter as a divisor (Fira §3.3, gamma = 1.01 hard-coded there).

    For an update of norm `norm` (0-d) and the previous stored norm ``prev_norm`` (0-d;
    negative = "no previous step"), returns ``(limit, new_prev_norm)``: divide the update by
    ``limit`` (>= 1; exactly 1 on the first call) so that its norm is at most
    ``gamma * prev_norm``; the stored norm is the norm *after* limiting.
    """
    if float(prev_norm) < 0.0:
        return torch.ones((), dtype=norm.dtype), norm.detach().clone().to(prev_norm.dtype)
    ratio = norm / (prev_norm + 1e-8)
    limit = torch.clamp(ratio, min=gamma) / gamma  # >= 1
    return limit, (norm / limit).to(prev_norm.dtype)


def norm_growth_limit(
    update: torch.Tensor, prev_norm: torch.Tensor, gamma: float = 1.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm_growth_factor` applied: ``(update / limit, new_prev_norm)``, with
    ``||limited|| <= gamma * prev_norm`` (the first call only records the norm)."""
    norm = update.norm()
    if float(prev_norm) < 0.0:
        return update, norm.detach().clone().to(prev_norm.dtype)
    limit, new = norm_growth_factor(norm, prev_norm, gamma)
    return update / limit, new


def residual_norm(
    grad: torch.Tensor, low: torch.Tensor, side: str, scale: float, weight: torch.Tensor
) -> torch.Tensor:
    """``|| weight * (G - scale * up(low)) ||_F`` without forming the (m, n) residual.

    With an orthonormal basis, ``G - up(low)`` is orthogonal to the subspace, so per
    full-size channel c (rows for right projection, columns for left; `channel_dim`)
    ``||G_c - s up(low)_c||² = ||G_c||² - (1 - (1 - s)²) ||low_c||²`` (Pythagoras), and a
    per-channel `weight` (the broadcastable (m, 1) / (1, n) of `channel_scale`) multiplies it.
    Rounding can leave a tiny negative difference where the residual is ~0: clamped at 0.
    """
    dim = 1 if side == "right" else 0
    gsq = torch.linalg.vector_norm(grad, dim=dim).square_()
    lsq = torch.linalg.vector_norm(low, dim=dim).square_()
    resid = gsq.sub_(lsq, alpha=1.0 - (1.0 - scale) ** 2).clamp_(min=0.0)
    return resid.mul_(weight.reshape(-1).square()).sum().sqrt()


# --------------------------------------------------------------------------- moment rotation


def rotation(old_basis: torch.Tensor, new_basis: torch.Tensor, side: str) -> torch.Tensor:
    """The (r, r) change of coordinates from an old subspace to a new one.

    Right projection, P (r, n): a low-rank X (m, r) stands for ``X P_old``; in new coordinates
    ``X P_old P_newᵀ`` so the rotation multiplies on the right: ``X @ rot``, rot = P_old P_newᵀ.
    Left projection, P (m, r): ``P_old X`` -> ``P_newᵀ P_old X``, so ``rot @ X`` with
    rot = P_newᵀ P_old.
    """
    if side == "right":
        return old_basis.float() @ new_basis.float().T
    return new_basis.float().T @ old_basis.float()


def rotate_moments_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rot: torch.Tensor, side: str
) -> None:
    """Re-express Adam moments in a new basis, in place.

    The first moment is linear: ``M <- M rot`` (right) or ``rot M`` (left). The second moment
    is a per-coordinate variance; if coordinates were independent the variance of a rotated
    coordinate is the rot²-weighted sum, so ``V <- V rot²`` (elementwise square), which stays
    non-negative. For selection-type bases (DCT) rot is a 0/1 matrix and this keeps the moments
    of columns present in both subspaces and zeroes the new ones.
    """
    rot = rot.to(exp_avg.dtype)
    sq = rot.square()
    if side == "right":
        exp_avg.copy_(exp_avg @ rot)
        exp_avg_sq.copy_(exp_avg_sq @ sq)
    else:
        exp_avg.copy_(rot @ exp_avg)
        exp_avg_sq.copy_(sq @ exp_avg_sq)
