"""Scatterbrain: sparse + low-rank approximation of softmax attention (Chen, Dao et al., NeurIPS'21).

With tau the softmax temperature (1/sqrt(d)), E = exp(tau Q K^T) (n, m) and
exact attention O = (E V) / (E 1). Scatterbrain estimates E by
    E_hat = E_lr + [E - E_lr]_S,        E_lr = phi(Q) phi(K)^T   (Performer, features.py)
i.e. exact on a sparse support S (a local window, or LSH buckets: lsh.py) and low-rank elsewhere.
Subtracting E_lr on S is the correction that keeps the pairs of S from being counted twice. E_hat
is unbiased for E (S does not depend on the features), and
    E_hat V = phi(Q) (phi(K)^T V) + sum_{(i,j) in S} (exp(tau q_i^T k_j) - phi(q_i)^T phi(k_j)) v_j
(and the same with V -> 1 for the denominator) needs no n x m matrix: O(n M d + |S| (d + M)).

Limits (tests): S = all pairs -> exact softmax attention; S empty -> Performer; no features
(`omega=None`) -> sparse-only attention, softmax over S alone (the "sparse-only" baseline).

Numerics (fp32): a per-query shift c_i is applied to numerator and denominator alike (the output
is a ratio). Features are stabilised as exp(lq - a_i) and exp(lk - b) (a_i: the query's max log
feature, b: one max over all keys of a head), the low-rank scale is kappa_i = a_i + b - log M, and
c_i = max(kappa_i, max_{j in S_i} tau q_i^T k_j), so every exponential is <= 1. The low-rank
remainder of the denominator, sum_all phi phi - sum_S phi phi, is >= 0 in exact arithmetic and is
clamped at 0 against cancellation (the reference code clamps it before a log).

Layouts: q (B, H, n, d), k (B, H, m, d), v (B, H, m, e) -> out (B, H, n, e).
Causal: key j is visible to query i iff j <= i + (m - n) (the last query sees every key).
"""

from __future__ import annotations

import math

import torch

from rankwise.attention.features import log_features
from rankwise.linalg import compute_dtype

__all__ = [
    "combine",
    "exact_attention",
    "local_support",
    "scatterbrain_attention",
    "scatterbrain_dense",
    "stabilised_features",
]

_NEG = float("-inf")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return compute_dtype(x.dtype)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, heads, length, dim), got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}: transpose (B, n, H, d) inputs with .transpose(1, 2)"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and heads "
            "must match, k and v need the same length, q and k the same head dim (repeat GQA heads first)"
        )


