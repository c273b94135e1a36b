"""Rank measures of representations (embedding matrices), not weights.

- RankMe (Garrido et al. 2023, ICML, "RankMe: assessing the downstream performance of pretrained
  self-supervised representations by their rank", eq. 1): exp(H(p)), p_k = s_k / ||s||_1 + eps,
  of an embedding matrix Z (N, K).
- Matrix Nuclear-Norm (Li et al. 2024, arXiv 2410.10672, "Large language model evaluation via
  matrix nuclear-norm"): the L_{1,2} norm, the sum of the top min(L, d) column L2 norms, of the
  centred, row-normalised representations: an SVD-free surrogate of the nuclear norm ||R||_*.
"""

from __future__ import annotations

import torch

from rankwise.linalg.spectral_ranks import _check_matrix, _spectrum, _svdvals

__all__ = ["matrix_nuclear_norm", "normalize_representations", "nuclear_norm", "rankme"]


def rankme(x: torch.Tensor, *, eps: float = 1e-7) -> float:
    """RankMe of embeddings Z (N, K) or their singular values: exp(H(s / ||s||_1 + eps)).

    Garrido et al. 2023, eq. 1; no centring (as in the paper). Use N >> K (the paper: 25 600).
    """
    s, _ = _spectrum(x)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def normalize_representations(R: torch.Tensor) -> torch.Tensor:
    """Centre the columns of R (L tokens, d) and scale every row to unit l2 norm (MNN step 2)."""
    _check_matrix(R, "R")
    R = R.detach().to(torch.float64)
    R = R - R.mean(dim=0, keepdim=True)
    return R / R.norm(dim=1, keepdim=True).clamp_min(1e-12)


def matrix_nuclear_norm(R: torch.Tensor, *, normalize: bool = True) -> float:
    """Matrix Nuclear-Norm of representations R (L, d): sum of the top min(L, d) column norms.

    The L_{1,2} surrogate of ||R||_* (Li et al. 2024): O(L d) instead of an SVD. With
    normalize=True (the paper) R is first centred and row-normalised; the per-text score is
    MNN / L. For L >= d it upper-bounds ||R||_* (triangle inequality); for L < d it need not.
    """
    R = normalize_representations(R) if normalize else _as_fp64(R)
    norms = torch.sort(R.norm(dim=0), descending=True).values
    return float(norms[: min(R.shape)].sum())


def nuclear_norm(R: torch.Tensor, *, normalize: bool = False) -> float:
    """Exact nuclear norm ||R||_* = sum of singular values (fp64); normalize as in MNN."""
    R = normalize_representations(R) if normalize else _as_fp64(R)
    return float(_svdvals(R).sum())


def _as_fp64(R: torch.Tensor) -> torch.Tensor:
    _check_matrix(R, "R")
    return R.detach().to(torch.float64)
