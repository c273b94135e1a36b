"""Tiny models for the compress tests, built from configs (no downloads).

A module of its own, not conftest: several test folders have a conftest.py and a plain
`from conftest import` picks whichever was imported first.
"""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()

