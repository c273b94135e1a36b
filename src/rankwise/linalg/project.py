"""One-sided projections of a gradient (or any matrix) onto a rank-r subspace.

GaLore's "std" side rule (Zhao et al. 2024, "GaLore: Memory-efficient LLM training by gradient
low-rank projection"; official `galore_projector.py`: `if shape[0] >= shape[1]`):
project the SMALLER dimension, so the projector is min(m, n) x r and the low-rank state is
max(m, n) x r. For G (m, n):

    m >= n  ->  "right": P (n, r),  down R = G P     (m, r),  up  X P^T  (m, n)
    m <  n  ->  "left":  P (m, r),  down R = P^T G   (r, n),  up  P X    (m, n)

A square matrix goes right, as in the official code. P always has orthonormal COLUMNS here; GaLore
stores its right projector as the rows Vh[:r] (r, n): pass Vh[:r].mT (a free view).
With P from the top-r singular vectors of G, up(down(G)) is the best rank-r approximation of G
(Eckart-Young). Leading batch dims are allowed on G/R (P is broadcast).
"""

from __future__ import annotations

from typing import Literal

import torch

from rankwise.linalg._checks import validate_shape

__all__ = ["Side", "project_down", "project_up", "projection_side"]

Side = Literal["left", "right"]


def projection_side(shape: tuple[int, ...] | torch.Size) -> Side:
    """GaLore's rule for a matrix of shape (..., m, n): "right" if m >= n else "left"."""
    if len(shape) < 2:
        raise ValueError(f"projection_side needs a matrix shape (..., m, n), got {tuple(shape)}")
    m, n = validate_shape(tuple(shape)[-2:], "shape")
    return "right" if m >= n else "left"


def _check(side: str, P: torch.Tensor, dim: int, what: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}: use projection_side(shape)")
    if P.ndim != 2:
        raise ValueError(f"P must be a 2-D (d, r) matrix with orthonormal columns, got shape {tuple(P.shape)}")
    if P.shape[0] != dim:
        raise ValueError(
            f"{side} projection of {what} needs P with {dim} rows, got P {tuple(P.shape)}: "
            "P is (m, r) on the left, (n, r) on the right (transpose GaLore's Vh[:r] with .mT)"
        )


def project_down(G: torch.Tensor, P: torch.Tensor, side: Side) -> torch.Tensor:
    """Project G (..., m, n) into the subspace of P: left P^T G (..., r, n), right G P (..., m, r)."""
    if side == "left":
        _check(side, P, G.shape[-2], f"G {tuple(G.shape)}")
        return P.mT @ G
    _check(side, P, G.shape[-1], f"G {tuple(G.shape)}")
    return G @ P


def project_up(R: torch.Tensor, P: torch.Tensor, side: Side) -> torch.Tensor:
    """Back-project a low-rank R: left P R (..., m, n) from R (..., r, n); right R P^T from R (..., m, r)."""
    if side == "left":
        _check(side, P, P.shape[0], "R")
        if R.shape[-2] != P.shape[1]:
            raise ValueError(f"left back-projection needs R (..., {P.shape[1]}, n), got {tuple(R.shape)}")
        return P @ R
    _check(side, P, P.shape[0], "R")
    if R.shape[-1] != P.shape[1]:
        raise ValueError(f"right back-projection needs R (..., m, {P.shape[1]}), got {tuple(R.shape)}")
    return R @ P.mT