def exact_attention(q, k, v, *, scaling: float | None = None, causal: bool = False,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention softmax(tau q k^T + mask) v materialising the (n, m) scores (reference)."""
    _check_qkv(q, k, v)
    tau = scaling if scaling is not None else q.shape[-1] ** -0.5
    dt = _compute_dtype(q)
    scores = tau * q.to(dt) @ k.to(dt).mT
    mask = _visible(q.shape[-2], k.shape[-2], causal, allowed, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, _NEG)
    return torch.softmax(scores, dim=-1) @ v.to(dt)


def _visible(n: int, m: int, causal: bool, allowed: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (…, n, m) visibility: causal with offset m - n, and/and an explicit mask."""
    mask = None
    if causal:
        i = torch.arange(n, device=device)[:, None] + (m - n)
        mask = torch.arange(m, device=device)[None, :] <= i
    if allowed is not None:
        mask = allowed if mask is None else mask & allowed
    return mask


def local_support(n: int, m: int, window: int, *, causal: bool = True, device=None) -> torch.Tensor:
    """Local-window support (n, m) bool. Causal: query i sees keys (i + m - n) - window < j <= i + m - n
    (its last `window` keys, itself included). Centred: -floor(w/2) <= j - i < ceil(w/2)."""
    i = torch.arange(n, device=device)[:, None] + (m - n)
    j = torch.arange(m, device=device)[None, :]
    if causal:
        return (j <= i) & (j > i - window)
    return (j - i >= -(window // 2)) & (j - i < (window + 1) // 2)


def scatterbrain_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    support: torch.Tensor,
    omega: torch.Tensor | None,
    scaling: float | None = None,
    causal: bool = False,
    allowed: torch.Tensor | None = None,
    return_matrix: bool = False,
) -> torch.Tensor:
    """Scatterbrain with an explicit (n, m) support, materialising E_hat (reference; small n only).

    Args:
        support: (n, m) or broadcastable bool; the pairs computed exactly.
        omega: (M, d) or (H, M, d) features; None -> sparse-only (softmax over the support).
        causal, allowed: which keys a query may see at all (pairs outside get weight 0).
        return_matrix: return the unnormalised E_hat (B, H, n, m) instead of the output (no
            stabilisation: for tests in fp64 on tame inputs).
    """
    _check_qkv(q, k, v)
    dt = _compute_dtype(q)
    tau = scaling if scaling is not None else q.shape[-1] ** -0.5
    qs, ks = q.to(dt) * math.sqrt(tau), k.to(dt) * math.sqrt(tau)
    logits = qs @ ks.mT  # (B, H, n, m)
    support = support.to(torch.bool)
    if omega is None:
        log_e = logits.masked_fill(~support, _NEG)
    else:
        M = omega.shape[-2]
        lq, lk = log_features(qs, omega.to(dt)), log_features(ks, omega.to(dt))
        log_lr = torch.logsumexp(lq.unsqueeze(-2) + lk.unsqueeze(-3), dim=-1) - math.log(M)
        log_e = torch.where(support, logits, log_lr)
    mask = _visible(q.shape[-2], k.shape[-2], causal, allowed, q.device)
    if mask is not None:
        log_e = log_e.masked_fill(~mask, _NEG)
    if return_matrix:
        return log_e.exp()
    return torch.softmax(log_e, dim=-1).nan_to_num(0.0) @ v.to(dt)


def _lowrank_terms(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor, causal: bool, chunk: int) -> torch.Tensor:
    """sum_j phi_i^T phi_j [v_j, 1] (B, H, n, e + 1) over all visible keys (stabilised features).

    Non-causal: phi(Q) (phi(K)^T V1). Causal (n == m): chunked prefix sums, O(n (C + e) M) time and
    O(n M e / C + n C) memory for chunk C: the state sum_{j < chunk} phi_j v_j^T comes from an
    exclusive cumsum over chunks, the current chunk from a masked C x C product.
    """
    if not causal:
        return fq @ (fk.mT @ v1)
    B, H, n, M = fq.shape
    C = max(1, min(chunk, n))
    pad = (-n) % C
    if pad:
        fq = torch.nn.functional.pad(fq, (0, 0, 0, pad))
        fk = torch.nn.functional.pad(fk, (0, 0, 0, pad))
        v1 = torch.nn.functional.pad(v1, (0, 0, 0, pad))
    nc = (n + pad) // C
    fq = fq.reshape(B, H, nc, C, M)
    fk = fk.reshape(B, H, nc, C, M)
    v1 = v1.reshape(B, H, nc, C, -1)
    kv = fk.mT @ v1  # (B, H, nc, M, e + 1)
    state = torch.cumsum(kv, dim=2) - kv  # exclusive prefix over chunks
    tri = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    intra = ((fq @ fk.mT) * tri) @ v1
    out = fq @ state + intra
    return out.reshape(B, H, nc * C, -1)[:, :, :n]


def _band_blocks(n: int, window: int, causal: bool, global_tokens: int, device):
    """Key positions (nb, K) and visibility (nb, bs, K) of the blocked local window (+ global keys)."""
    bs = max(1, min(window, n))
    nb = -(-n // bs)
    offsets = (-1, 0) if causal else (-1, 0, 1)
    base = torch.arange(nb, device=device)[:, None] * bs
    keys = torch.cat([base + o * bs + torch.arange(bs, device=device)[None, :] for o in offsets], dim=1)
    qpos = base + torch.arange(bs, device=device)[None, :]  # (nb, bs)
    rel = keys[:, None, :] - qpos[:, :, None]  # (nb, bs, K)
    valid = (keys >= 0) & (keys < n)
    if causal:
        band = (rel <= 0) & (rel > -window)
    else:
        band = (rel >= -(window // 2)) & (rel < (window + 1) // 2)
    vis = band & valid[:, None, :] & (qpos < n)[:, :, None]
    g = min(global_tokens, n)
    if g > 0:  # global keys 0..g-1 for every query, unless the window already holds them
        gk = torch.arange(g, device=device)
        grel = gk[None, None, :] - qpos[:, :, None]
        inband = (grel <= 0) & (grel > -window) if causal else \
            (grel >= -(window // 2)) & (grel < (window + 1) // 2)
        gvis = ~inband & (qpos < n)[:, :, None]
        if causal:
            gvis &= grel <= 0
        keys = torch.cat([keys, gk[None, :].expand(nb, g)], dim=1)
        vis = torch.cat([vis, gvis], dim=2)
    return bs, nb, keys.clamp(0, n - 1), vis


def scatterbrain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    omega: torch.Tensor | None,
    window: int,
    scaling: float | None = None,
    causal: bool = True,
    global_tokens: int = 0,
    lowrank_chunk: int = 128,
) -> torch.Tensor:
    """Scatterbrain attention with a local-window sparse part, in O(n) memory (n == m).

    Args:
        q, k, v: (B, H, n, d), (B, H, n, d), (B, H, n, e); GQA heads already repeated.
        omega: Performer features (M, d) or (H, M, d) (features.orthogonal_gaussian); None for
            sparse-only attention.
        window: keys per query computed exactly (causal: the last `window` keys incl. itself;
            else a centred window); 0 for Performer alone. window >= n (causal) / 2n - 1
            (centred) makes the result exact softmax attention.
        scaling: tau (default d^-1/2).
        causal: decoder attention.
        global_tokens: the first g keys are also in the support of every query (attention
            sinks; the support stays independent of the features, so still unbiased).
        lowrank_chunk: chunk length of the causal low-rank prefix sums.

    Returns:
        (B, H, n, e) in the compute dtype (fp32, or fp64 for fp64 input).
    """
    _check_qkv(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"scatterbrain_attention needs as many queries as keys (got {q.shape[-2]} and {k.shape[-2]}): "
            "use scatterbrain_dense with an explicit support for decoding with a cache"
        )
    if window < 0 or global_tokens < 0:
        raise ValueError(f"window and global_tokens must be >= 0, got {window} and {global_tokens}")
    if omega is None and window == 0 and global_tokens == 0:
        raise ValueError("nothing to attend with: give features (omega), a window > 0, or global tokens")
    dt = _compute_dtype(q)
    tau = scaling if scaling is not None else q.shape[-1] ** -0.5
    B, H, n, d = q.shape
    qs, ks, vv = q.to(dt) * math.sqrt(tau), k.to(dt) * math.sqrt(tau), v.to(dt)
    v1 = torch.cat([vv, torch.ones_like(vv[..., :1])], dim=-1)  # (B, H, n, e + 1)

    if omega is not None:
        fq, fk, kappa = stabilised_features(qs, ks, omega)
        lr = _lowrank_terms(fq, fk, v1, causal, lowrank_chunk)  # (B, H, n, e + 1), scale e^kappa

    if window == 0 and global_tokens == 0:
        return lr[..., :-1] / lr[..., -1:].clamp_min(torch.finfo(dt).tiny)

    bs, nb, keys, vis = _band_blocks(n, max(window, 0), causal, global_tokens, q.device)
    pad = nb * bs - n

    def blocks(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(B, H, nb, bs, x.shape[-1])

    flat = keys.reshape(-1)
    K = keys.shape[1]

    def gather(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, flat].reshape(B, H, nb, K, x.shape[-1])

    logits = blocks(qs) @ gather(ks).mT  # (B, H, nb, bs, K)
    logits = logits.masked_fill(~vis, _NEG)
    mx = logits.amax(-1)  # (B, H, nb, bs); -inf where a query's support is empty
    mx = mx.reshape(B, H, nb * bs)[:, :, :n]
    c = mx if omega is None else torch.maximum(mx, kappa)
    c_blk = torch.nn.functional.pad(c, (0, pad)).reshape(B, H, nb, bs, 1)
    ex = (logits - c_blk.nan_to_num(0.0, neginf=0.0)).exp()  # masked entries: exp(-inf) = 0
    exact = (ex @ gather(v1)).reshape(B, H, nb * bs, -1)[:, :, :n]  # (B, H, n, e + 1)
    if omega is None:
        return exact[..., :-1] / exact[..., -1:].clamp_min(torch.finfo(dt).tiny)

    lr_s = ((blocks(fq) @ gather(fk).mT) * vis) @ gather(v1)  # low-rank estimate on S
    lr_s = lr_s.reshape(B, H, nb * bs, -1)[:, :, :n]
    return combine(exact, lr, lr_s, kappa, c)


def stabilised_features(qs: torch.Tensor, ks: torch.Tensor, omega: torch.Tensor):
    """exp(lq - a), exp(lk - b) and the log scale kappa = a + b - log M (module docstring).

    Args: qs, ks (B, H, n|m, d) already scaled by sqrt(tau); omega (M, d) or (H, M, d).
    Returns: fq (B, H, n, M), fk (B, H, m, M), kappa (B, H, n).
    """
    omega = omega.to(qs.dtype)
    lq, lk = log_features(qs, omega), log_features(ks, omega)
    a = lq.amax(-1, keepdim=True)  # (B, H, n, 1)
    b = lk.amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
    return (lq - a).exp(), (lk - b).exp(), (a + b).squeeze(-1) - math.log(omega.shape[-2])


def combine(exact: torch.Tensor, lr: torch.Tensor, lr_s: torch.Tensor, kappa: torch.Tensor,
            c: torch.Tensor) -> torch.Tensor:
    """Output of E_hat = E_lr + [E - E_lr]_S from its per-query sums, each [numerator, denominator].

    exact: sum_S exp(logit - c) [v, 1]; lr, lr_s: sum over all visible keys / over S of
    phi_i^T phi_j [v, 1] at scale exp(kappa); all (B, H, n, e + 1). Returns (B, H, n, e).
    """
    rest = lr - lr_s
    rest = torch.cat([rest[..., :-1], rest[..., -1:].clamp_min(0.0)], dim=-1)
    total = exact + (kappa - c).exp().unsqueeze(-1) * rest
    return total[..., :-1] / total[..., -1:].clamp_min(torch.finfo(total.dtype).tiny)
