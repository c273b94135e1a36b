"""LSH-bucketed sparse support for Scatterbrain (SMYRF-style clustering), with de-duplication.

Scatterbrain's sparse support (Chen, Dao et al. 2021), built with SMYRF's
asymmetric LSH (Daras et al. 2020). Queries and keys are made comparable by the asymmetric
XBOX+ transform (q -> [q, 0, sqrt(Mq^2 - |q|^2)], k -> [k, sqrt(Mk^2 - |k|^2), 0], so that
q~^T k~ = q^T k while every q~ has norm Mq and every k~ norm Mk: a large inner product becomes a
small angle). Each of `n_hashes` rounds projects all q~ and k~ on one random Gaussian direction,
sorts them, and cuts both sorted lists into clusters of `cluster_size`; query cluster c attends
exactly to key cluster c (balanced buckets, as SMYRF's equal-size q/k clusters).

A pair that meets in several rounds is counted once: its exact term and its low-rank correction
are divided by c, the number of rounds in which it meets (the reference code subtracts log c from
the logit, the same thing). The support depends on q and k but not on the random features, so
E_hat stays unbiased given the support.

Memory O(n_hashes^2 * n * cluster_size) for the pair counts; time O(n_hashes n cluster_size (d + M)).
"""

from __future__ import annotations

import math

import torch

from rankwise.attention.scatterbrain import (
    _check_qkv,
    _compute_dtype,
    _lowrank_terms,
    combine,
    stabilised_features,
)
from rankwise.linalg.svd import Seed, make_generator

__all__ = ["lsh_clusters", "lsh_scatterbrain_attention", "lsh_support"]


