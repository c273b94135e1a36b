"""Scatterbrain attention (Chen et al., NeurIPS 2021): limits, the double-counting correction, unbiasedness,
the mixed regime, and the transformers drop-in."""

from __future__ import annotations

import pytest
import torch

from rankwise.attention import (
    ScatterbrainConfig,
    exact_attention,
    local_support,
    lsh_scatterbrain_attention,
    lsh_support,
    orthogonal_gaussian,
    scatterbrain_attention,
    scatterbrain_dense,
    use_scatterbrain,
)
from rankwise.attention.features import log_features


def _qkv(B=2, H=3, n=37, d=16, e=8, scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, n, d, generator=g, dtype=dtype) * scale for _ in range(2))
    return q, k, torch.randn(B, H, n, e, generator=g, dtype=dtype)


def _smooth_qkv(n=128, d=16, temp=1.0, rho=0.9, seed=1):
    """Tokens on an AR(1) path: near tokens similar (mass near the diagonal), far mass spread out."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.empty_like(z)
    x[0] = z[0]
    for i in range(1, n):
        x[i] = rho * x[i - 1] + (1 - rho**2) ** 0.5 * z[i]
    q = (x * temp).view(1, 1, n, d)
    return q, q.clone(), torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("causal, window", [(True, 37), (True, 100), (False, 73)])
def test_full_support_is_exact_attention(causal, window):
    # Card test 1: all pairs in S -> exact softmax attention; a centred window needs w >= 2n - 1.
    q, k, v = (t.float() for t in _qkv())
    omega = orthogonal_gaussian(16, 16, heads=3)
    ref = exact_attention(q, k, v, causal=causal)
    out = scatterbrain_attention(q, k, v, omega=omega, window=window, causal=causal)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    lsh = lsh_scatterbrain_attention(q, k, v, omega=omega, n_hashes=2, cluster_size=64, causal=causal)
    assert torch.allclose(lsh, ref, rtol=1e-5, atol=1e-5)  # one bucket holds every pair
    if not causal:  # w = n leaves out far pairs of a centred window: no longer exact
        assert not torch.allclose(scatterbrain_attention(q, k, v, omega=omega, window=37, causal=False), ref, atol=1e-3)


def test_empty_support_is_performer():
    # Card test 2: S empty -> Performer with the same features: phi(Q) phi(K)^T V / phi(Q) phi(K)^T 1.
    q, k, v = _qkv(scale=0.5)
    omega = orthogonal_gaussian(24, 16, heads=3, dtype=torch.float64)
    tau = 16**-0.5
    fq = log_features(q * tau**0.5, omega).exp()
    fk = log_features(k * tau**0.5, omega).exp()
    A = (fq @ fk.mT).tril()
    ref = (A @ v) / A.sum(-1, keepdim=True)
    assert torch.allclose(scatterbrain_attention(q, k, v, omega=omega, window=0, causal=True, lowrank_chunk=5), ref,
                          rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window, global_tokens", [(1, 0), (5, 0), (8, 3), (16, 2)])
def test_blocked_local_equals_dense_reference(causal, window, global_tokens):
    q, k, v = _qkv()
    omega = orthogonal_gaussian(24, 16, heads=3, dtype=torch.float64, seed=1)
    support = local_support(37, 37, window, causal=causal) | (torch.arange(37) < global_tokens)[None, :]
    for om in (omega, None):  # Scatterbrain and sparse-only
        ref = scatterbrain_dense(q, k, v, support=support, omega=om, causal=causal)
        out = scatterbrain_attention(q, k, v, omega=om, window=window, causal=causal,
                                     global_tokens=global_tokens, lowrank_chunk=7)
        assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_hashes, cluster_size", [(1, 8), (3, 8), (2, 5)])
def test_lsh_counts_pairs_once(causal, n_hashes, cluster_size):
    # Card test 3 for LSH: a pair met in several rounds enters E_hat once, exactly (= the dense
    # reference built from the union of the buckets).
    q, k, v = _qkv()
    omega = orthogonal_gaussian(24, 16, heads=3, dtype=torch.float64)
    support = lsh_support(q, k, n_hashes=n_hashes, cluster_size=cluster_size, causal=causal, seed=1)
    for om in (omega, None):
        ref = scatterbrain_dense(q, k, v, support=support, omega=om, causal=causal)
        out = lsh_scatterbrain_attention(q, k, v, omega=om, n_hashes=n_hashes, cluster_size=cluster_size,
                                         causal=causal, seed=1)
        assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10)


def test_sparse_entries_exact_and_estimator_unbiased():
    # Card test 3: on S, E_hat = exp(tau q^T k) exactly; off S it is the Performer estimate, and the
    # mean over feature draws converges to E (unbiased). Tame logits keep the variance small.
    q, k, v = _qkv(B=1, H=1, n=12, d=8, scale=0.6)
    support = local_support(12, 12, 3, causal=False)
    E = (q @ k.mT * 8**-0.5).exp()
    draws = []
    for seed in range(4000):
        omega = orthogonal_gaussian(8, 8, seed=seed, dtype=torch.float64)
        draws.append(scatterbrain_dense(q, k, v, support=support, omega=omega, return_matrix=True))
    assert torch.allclose(draws[0][..., support], E[..., support], rtol=1e-14, atol=0)
    stack = torch.stack(draws)
    se = stack.std(0) / len(draws) ** 0.5
    z = ((stack.mean(0) - E) / se.clamp_min(1e-300))[..., ~support]
    assert float(z.abs().max()) < 5  # every off-support entry within 5 standard errors of E
    single = float(((draws[0] - E) / E).abs().max())
    assert single > 0.1  # one draw is far from E off S: the agreement above comes from averaging


def test_scatterbrain_beats_both_parts_in_the_mixed_regime():
    # Card test 4: with the same window and features, averaged over 20 draws, Scatterbrain's error is
    # below sparse-only (the window alone) and Performer-only (the features alone).
    q, k, v = _smooth_qkv(temp=1.0)
    ref = exact_attention(q, k, v, causal=True)
    errs = {"scatterbrain": 0.0, "sparse": 0.0, "performer": 0.0}
    for seed in range(20):
        omega = orthogonal_gaussian(32, 16, heads=1, seed=seed, dtype=torch.float64)
        errs["scatterbrain"] += float((scatterbrain_attention(q, k, v, omega=omega, window=16) - ref).norm())
        errs["sparse"] += float((scatterbrain_attention(q, k, v, omega=None, window=16) - ref).norm())
        errs["performer"] += float((scatterbrain_attention(q, k, v, omega=omega, window=0) - ref).norm())
    assert errs["scatterbrain"] < 0.8 * min(errs["sparse"], errs["performer"])


def test_orthogonal_features_rows():
    omega = orthogonal_gaussian(40, 16, seed=3, dtype=torch.float64)
    block = omega[:16]
    gram = block @ block.T
    assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros(16, 16, dtype=torch.float64), atol=1e-10)
    norms = orthogonal_gaussian(4000, 16, seed=4, dtype=torch.float64).square().sum(1)
    assert abs(float(norms.mean()) - 16) < 0.5 and abs(float(norms.var()) - 32) < 4  # chi^2_16 row norms


def test_errors_are_clear():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="nothing to attend"):
        scatterbrain_attention(q, k, v, omega=None, window=0)
    with pytest.raises(ValueError, match="batch, heads, length, dim"):
        scatterbrain_attention(q[0], k, v, omega=None, window=3)
    with pytest.raises(ValueError, match="as many queries as keys"):
        scatterbrain_attention(q[:, :, :5], k, v, omega=None, window=3)
    with pytest.raises(ValueError, match="sparse must be"):
        ScatterbrainConfig(sparse="bigbird")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_hf_drop_in_exact_limit_padding_cache_and_restore():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        with use_scatterbrain(model, ScatterbrainConfig(window=64, n_features=8)):
            assert model.config._attn_implementation == "scatterbrain"
            full = model(ids).logits
            mask = torch.ones_like(ids)
            mask[1, :5] = 0  # left padding -> the masked reference path
            padded = model(ids, attention_mask=mask).logits
            gen = model.generate(ids[:1, :10], max_new_tokens=4, do_sample=False)
        with use_scatterbrain(model, ScatterbrainConfig(window=4, n_features=8)):
            approx = model(ids).logits
        assert torch.allclose(full, ref, atol=1e-4)
        assert torch.allclose(padded, model(ids, attention_mask=mask).logits, atol=1e-4)
        assert torch.equal(gen, model.generate(ids[:1, :10], max_new_tokens=4, do_sample=False))
        assert not torch.allclose(approx, ref, atol=1e-3)  # a real approximation when S is small
        assert model.config._attn_implementation != "scatterbrain"
        assert torch.equal(model(ids).logits, ref)  # restored
        assert not any("scatterbrain" in name for name in model.state_dict())
