"""Tiny compressed Llamas (built from configs, no downloads) shared by the export tests."""

from __future__ import annotations

import torch

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def compressed(compensation_rank: int = 0):
    """svd-llm at 30 % of a tiny Llama (with a rank-2 EoRA path on every layer when asked)."""
    from rankwise.compress import compress_

    model = tiny_llama()
    calib = torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(7))
    compress_(model, "svd-llm", 0.3, calibration=calib, compensation_rank=compensation_rank,
              progress=False)
    return model
