"""Tiny Llama / BERT models built from configs for the compress tests (no downloads)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def calib_ids():
    return torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(7))
