"""Tiny Llama configurations for pretraining from scratch with SmolLM2's tokenizer.

The models are `transformers.LlamaForCausalLM` built from a config (no download). Their
vocabulary is SmolLM2's, 49152 tokens, and, as in SmolLM2, the output head is tied to the input
embedding. Parameter counts follow SmolLM2's own convention ("135M" = every parameter, the tied
embedding counted once), so for a model of width d with L layers, MLP width f, h heads of size
d_h and h_kv key/value heads:

    embedding   V d                                     (shared with lm_head)
    per layer   2 d (h d_h) + 2 d (h_kv d_h)            q, o + k, v projections
              + 3 d f                                   gate, up, down
              + 2 d                                     two RMSNorm weights
    final norm  d
    total       V d + L (per layer) + d

| preset | d | layers | heads (kv) | f | embedding | non-embedding | total |
|---|---|---|---|---|---|---|---|
| llama-10m | 160 | 8 | 5 (5), d_h 32 | 448 | 7.86M | 2.54M | 10.41M |
| llama-25m | 320 | 8 | 5 (5), d_h 64 | 864 | 15.73M | 9.92M | 25.65M |

The embedding dominates at this scale (V = 49152 is large for d = 160), so the attention and MLP
projections that the low-rank methods replace hold 24 % (10m) and 39 % (25m) of the weights;
`parameter_breakdown` reports both parts and benchmarks should quote the non-embedding count
alongside the total. f is about 8/3 d rounded up to a multiple of 32 (the Llama rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LLAMA_PRESETS",
    "SMOLLM2_VOCAB_SIZE",
    "LlamaPreset",
    "build_llama",
    "llama_config",
    "parameter_breakdown",
]

SMOLLM2_VOCAB_SIZE = 49152


@dataclass(frozen=True)
class LlamaPreset:
    """The shape of a tiny Llama (see the module table)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


LLAMA_PRESETS: dict[str, LlamaPreset] = {
    "llama-10m": LlamaPreset(160, 8, 5, 5, 448),
    "llama-25m": LlamaPreset(320, 8, 5, 5, 864),
}


def llama_config(
    name: str,
    *,
    vocab_size: int = SMOLLM2_VOCAB_SIZE,
    max_position_embeddings: int = 1024,
    tokenizer: Any | None = None,
    **overrides: Any,
) -> Any:
    """A `transformers.LlamaConfig` for a preset ("llama-10m", "llama-25m").

    Args:
        name: preset name.
        vocab_size: 49152 (SmolLM2's tokenizer); ignored when `tokenizer` is given.
        max_position_embeddings: longest sequence (RoPE; no parameters depend on it).
        tokenizer: a Hugging Face tokenizer whose size and bos/eos/pad ids the config takes.
        **overrides: any LlamaConfig field (e.g. num_hidden_layers=2 for tests).
    """
    from transformers import LlamaConfig

    if name not in LLAMA_PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(LLAMA_PRESETS)}")
    preset = LLAMA_PRESETS[name]
    special: dict[str, Any] = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                special[key] = value
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        **special,
        **overrides,
    }
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(
            f"hidden_size {fields['hidden_size']} is not divisible by num_attention_heads "
            f"{fields['num_attention_heads']}: choose heads that divide it"
        )
    return LlamaConfig(**fields)


def build_llama(
    name_or_config: str | Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> nn.Module:
    """A freshly initialised LlamaForCausalLM (HF's init, std 0.02), seeded without touching the
    global RNG state."""
    from transformers import LlamaForCausalLM

    config = (
        llama_config(name_or_config, **overrides)
        if isinstance(name_or_config, str)
        else name_or_config
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def parameter_breakdown(config: Any) -> dict[str, int]:
    """Closed-form parameter counts of a Llama config (tied embedding counted once).

    Returns:
        {"embedding", "attention", "mlp", "norm", "lm_head", "non_embedding", "total"}.
    """
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    bias = 1 if getattr(config, "attention_bias", False) else 0
    attention = layers * (2 * d * heads * head_dim + 2 * d * kv * head_dim)
    attention += layers * bias * (2 * heads * head_dim + 2 * kv * head_dim)
    mlp = layers * 3 * d * f + (layers * (2 * f + d) if getattr(config, "mlp_bias", False) else 0)
    norm = layers * 2 * d + d
    embedding = config.vocab_size * d
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * d
    non_embedding = attention + mlp + norm
    return {
        "embedding": embedding,
        "attention": attention,
        "mlp": mlp,
        "norm": norm,
        "lm_head": lm_head,
        "non_embedding": non_embedding,
        "total": embedding + lm_head + non_embedding,
    }
