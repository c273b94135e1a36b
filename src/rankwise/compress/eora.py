"""EoRA: eigenspace low-rank compensation of any compression error (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation").

Given the original weight W (m, n), a compressed weight W_c and the Gram G of the layer's
inputs, EoRA adds a rank-r path `B A` that minimises the calibration-weighted error

    || (Delta W - B A) X ||_F,     Delta W = W - W_c,                                    (1)

by projecting Delta W into the eigenspace of G = Q Lambda Q^T: SVD of `Delta W Q Lambda^1/2`,
`B = U_r S_r^1/2`, `A = S_r^1/2 V_r^T Lambda^-1/2 Q^T` (Liu et al., NVIDIA). It is the
"eigh" whitener of rankwise.compress.svd applied to the error, so it shares its code;
eigenvalues <= floor * max are clamped (the reference divides by exact zeros).

Sources of W_c built in (`compressed_weight`):
* "svd"   our own truncation, any whitener (W_c = B A of a FactorizedLinear, passed in);
* "int8" / "int4"  blockwise absmax quantisation (rankwise.linalg.quant), stored dequantised:
  this simulates the quantiser's error, the saved weights are float (no int kernels here);
* "2:4"   semi-structured pruning, 2 of every 4 consecutive input weights kept by Wanda's score
  |W_ij| * ||x_j|| (magnitude when no Gram is given); stored dense with zeros.

The result is a `CompensatedLinear` (`y = base(x) + lora_B(lora_A(x))`), which
`export_peft` writes as a PEFT LoRA adapter (lora_alpha = r, so the scale is 1).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.compress.base import InputStats
from rankwise.compress.svd import SVDConfig, Whitening, build_whitening, whitened_factors

__all__ = [
    "COMPRESSIONS",
    "CompensatedLinear",
    "compensate",
    "compressed_weight",
    "eigen_whitening",
    "eora_factors",
]

COMPRESSIONS = ("svd", "int8", "int4", "2:4")


def eigen_whitening(gram: torch.Tensor, *, eig_floor: float = 1e-10) -> Whitening:
    """EoRA's projection `Q Lambda^1/2` (as a symmetric root) and its inverse for a Gram (n, n)."""
    config = SVDConfig(whitener="eigh", eig_floor=eig_floor)
    return build_whitening(config, InputStats(gram=gram, n_tokens=1), gram)


def eora_factors(
    delta: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    *,
    eig_floor: float = 1e-10,
    whitening: Whitening | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m, r), A (r, n) minimising eq. (1) for the error `delta` (m, n) and Gram G (n, n).

    Any positive scaling of G (sum or mean over tokens) gives the same factors. Returned in fp64.
    `whitening` (from `eigen_whitening(gram)`) skips the eigendecomposition when layers share G.
    """
    if delta.dim() != 2 or gram.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(
            f"delta must be (m, n) and gram (n, n); got {tuple(delta.shape)} and {tuple(gram.shape)}"
        )
    wh = whitening if whitening is not None else eigen_whitening(gram, eig_floor=eig_floor)
    return whitened_factors(delta.detach().to(torch.float64), rank, wh)


def _prune_2_4(weight: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    m, n = weight.shape
    if n % 4:
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got {n}: use int8/int4 instead")
    score = weight.abs().to(torch.float64)
    if gram is not None:
        score = score * gram.diagonal().to(torch.float64).clamp_min(0).sqrt()[None, :]  # Wanda
    groups = score.reshape(m, n // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return weight * keep.reshape(m, n).to(weight.dtype)


def compressed_weight(
    weight: torch.Tensor,
    kind: str,
    *,
    gram: torch.Tensor | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """W_c (m, n) for "int8", "int4" (blockwise absmax, dequantised) or "2:4" pruning."""
    if kind in ("int8", "int4"):
        from rankwise import linalg

        bits = 8 if kind == "int8" else 4
        q = linalg.quantize_blockwise(weight.detach().float(), bits=bits, block_size=block_size)
        return linalg.dequantize_blockwise(q).to(weight.dtype).reshape(weight.shape)
    if kind == "2:4":
        return _prune_2_4(weight.detach(), gram)
    raise ValueError(f"unknown compression {kind!r}: choose one of {list(COMPRESSIONS)}")


class CompensatedLinear(nn.Module):
    """`y = base(x) + lora_B(lora_A(x))`: a compressed layer plus its EoRA path.

    State-dict names (PEFT's vocabulary, so an adapter export is a renaming):
        {fqn}.base_layer.*         the compressed layer (nn.Linear or FactorizedLinear)
        {fqn}.lora_A.weight        (r, in)
        {fqn}.lora_B.weight        (out, r)
    """

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, rank: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"compensation rank must be >= 1, got {rank}")
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, base_layer: nn.Module, B: torch.Tensor, A: torch.Tensor) -> CompensatedLinear:
        ref = next(base_layer.parameters())
        layer = cls(base_layer, A.shape[1], B.shape[0], A.shape[0], device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A.to(ref.dtype))
            layer.lora_B.weight.copy_(B.to(ref.dtype))
        return layer

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x))

    def base_weight(self) -> torch.Tensor:
        """The compressed weight W_c (out, in)."""
        if hasattr(self.base_layer, "dense_weight"):
            return self.base_layer.dense_weight()
        return self.base_layer.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def compensate(
    original: nn.Module,
    base_layer: nn.Module,
    gram: torch.Tensor,
    rank: int,
    *,
    eig_floor: float = 1e-10,
    whitening: Whitening | None = None,
) -> CompensatedLinear:
    """Wrap `base_layer` (the compressed form of `original`) with its rank-`rank` EoRA path."""
    weight = original.weight.detach()
    base = CompensatedLinear(base_layer, weight.shape[1], weight.shape[0], 1)
    delta = weight.to(torch.float64) - base.base_weight().detach().to(torch.float64)
    B, A = eora_factors(delta, gram, min(rank, min(delta.shape)), eig_floor=eig_floor, whitening=whitening)
    return CompensatedLinear.from_factors(base_layer, B, A)
