"""Monarch matrices: a product of two block-diagonal factors with a fixed permutation.

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training"
(ICML 2022); the layout is the reference `MonarchLinear` (HazyResearch fly). With b blocks,
in_blk = ceil(in / b), out_blk = ceil(out / b) (inputs zero-padded, outputs cropped):

    L1 (b, q, in_blk),  L2 (b, out_blk, q),   q = in_blk if b in_blk < b out_blk else out_blk
    x (N, in) -> (N, b, in_blk) -> per block k: x_k L1_k^T -> (N, b, q), flat index t = k q + j
      -> reread t = r b + l as (N, q, b), transpose (N, b, q) -> per block l: z_l L2_l^T
      -> (N, b, out_blk) -> transpose (N, out_blk, b) -> flat output o = s b + l -> crop.

So M[s b + l, k in_blk + p] = sum over t with t % b = l and t // q = k of
L2[l, s, t // b] * L1[k, t % q, p]: each (l, k) slice of M (rows o = l mod b, columns of input
block k) is a product of disjoint pieces of L2[l] and L1[k] with rank |T(l, k)|, and the slices
partition both M and the parameters. Hence the closed-form projection of a dense W
(`project_monarch`; Dao et al. 2022's projection onto Monarch matrices): replace every slice by its best rank-|T(l, k)|
approximation (one truncated SVD each, factors split sqrt(S)); Eckart-Young per slice makes it
optimal in Frobenius norm, exact for a Monarch matrix, and idempotent. For a square d = b^2
every |T| is 1 (the paper's rank-1 slices). With padding, the padded entries are fitted as zeros.

Cost: b (q in_blk + out_blk q) parameters, e.g. 2 d^2 / b for square d (b = 4: 50 %).
Init (reference): every block Kaiming-uniform(a=sqrt 5) with its own fan-in: U(+-1/sqrt(fan_in)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankwise.layers._base import ParameterizedLinear, linear_weight
from rankwise.linalg import compute_dtype, kaiming_uniform, make_generator

__all__ = ["MonarchLinear", "monarch_shapes", "project_monarch"]


def monarch_shapes(
    out_features: int, in_features: int, nblocks: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (L1, L2) for an (out, in) layer with `nblocks` blocks (reference rule)."""
    if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 1:
        raise ValueError(f"nblocks must be a positive int, got {nblocks!r}")
    if nblocks > min(out_features, in_features):
        raise ValueError(
            f"nblocks {nblocks} exceeds min(out, in) = {min(out_features, in_features)}: "
            f"choose nblocks <= {min(out_features, in_features)} (e.g. 4, or sqrt(in))"
        )
    in_blk = math.ceil(in_features / nblocks)
    out_blk = math.ceil(out_features / nblocks)
    q = in_blk if in_blk < out_blk else out_blk
    return (nblocks, q, in_blk), (nblocks, out_blk, q)


def _slice_sets(nblocks: int, q: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """For each (l, k): (r indices into L2[l]'s columns, j indices into L1[k]'s rows) of T(l, k)."""
    t = torch.arange(nblocks * q)
    sets: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for l_ in range(nblocks):
        for k in range(nblocks):
            ts = t[(t % nblocks == l_) & (t // q == k)]
            sets[(l_, k)] = (ts // nblocks, ts % q)
    return sets


def project_monarch(W: torch.Tensor, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Frobenius-closest Monarch factors (L1, L2) of a dense W (out, in); compute dtype.

    Returns:
        L1 (b, q, in_blk), L2 (b, out_blk, q) in fp32 (fp64 for fp64 W).
    """
    from rankwise import linalg

    if W.dim() != 2:
        raise ValueError(f"W must be a matrix (out, in), got shape {tuple(W.shape)}")
    m, n = W.shape
    s1, s2 = monarch_shapes(m, n, nblocks)
    b, q, in_blk = s1
    out_blk = s2[1]
    work = W.detach().to(compute_dtype(W.dtype))
    padded = work.new_zeros(b * out_blk, b * in_blk)
    padded[:m, :n] = work
    # slices[l, k] = rows {s b + l}, columns {k in_blk + p}: (b, b, out_blk, in_blk)
    slices = padded.view(out_blk, b, b, in_blk).permute(1, 2, 0, 3)
    L1 = work.new_zeros(s1)
    L2 = work.new_zeros(s2)
    for (l_, k), (r_idx, j_idx) in _slice_sets(b, q).items():
        rho = min(r_idx.numel(), out_blk, in_blk)
        if rho == 0:
            continue
        U, S, Vh = linalg.truncated_svd(slices[l_, k], rho)
        left, right = linalg.split_factors(U, S, Vh)  # (out_blk, rho), (rho, in_blk)
        L2[l_][:, r_idx[:rho]] = left
        L1[k][j_idx[:rho], :] = right
    return L1, L2


class MonarchLinear(ParameterizedLinear):
    """`y = M x + b` with M the Monarch product of L1 (b, q, in_blk) and L2 (b, out_blk, q).

    Args:
        in_features, out_features: n, m.
        nblocks: b (default 4, the reference default).
        bias: keep a bias.
        generator: CPU generator (or seed) for the block init.
    """

    method = "monarch"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        generator: torch.Generator | int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        s1, s2 = monarch_shapes(out_features, in_features, nblocks)
        self.nblocks = nblocks
        gen = make_generator(generator)
        self.L1 = nn.Parameter(kaiming_uniform(s1, s1[2], gen).to(device=device, dtype=dtype))
        self.L2 = nn.Parameter(kaiming_uniform(s2, s2[2], gen).to(device=device, dtype=dtype))
        self._init_bias_(gen)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        nblocks: int = 4,
        project: bool = True,
        generator: torch.Generator | int | None = None,
    ) -> MonarchLinear:
        """Project `linear.weight` onto Monarch matrices (dense-to-sparse), or a fresh init.

        Args:
            project: True: the closed-form projection (keeps the pretrained function as well as
                a Monarch matrix can); False: a random init of the same shape (training from
                scratch).
        """
        weight = linear_weight(linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            nblocks,
            bias=linear.bias is not None,
            generator=generator,
            device=weight.device,
            dtype=weight.dtype,
        )
        if project:
            L1, L2 = project_monarch(weight, nblocks)
            with torch.no_grad():
                layer.L1.copy_(L1)
                layer.L2.copy_(L2)
        layer._copy_bias_(linear)
        return layer

    def _apply_monarch(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> M x (..., out), no bias."""
        b, q, in_blk = self.L1.shape
        out_blk = self.L2.shape[1]
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] < b * in_blk:
            x = nn.functional.pad(x, (0, b * in_blk - x.shape[-1]))
        x = x.view(-1, b, in_blk)
        h = torch.einsum("nkp,kqp->nkq", x, self.L1.to(x.dtype))  # (N, b, q), t = k q + j
        h = h.reshape(-1, q, b).transpose(1, 2)  # reread t = r b + l: (N, l=b, r=q)
        y = torch.einsum("nlr,lsr->nsl", h, self.L2.to(x.dtype))  # (N, out_blk, b), o = s b + l
        y = y.reshape(-1, out_blk * b)[:, : self.out_features]
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, device=self.L1.device, dtype=self.L1.dtype)
        return self._apply_monarch(eye).T  # columns M e_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._apply_monarch(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}"
