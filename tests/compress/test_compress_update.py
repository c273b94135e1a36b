"""SVD-LLM's closed-form update and the block-by-block runner."""

from __future__ import annotations

import torch

from rankwise.compress.sequential import find_blocks, run_blockwise
from rankwise.compress.svd import SVDConfig, WhitenedSVD
from rankwise.compress.svd_llm import joint_factors, update_left_factor


def _data(m=16, n=24, N=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X_ref = torch.randn(N, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    X = X_ref + 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64)  # drifted inputs
    return W, X_ref, X


def _err(W, X_ref, X, B, A):
    return float((X_ref @ W.T - X @ (B @ A).T).pow(2).sum())


def test_update_never_increases_the_error_and_is_the_minimiser():
    W, X_ref, X = _data()
    layer = torch.nn.Linear(24, 16, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(W)
    c = WhitenedSVD(SVDConfig(whitener="cholesky"))
    c.observe("fc", layer, X_ref)  # step 1 fitted on the original inputs
    B0, A = c.factors("fc", layer, 6)
    for cross in (None, X_ref.T @ X):
        target = X if cross is None else X_ref
        B = update_left_factor(W, A, X.T @ X, cross=cross, ridge=0)
        assert _err(W, target, X, B, A) <= _err(W, target, X, B0, A)
        for _ in range(20):  # B is a stationary point: any perturbation is worse
            D = 1e-3 * torch.randn_like(B)
            assert _err(W, target, X, B + D, A) >= _err(W, target, X, B, A)


def test_update_is_a_no_op_when_the_gram_is_the_whitening_gram():
    W, _, X = _data()
    layer = torch.nn.Linear(24, 16, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(W)
    c = WhitenedSVD(SVDConfig(whitener="cholesky"))
    c.observe("fc", layer, X)
    B0, A = c.factors("fc", layer, 6)
    torch.testing.assert_close(update_left_factor(W, A, X.T @ X, ridge=0), B0, rtol=1e-7, atol=1e-9)


def test_joint_factors_are_optimal_for_the_original_target():
    W, X_ref, X = _data()
    B, A = joint_factors(W, 6, X.T @ X, cross=X_ref.T @ X)
    best = _err(W, X_ref, X, B, A)
    # lower than step 1 + step 2 and than any small perturbation
    layer = torch.nn.Linear(24, 16, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(W)
    c = WhitenedSVD(SVDConfig(whitener="cholesky"))
    c.observe("fc", layer, X_ref)
    _, A1 = c.factors("fc", layer, 6)
    B1 = update_left_factor(W, A1, X.T @ X, cross=X_ref.T @ X)
    assert best <= _err(W, X_ref, X, B1, A1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        Bp = B + 1e-3 * torch.randn(B.shape, generator=g, dtype=B.dtype)
        Ap = A + 1e-3 * torch.randn(A.shape, generator=g, dtype=A.dtype)
        assert _err(W, X_ref, X, Bp, Ap) >= best
    # without a reference it is plain whitened SVD on the current Gram
    c2 = WhitenedSVD(SVDConfig(whitener="cholesky"))
    c2.observe("fc", layer, X)
    B2, A2 = joint_factors(W, 6, X.T @ X)
    Bc, Ac = c2.factors("fc", layer, 6)
    torch.testing.assert_close(B2 @ A2, Bc @ Ac, rtol=1e-7, atol=1e-8)


def test_blockwise_grams_match_a_full_forward(llama, calib_ids):
    from rankwise.calibrate import capture_input_stats
    from rankwise.compress.api import find_targets

    targets = find_targets(llama)
    prefix, blocks = find_blocks(llama, targets)
    assert prefix == "model.layers" and len(blocks) == 2
    ref = capture_input_stats(llama, calib_ids, targets, stats=("gram",), progress=False)
    seen: dict[str, torch.Tensor] = {}

    def on_block(i, stats):
        for fqn, st in stats.items():
            seen[fqn] = st.gram
            torch.testing.assert_close(st.cross, st.gram, rtol=1e-5, atol=1e-4)  # nothing changed yet

    run_blockwise(llama, list(calib_ids.split(4)), targets, on_block, cross=True, progress=False)
    assert set(seen) == set(targets)
    for fqn in targets:
        torch.testing.assert_close(seen[fqn], ref[fqn].gram, rtol=1e-5, atol=1e-4)
