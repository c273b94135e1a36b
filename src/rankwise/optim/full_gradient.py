"""The two update rules that scale the *full* gradient: Fira's residual and APOLLO's scaling.

Both are written so that no (m, n) temporary is formed beyond what the method needs: the
optimizer applies ``W += alpha * G * mult + up(low_term)`` with one in-place ``addcmul_`` and
one in-place GEMM (`LowRankOptimizer._lowrank`), and the norm-growth limiter's norm comes from
per-channel norms of G and R (`functional.residual_norm`) instead of a formed product.
"""

from __future__ import annotations

import math

import torch

from rankwise.optim import functional as ofn
from rankwise.optim.projector import Projector


def _limiter_state(state: dict, device: torch.device) -> torch.Tensor:
    if "limiter_norm" not in state:
        state["limiter_norm"] = torch.tensor(-1.0, dtype=torch.float32, device=device)
    return state["limiter_norm"]


def apollo_scale(
    g: torch.Tensor, low: torch.Tensor, n: torch.Tensor, proj: Projector, group: dict, state: dict
) -> torch.Tensor:
    """APOLLO's multiplier of the raw gradient: s = ||N_c|| / ||R_c|| per channel (or one
    tensor-wise ratio), times sqrt(scale), divided by the norm-growth limiter's factor.
    The limiter sees ||G ⊙ s|| (times sqrt(scale) first when ``scale_front``), computed
    from channel norms of G so that G ⊙ s is never formed."""
    if group["scaling"] == "channel":
        s = ofn.channel_scale(n, low, proj.side)
    else:
        s = ofn.tensor_scale(n, low)
    root = math.sqrt(group["scale"])
    if group["scale_front"]:
        s = s * root
    if group["limiter"]:
        _limiter_state(state, g.device)
        if s.ndim == 0:
            norm = g.norm() * s.abs()
        else:
            dim = ofn.channel_dim(low, proj.side)
            gsq = torch.linalg.vector_norm(g, dim=dim).square_()
            norm = gsq.mul_(s.reshape(-1).square()).sum().sqrt()
        limit, state["limiter_norm"] = ofn.norm_growth_factor(
            norm, state["limiter_norm"], group["limiter_gamma"])
        s = s / limit
    if not group["scale_front"]:
        s = s * root
    return s


def fira(
    g: torch.Tensor, low: torch.Tensor, n: torch.Tensor, proj: Projector, group: dict, state: dict,
    eta: float,
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """Fira eq. (6): W -= eta [s up(N) + c ⊙ (G - s up(R))] with c = ||N_c|| / ||R_c|| per
    channel, the residual term divided by the norm-growth limiter's factor.

    Row (right) or column (left) scaling commutes with up(), so the update is
    ``c ⊙ G`` plus ``up(s N - s c ⊙ R)``: one GEMM instead of two, and no (m, n) residual.
    The limiter needs the residual's norm; for an orthonormal basis it comes from channel
    norms of G and R (`functional.residual_norm`), otherwise the residual is formed.
    """
    scale = group["scale"]
    c = ofn.channel_scale(n, low, proj.side)  # (m, 1) right / (1, n) left
    if group["limiter"]:
        _limiter_state(state, g.device)
        if proj.orthonormal:
            norm = ofn.residual_norm(g, low, proj.side, scale, c)
        else:
            norm = (proj.residual(g, low.mul(scale)) * c).norm()
        limit, state["limiter_norm"] = ofn.norm_growth_factor(
            norm, state["limiter_norm"], group["limiter_gamma"])
        c = c / limit
    return g, -eta, c, n.sub_(low * c).mul_(-eta * scale)
