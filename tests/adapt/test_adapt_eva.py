"""EVA (Paischer et al., arXiv 2410.07170): A = top right-singular vectors of the centred
activations (checked against a direct SVD), ranks redistributed by explained variance, scale α/r,
save/load with data-chosen ranks (rank 0 included).

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import assert_merge_roundtrip, assert_save_load_equal, layers_model
from torch import nn

from rankwise import adapt, linalg

SHAPES = {"a": (10, 12), "b": (8, 6), "c": (9, 8)}


class Parallel(nn.ModuleDict):
    """Each named layer reads its own input: model(a=..., b=...) -> {name: output}."""

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: self[n](x) for n, x in inputs.items()}


def parallel(shapes=SHAPES) -> Parallel:
    model = Parallel(dict(layers_model(shapes).items()))
    return model.eval()


def spectra_data(n_batches: int = 4, tokens: int = 64, seed: int = 0, scales=None):
    """Token batches (batch, seq, in) with distinct input spectra per layer and a mean offset
    (`scales`: per layer, the standard deviations along its principal axes)."""
    g = torch.Generator().manual_seed(seed)
    decay = {"a": 0.5, "b": 0.9, "c": 0.2}  # eigen-spectrum ratios: b is flattest, c steepest
    if scales is None:
        scales = {n: decay[n] ** torch.arange(i, dtype=torch.float64) * 3
                  for n, (_, i) in SHAPES.items()}
    mix = {n: linalg.orthonormalize(torch.randn(i, i, generator=g, dtype=torch.float64))
           for n, (_, i) in SHAPES.items()}
    batches = []
    for _ in range(n_batches):
        batch = {}
        for n, (_, i) in SHAPES.items():
            z = torch.randn(2, tokens // 2, i, generator=g, dtype=torch.float64) * scales[n]
            batch[n] = z @ mix[n].T + 0.7
        batches.append(batch)
    return batches


def stacked(batches, name: str) -> torch.Tensor:
    return torch.cat([b[name].reshape(-1, b[name].shape[-1]) for b in batches])


def direct_pca(batches, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Vh, S) of the centred activation matrix by a direct SVD (the reference)."""
    X = stacked(batches, name)
    _, S, Vh = linalg.svd(X - X.mean(0))
    return Vh, S


def adapted(data, rank: int = 2, **kw) -> Parallel:
    model = parallel()
    adapt.adapt_(model, "eva", rank=rank, target_modules=list(SHAPES), data=data, **kw)
    return model


def test_a_rows_are_the_top_right_singular_vectors_of_the_centred_activations():
    data = spectra_data()
    model = adapted(data, rank=2, rho=2.0)
    for name in SHAPES:
        A = model[name].adapter.A.detach()
        Vh, _ = direct_pca(data, name)
        k = A.shape[0]
        assert k >= 1
        ref = Vh[:k] * torch.sign(Vh[:k].gather(1, Vh[:k].abs().argmax(1, keepdim=True)))
        torch.testing.assert_close(A, ref, rtol=0, atol=1e-9)
        torch.testing.assert_close(A @ A.T, torch.eye(k, dtype=A.dtype), rtol=0, atol=1e-10)
        assert torch.count_nonzero(model[name].adapter.B) == 0


def test_ranks_follow_the_pooled_explained_variance_ratios():
    data = spectra_data()
    r, rho = 2, 2.0
    model = adapted(data, rank=r, rho=rho)
    ranks = {n: model[n].adapter.A.shape[0] for n in SHAPES}
    assert sum(ranks.values()) == r * len(SHAPES)
    # reference: each layer offers round(r·ρ) = 4 ratios S_i² / ‖X_c‖_F²; keep the top 6
    pooled = []
    for n in SHAPES:
        _, S = direct_pca(data, n)
        pooled += [(float(v), n) for v in (S.square() / S.square().sum())[:4]]
    pooled.sort(reverse=True)
    expected = {n: sum(1 for _, m in pooled[: r * len(SHAPES)] if m == n) for n in SHAPES}
    assert ranks == expected
    # ratios are relative to each layer's own variance: the flat spectrum (b) keeps explaining
    # variance further down, the steep one (c) is done after its first component
    assert ranks["b"] > ranks["c"] >= 1
    assert adapt.trainable_parameter_count(model) == sum(
        ranks[n] * (o + i) for n, (o, i) in SHAPES.items())


