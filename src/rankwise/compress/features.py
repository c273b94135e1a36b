"""Output-feature compression: Atomic Feature Mimicking (AFM; Yu & Wu 2023, "Compressing
Transformers: Features Are Low-Rank, but Weights Are Not!").

Instead of the weights, compress a layer's *outputs* y = W x + b with PCA. The output statistics
follow from the input ones, so no extra capture is needed: with input mean mu_x and covariance
Sigma_x = G / N - mu_x mu_x^T,

    mu_y = W mu_x + b,        C_y = W Sigma_x W^T            (m, m)

Keep the top-k eigenvectors U_k of C_y (P = U_k U_k^T) and replace the layer by

    A = U_k^T W  (k, n),   B = U_k  (m, k),   bias = P b + (I - P) mu_y                      (1)

so `B A x + bias = mu_y + P (y - mu_y)`: the exact rank-k PCA reconstruction of the outputs
(the paper's `b1 = U_k^T b`, `b2 = (I - P) mu` folded into B's bias). Its calibration error per
token is the sum of the discarded eigenvalues of C_y. Without centring (`center=False`) P comes
from `W G W^T` and AFM coincides with SVD-LLM's Cholesky-whitened truncation: the output PCA
and the truncation-aware whitening are the same subspace (a property the tests check).
The bias is always stored (m extra parameters when the layer had none), and counted.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.compress.base import InputStats, ObservedStats
from rankwise.layers.factorized import FactorizedLinear

__all__ = ["FeatureCompressor", "output_pca"]


def output_pca(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, *, center: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eigenvalues (m,) descending, eigenvectors U (m, m), mu_y (m,)) of the output statistics.

    Eigenvalues are of the per-token covariance C_y (or of `W G W^T / N` when not centred).
    """
    from rankwise import linalg

    if stats.gram is None or stats.n_tokens < 1:
        raise ValueError("AFM needs the input Gram and token count: calibrate with stats=('gram', 'mean')")
    W = weight.detach().to(torch.float64)
    N = stats.n_tokens
    if center:
        if stats.sum is None:
            raise ValueError("AFM with center=True needs the input mean: calibrate with stats=('gram', 'mean')")
        mu_x = stats.sum.to(torch.float64) / N
        cov_x = stats.gram.to(torch.float64) / N - torch.outer(mu_x, mu_x)
        mu_y = W @ mu_x + (bias.detach().to(torch.float64) if bias is not None else 0.0)
    else:
        cov_x = stats.gram.to(torch.float64) / N
        mu_y = torch.zeros(W.shape[0], dtype=torch.float64)
    C = W @ cov_x @ W.T
    C = 0.5 * (C + C.T)
    evals, evecs = linalg.eigh(C)  # ascending
    return evals.flip(0).clamp_min(0), evecs.flip(1), mu_y


class FeatureCompressor(ObservedStats):
    """Compressor (rankwise.compress.base protocol) for AFM output-feature PCA.

    `spectrum` returns `sqrt(N * lambda_i(C_y))`, so its squares are the discarded calibration
    error, comparable with the whitened-SVD spectra for rank allocation.
    """

    name = "afm"
    needs = ("gram", "mean")
    adds_bias = True

    def __init__(self, *, center: bool = True) -> None:
        self.center = center
        self.stats_: dict[str, InputStats] = {}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _pca(self, fqn: str, module: nn.Module):
        if fqn not in self._cache:
            if fqn not in self.stats_:
                raise ValueError(f"no calibration statistics for {fqn!r}: observe its inputs first")
            self._cache[fqn] = output_pca(module.weight, module.bias, self.stats_[fqn], center=self.center)
        return self._cache[fqn]

    def spectrum(self, fqn: str, module: nn.Module) -> torch.Tensor:
        evals, _, _ = self._pca(fqn, module)
        k = min(module.weight.shape)
        return (evals[:k] * self.stats_[fqn].n_tokens).sqrt()

    def compress(self, fqn: str, module: nn.Module, rank: int) -> FactorizedLinear:
        weight = module.weight.detach()
        m, n = weight.shape
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"rank {rank} for {fqn!r} must be in [1, {min(m, n)}]")
        _, U, mu_y = self._pca(fqn, module)
        Uk = U[:, :rank]  # (m, k)
        A = Uk.T @ weight.to(torch.float64)  # (k, n)
        P_mu = Uk @ (Uk.T @ mu_y)
        b = module.bias.detach().to(torch.float64) if module.bias is not None else torch.zeros(m, dtype=torch.float64)
        bias = Uk @ (Uk.T @ b) + (mu_y - P_mu)  # eq. (1)
        return FactorizedLinear.from_factors(Uk.to(weight.dtype), A.to(weight.dtype), bias.to(weight.dtype))
