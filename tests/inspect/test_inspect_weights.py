"""rankwise.inspect on tiny models: per-matrix metrics, update rank, representations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.inspect import analyze_weights, compare_weights, inspect_model, quick_table_data
from rankwise.inspect.representations import hidden_states, representation_metrics
from rankwise.inspect.weights import short_kinds, split_name, weight_matrices
from rankwise.linalg import spectral


def tiny_llama(seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """Bytes as token ids: enough to run a tiny model on text."""

    def __call__(self, text, return_tensors=None, truncation=True, max_length=64):
        ids = torch.tensor([[b % 128 for b in text.encode()[:max_length]]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_split_name():
    assert split_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert split_name("encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert split_name("model.embed_tokens") == (None, "model.embed_tokens")


def test_short_kinds_are_unique_suffixes():
    bert = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert short_kinds(bert) == ["query", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert short_kinds(["self_attn.q_proj", "mlp.down_proj"]) == ["q_proj", "down_proj"]


def test_weight_matrices_of_a_tied_llama():
    mats = weight_matrices(tiny_llama())
    # 7 linears per block x 2 blocks + the embedding; the tied lm_head is not listed twice
    assert len(mats) == 15
    assert "model.embed_tokens" in mats and not any("lm_head" in k for k in mats)
    assert mats["model.layers.0.mlp.down_proj"].shape == (32, 64)  # (out, in)


def test_row_metrics_equal_the_spectral_functions():
    model = tiny_llama()
    result = analyze_weights(model, progress=False)
    W = model.model.layers[1].mlp.up_proj.weight.detach()
    row = next(r for r in result.rows if r["name"] == "model.layers.1.mlp.up_proj")
    S = torch.linalg.svdvals(W.double())
    assert row["shape"] == [64, 32] and row["block"] == 1 and row["kind"] == "mlp.up_proj"
    assert row["erank"] == pytest.approx(spectral.effective_rank(S), rel=1e-5)
    assert row["stable_rank"] == pytest.approx(spectral.stable_rank(S), rel=1e-5)
    assert row["energy99"] == spectral.energy_rank(S, 0.99)
    assert row["frobenius"] == pytest.approx(float(W.double().norm()), rel=1e-5)
    assert row["welore"] in ("LRC", "N-LRC") and result.welore_tau is not None
    assert "farms_alpha" in row and "alpha" in row


def test_welore_classes_separate_low_rank_from_flat_matrices():
    g = torch.Generator().manual_seed(0)
    mats = {}
    for i in range(4):  # heavy-tailed (low-rank-like) and flat (orthogonal-like) matrices
        U = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
        V = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
        mats[f"layers.{i}.low"] = U @ torch.diag(torch.logspace(0, -4, 64)) @ V.T
        mats[f"layers.{i}.flat"] = U @ torch.diag(torch.linspace(1.0, 0.8, 64)) @ V.T
    result = analyze_weights(mats, progress=False, welore_reduction=0.4)
    classes = {r["name"]: r["welore"] for r in result.rows}
    assert all(classes[f"layers.{i}.low"] == "LRC" for i in range(4))
    assert all(classes[f"layers.{i}.flat"] == "N-LRC" for i in range(4))


def test_quick_mode_skips_alpha_and_gives_a_layer_grid():
    result = analyze_weights(tiny_llama(layers=3), quick=True, progress=False)
    assert "alpha" not in result.rows[0] and result.welore_tau is None
    kinds, grid = quick_table_data(result)
    assert len(kinds) == 7 and [row[0] for row in grid] == [0, 1, 2]


@pytest.mark.parametrize("rank", [1, 3])
def test_update_rank_equals_the_planted_rank(rank):
    base = tiny_llama()
    tuned = tiny_llama()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():  # a merged rank-r update on every attention projection (fp32 storage)
        for name, p in tuned.named_parameters():
            if "self_attn" in name and p.ndim == 2:
                p += 0.05 * torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g)
    result = compare_weights(base, tuned, progress=False)
    by_name = {r["name"]: r for r in result.rows}
    for name, r in by_name.items():
        expected = rank if "self_attn" in name else 0
        assert r["update_rank"] == expected, name
    assert not result.only_in_first and not result.only_in_second


def test_compare_lists_mismatches_instead_of_failing():
    a = {"x": torch.randn(4, 5), "y": torch.randn(3, 3), "z": torch.randn(2, 2)}
    b = {"x": a["x"] + torch.outer(torch.randn(4), torch.randn(5)), "y": torch.randn(4, 3), "w": torch.randn(2, 2)}
    result = compare_weights(a, b, progress=False)
    assert [r["name"] for r in result.rows] == ["x"] and result.rows[0]["update_rank"] == 1
    assert result.shape_mismatch == ["y"] and result.only_in_first == ["z"] and result.only_in_second == ["w"]


def test_representation_metrics_on_a_tiny_model():
    model = tiny_llama()
    texts = ["def f(x):\n    return x * 2  # doubles " * 3, "class A:\n    pass\n" * 5, "short"]
    states = hidden_states(model, CharTokenizer(), texts, max_length=48, progress=False)
    assert len(states) == 2 and all(s.shape[1] == 32 for s in states)  # "short" < 8 tokens
    rep = representation_metrics(states)
    Z = torch.cat(states)
    assert rep["n_tokens"] == Z.shape[0] and rep["dim"] == 32
    assert rep["rankme"] == pytest.approx(spectral.rankme(Z), rel=1e-5)
    assert rep["mnn_per_token"] >= rep["nuclear_per_token"] * (1 - 1e-9)  # L = 48 >= d = 32
    result = inspect_model(model, tokenizer=CharTokenizer(), texts=texts, progress=False, max_length=48)
    assert result.representations["rankme"] == pytest.approx(rep["rankme"], rel=1e-6)


def test_large_matrices_take_the_randomized_path():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(120, 8, generator=g) @ torch.randn(8, 90, generator=g) + 0.01 * torch.randn(120, 90, generator=g)
    result = analyze_weights({"big": W}, max_exact=50, randomized_rank=20, progress=False)
    row = result.rows[0]
    assert row["exact"] is False and result.spectra["big"].numel() == 20
    S = torch.linalg.svdvals(W.double())
    # stable rank uses the exact Frobenius norm and the (accurate) top singular value
    assert row["stable_rank"] == pytest.approx(spectral.stable_rank(S), rel=1e-3)
    assert row["spectral_norm"] == pytest.approx(float(S[0]), rel=1e-4)
