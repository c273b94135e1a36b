"""Latency measurements: what each one times, and which models they apply to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.pipeline.measure import _first_token_kwargs, decode_latency_vs, latency_vs


def test_first_token_forward_is_the_prefill_of_generate(make_llama):
    """Time to first token runs the forward `generate` runs before its first token: KV cache on,
    only the last position's logits, equal to the full forward's last row."""
    model = make_llama(64).eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    kwargs = _first_token_kwargs(model)
    assert kwargs == {"use_cache": True, "logits_to_keep": 1}
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids, **kwargs)
    assert first.logits.shape == (1, 1, 64) and first.past_key_values is not None
    torch.testing.assert_close(first.logits[0, -1], full[0, -1])


def test_latencies_are_ratios_of_interleaved_medians_and_skip_plain_modules(make_llama):
    model, ref = make_llama(64).eval(), make_llama(64, seed=1).eval()
    for lat in (latency_vs(model, ref, tokens=16, repeats=3),
                latency_vs(model, ref, tokens=16, repeats=3, first_token=True)):
        assert lat["latency_vs_dense"] == pytest.approx(lat["latency_ms"] / lat["dense_ms"]) and lat["tokens"] == 16
    dec = decode_latency_vs(model, ref, prompt_tokens=8, steps=3, repeats=2)
    assert dec["latency_vs_dense"] == pytest.approx(dec["ms_per_token"] / dec["dense_ms_per_token"])
    plain = nn.Sequential(nn.Embedding(64, 8), nn.Linear(8, 64))
    assert latency_vs(plain, plain, tokens=4, repeats=1, vocab=64, first_token=True) is None
    assert decode_latency_vs(plain, plain) is None