def _xbox(qs: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qn2, kn2 = qs.square().sum(-1, keepdim=True), ks.square().sum(-1, keepdim=True)
    mq2, mk2 = qn2.amax(-2, keepdim=True), kn2.amax(-2, keepdim=True)
    zq, zk = torch.zeros_like(qn2), torch.zeros_like(kn2)
    qt = torch.cat([qs, zq, (mq2 - qn2).clamp_min(0).sqrt()], dim=-1)
    kt = torch.cat([ks, (mk2 - kn2).clamp_min(0).sqrt(), zk], dim=-1)
    return qt, kt


def lsh_clusters(qs: torch.Tensor, ks: torch.Tensor, *, n_hashes: int, cluster_size: int,
                 seed: Seed = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sorted orders of queries and keys per round, padded to a multiple of the cluster size.

    Returns:
        perm_q, perm_k (B, H, R, n') with n' = ceil(n / C) * C: positions in hash order (indices
        >= n are padding, sorted last); and n'.
    """
    if n_hashes < 1 or cluster_size < 1:
        raise ValueError(f"n_hashes and cluster_size must be >= 1, got {n_hashes} and {cluster_size}")
    B, H, n, d = qs.shape
    gen = make_generator(seed)
    qt, kt = _xbox(qs, ks)
    rho = torch.randn(H, n_hashes, d + 2, generator=gen, dtype=torch.float64).to(qs)
    pq = torch.einsum("bhnd,hrd->bhrn", qt, rho)
    pk = torch.einsum("bhnd,hrd->bhrn", kt, rho)
    padded = -(-n // cluster_size) * cluster_size
    if padded > n:
        fill = torch.full((B, H, n_hashes, padded - n), float("inf"), dtype=qs.dtype, device=qs.device)
        pq, pk = torch.cat([pq, fill], -1), torch.cat([pk, fill], -1)
    return pq.argsort(dim=-1, stable=True), pk.argsort(dim=-1, stable=True), padded


def _cluster_ids(perm: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Cluster id (B, H, R, n') of every position, from its rank in each round's order."""
    ranks = torch.empty_like(perm)
    ranks.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return ranks // cluster_size


def _pairs(qs, ks, n, n_hashes, cluster_size, seed, causal):
    """Per round and cluster: query/key positions, visibility and the 1/count de-duplication."""
    perm_q, perm_k, padded = lsh_clusters(qs, ks, n_hashes=n_hashes, cluster_size=cluster_size, seed=seed)
    B, H, R = perm_q.shape[:3]
    nc = padded // cluster_size
    pq = perm_q.reshape(B, H, R, nc, cluster_size)
    pk = perm_k.reshape(B, H, R, nc, cluster_size)
    vis = (pq < n)[..., :, None] & (pk < n)[..., None, :]
    if causal:
        vis &= pk[..., None, :] <= pq[..., :, None]
    cq, ck = _cluster_ids(perm_q, cluster_size), _cluster_ids(perm_k, cluster_size)  # (B, H, R', n')
    count = torch.zeros(vis.shape, dtype=qs.dtype, device=qs.device)
    for r in range(R):  # rounds r' in which the pair (i, j) of round r's cluster meets again
        a = cq[:, :, r].gather(-1, pq.reshape(B, H, -1)).reshape(pq.shape)
        b = ck[:, :, r].gather(-1, pk.reshape(B, H, -1)).reshape(pk.shape)
        count += (a[..., :, None] == b[..., None, :]).to(qs.dtype)
    return pq, pk, vis, count.clamp_min(1.0), padded


def _gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, H, n', c) at positions pos (B, H, R, nc, C) -> (B, H, R, nc, C, c)."""
    B, H = pos.shape[:2]
    idx = pos.reshape(B, H, -1, 1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, idx).reshape(*pos.shape, x.shape[-1])


def _scatter_sum(vals: torch.Tensor, pos: torch.Tensor, padded: int) -> torch.Tensor:
    """Sum vals (B, H, R, nc, C, c) into query positions -> (B, H, n', c)."""
    B, H = pos.shape[:2]
    c = vals.shape[-1]
    out = torch.zeros(B, H, padded, c, dtype=vals.dtype, device=vals.device)
    return out.scatter_add_(2, pos.reshape(B, H, -1, 1).expand(-1, -1, -1, c), vals.reshape(B, H, -1, c))


def lsh_support(q: torch.Tensor, k: torch.Tensor, *, n_hashes: int, cluster_size: int,
                scaling: float | None = None, causal: bool = False, seed: Seed = 0) -> torch.Tensor:
    """Dense (B, H, n, n) bool support of the LSH clustering (for tests and plots; O(n^2))."""
    _check_qkv(q, k, k)
    dt = _compute_dtype(q)
    tau = scaling if scaling is not None else q.shape[-1] ** -0.5
    qs, ks = q.to(dt) * math.sqrt(tau), k.to(dt) * math.sqrt(tau)
    n = q.shape[-2]
    pq, pk, vis, _, padded = _pairs(qs, ks, n, n_hashes, cluster_size, seed, causal)
    B, H = q.shape[:2]
    rows = pq[..., :, None].expand(vis.shape).reshape(B, H, -1)
    cols = pk[..., None, :].expand(vis.shape).reshape(B, H, -1)
    S = torch.zeros(B, H, padded * padded, dtype=torch.uint8, device=q.device)
    S.scatter_reduce_(2, rows * padded + cols, vis.reshape(B, H, -1).to(torch.uint8), reduce="amax")
    return S.reshape(B, H, padded, padded)[:, :, :n, :n].bool()


def lsh_scatterbrain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    omega: torch.Tensor | None,
    n_hashes: int = 2,
    cluster_size: int = 64,
    scaling: float | None = None,
    causal: bool = True,
    seed: Seed = 0,
    lowrank_chunk: int = 128,
) -> torch.Tensor:
    """Scatterbrain attention whose sparse part is the LSH clustering (n == m); shapes as
    `scatterbrain_attention`. omega=None gives LSH-only (Reformer/SMYRF-like) attention."""
    _check_qkv(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("lsh_scatterbrain_attention needs as many queries as keys (no decoding cache)")
    dt = _compute_dtype(q)
    tau = scaling if scaling is not None else q.shape[-1] ** -0.5
    B, H, n, _ = q.shape
    qs, ks, vv = q.to(dt) * math.sqrt(tau), k.to(dt) * math.sqrt(tau), v.to(dt)
    v1 = torch.cat([vv, torch.ones_like(vv[..., :1])], dim=-1)
    pq, pk, vis, count, padded = _pairs(qs, ks, n, n_hashes, cluster_size, seed, causal)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, padded - n))

    logits = (_gather(pad(qs), pq) @ _gather(pad(ks), pk).mT).masked_fill(~vis, float("-inf"))
    mx = torch.full((B, H, padded), float("-inf"), dtype=dt, device=q.device)
    mx.scatter_reduce_(2, pq.reshape(B, H, -1), logits.amax(-1).reshape(B, H, -1), reduce="amax")
    mx = mx[:, :, :n]
    if omega is not None:
        fq, fk, kappa = stabilised_features(qs, ks, omega)
        c = torch.maximum(mx, kappa)
    else:
        c = mx
    c_pos = _gather(pad(c.unsqueeze(-1)).nan_to_num(0.0, neginf=0.0), pq)  # (…, C, 1)
    ex = (logits - c_pos).exp() / count
    v1c = _gather(pad(v1), pk)
    exact = _scatter_sum(ex @ v1c, pq, padded)[:, :, :n]
    if omega is None:
        return exact[..., :-1] / exact[..., -1:].clamp_min(torch.finfo(dt).tiny)
    lr = _lowrank_terms(fq, fk, v1, causal, lowrank_chunk)
    lr_pairs = (_gather(pad(fq), pq) @ _gather(pad(fk), pk).mT) * vis / count
    lr_s = _scatter_sum(lr_pairs @ v1c, pq, padded)[:, :, :n]
    return combine(exact, lr, lr_s, kappa, c)
