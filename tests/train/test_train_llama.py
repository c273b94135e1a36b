"""Tiny Llama presets: sizes as documented, closed-form counts equal the built model's."""

from __future__ import annotations

import pytest
import torch

from rankwise.train.llama import LLAMA_PRESETS, build_llama, llama_config, parameter_breakdown


@pytest.mark.parametrize(
    ("name", "total", "non_embedding"),
    [("llama-10m", 10.41e6, 2.54e6), ("llama-25m", 25.65e6, 9.92e6)],
)
def test_presets_hit_their_sizes(name, total, non_embedding):
    counts = parameter_breakdown(llama_config(name))
    assert counts["total"] == pytest.approx(total, rel=0.005)
    assert counts["non_embedding"] == pytest.approx(non_embedding, rel=0.005)
    assert counts["embedding"] == 49152 * LLAMA_PRESETS[name].hidden_size and counts["lm_head"] == 0


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_word_embeddings": False, "num_key_value_heads": 1}]
)
def test_closed_form_count_equals_the_built_model(overrides):
    cfg = llama_config("llama-10m", vocab_size=512, num_hidden_layers=2, **overrides)
    model = build_llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == parameter_breakdown(cfg)["total"]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == cfg.tie_word_embeddings


def test_build_is_seeded_without_touching_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_llama("llama-10m", vocab_size=256, num_hidden_layers=1, seed=7)
    assert torch.equal(torch.rand(1), expected)
    b = build_llama("llama-10m", vocab_size=256, num_hidden_layers=1, seed=7)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    out = a(torch.randint(0, 256, (2, 6)), labels=torch.randint(0, 256, (2, 6)))
    assert out.logits.shape == (2, 6, 256) and torch.isfinite(out.loss)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="unknown model preset 'llama-1b'"):
        llama_config("llama-1b")
    with pytest.raises(ValueError, match="not divisible"):
        llama_config("llama-10m", num_attention_heads=3)