def test_scaling_factors_and_whitening():
    data = spectra_data()
    model = adapted(data, rank=2, alpha=6.0)
    for layer in model.values():  # α_l / rank_l = α / r
        assert layer.adapter.scale == pytest.approx(6.0 / 2)
    plain = adapted(data, rank=2, alpha=6.0, adjust_scaling_factors=False)
    for layer in plain.values():
        assert layer.adapter.scale == pytest.approx(6.0 / layer.adapter.A.shape[0])
    white = adapted(data, rank=2, whiten=True)
    for name in SHAPES:
        A, k = white[name].adapter.A.detach(), white[name].adapter.A.shape[0]
        _, S = direct_pca(data, name)
        torch.testing.assert_close(A * S[:k].sqrt()[:, None], model[name].adapter.A.detach(),
                                   rtol=1e-9, atol=1e-12)


def test_known_covariance_gives_its_top_eigenvectors():
    g = torch.Generator().manual_seed(4)
    Q = linalg.orthonormalize(torch.randn(6, 6, generator=g, dtype=torch.float64))
    lam = torch.tensor([9.0, 4.0, 1.0, 0.1, 0.05, 0.01], dtype=torch.float64)
    x = (torch.randn(1, 20000, 6, generator=g, dtype=torch.float64) * lam.sqrt()) @ Q.T - 2.0
    model = Parallel({"m": layers_model({"m": (5, 6)})["m"]})
    adapt.adapt_(model, "eva", rank=2, rho=1.0, target_modules=["m"], data=[{"m": x}])
    A = model["m"].adapter.A.detach()
    top = Q[:, :2]
    torch.testing.assert_close(A.T @ A, top @ top.T, rtol=0, atol=0.02)  # same projector


def test_a_layer_with_low_explained_variance_gets_rank_zero(tmp_path, perturb):
    two_axes = {"b": torch.tensor([1.0, 1.0, 1e-3, 1e-3, 1e-3, 1e-3], dtype=torch.float64),
                "c": torch.tensor([1.0, 1.0] + [1e-3] * 6, dtype=torch.float64)}
    # a: isotropic in 12 dims (ratios ≈ 1/12); b, c: two axes each (ratios ≈ 1/2, 1/2)
    data = spectra_data(scales={"a": torch.ones(12, dtype=torch.float64), **two_axes})
    model = adapted(data, rank=1, rho=2.0)
    assert model["a"].adapter.A.shape == (0, 12)
    assert model["b"].adapter.A.shape[0] + model["c"].adapter.A.shape[0] == 3
    perturb(model)
    xs = {n: stacked(data[:1], n)[:5] for n in SHAPES}
    base = parallel()
    torch.testing.assert_close(model["a"](xs["a"]), base["a"](xs["a"]), rtol=0, atol=0)
    assert_merge_roundtrip(model, xs)
    loaded = assert_save_load_equal(model, parallel(), xs, tmp_path)  # empty tensors round-trip
    assert loaded["a"].adapter.A.shape == (0, 12)


def test_bad_input():
    with pytest.raises(ValueError, match="initialises from input activations: pass data"):
        adapt.adapt_(parallel(), "eva", rank=2, target_modules=list(SHAPES))
    with pytest.raises(ValueError, match="rho must be"):
        adapted(spectra_data(1), rho=0.5)


def test_llama_layers_reading_one_input_share_their_components(make_llama):
    model = make_llama()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    adapt.adapt_(model, "eva", rank=2, target_modules=targets, data=ids)
    layers = adapt.adapter_layers(model)
    assert len(layers) == 8 and sum(la.adapter.A.shape[0] for la in layers.values()) == 16
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-6, atol=1e-6)
    for block in model.model.layers:  # q, k, v read the same normed hidden states
        attn = block.self_attn
        As = [getattr(attn, f"{p}_proj").adapter.A.detach() for p in "qkv"]
        k = min(a.shape[0] for a in As)
        assert k >= 1
        for a in As[1:]:
            torch.testing.assert_close(a[:k], As[0][:k], rtol=0, atol=0)


def test_precomputed_stats_must_cover_every_target():
    from rankwise import calibrate

    data, model = spectra_data(1), parallel()
    stats = calibrate.capture_input_stats(model, data, {"a": model["a"]},
                                          stats=("gram", "mean"), progress=False)
    with pytest.raises(ValueError, match=r"no input activations for \['b', 'c'\]"):
        adapt.adapt_(model, "eva", rank=2, target_modules=list(SHAPES), input_stats=stats)
