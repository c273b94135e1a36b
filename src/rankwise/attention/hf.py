"""Scatterbrain as a drop-in attention implementation for Hugging Face Llama-family models.

transformers 5.x looks attention up by name in `AttentionInterface` (the function receives the
attention module, q (B, H, n, d) after RoPE, k/v (B, H_kv, m, d), the mask and `scaling`, and
returns (B, n, H, d) plus optional weights); `config._attn_implementation` picks the name. We
register "scatterbrain" there and the same name in `AttentionMaskInterface` with sdpa's mask
builder, so the model passes None for a plain causal mask (the fast O(n) path) and a boolean
(B, 1, n, m) mask when there is padding or a cache offset (then the exact-support reference path
`scatterbrain_dense` runs, O(n m) memory, which decoding steps with n = 1 can afford).

    from rankwise.attention import ScatterbrainConfig, use_scatterbrain
    with use_scatterbrain(model, ScatterbrainConfig(window=64, n_features=64)):
        logits = model(ids).logits          # every self-attention layer now approximates

Each attention module draws its own features (seed + layer index, one draw per query head), kept
in a side table (not in the module, so state_dict and saving are untouched). A module can carry
its own `scatterbrain_config` attribute to override the global one.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.attention.features import orthogonal_gaussian
from rankwise.attention.lsh import lsh_scatterbrain_attention
from rankwise.attention.scatterbrain import (
    local_support,
    scatterbrain_attention,
    scatterbrain_dense,
)
from rankwise.linalg import compute_dtype

__all__ = ["NAME", "ScatterbrainConfig", "register", "scatterbrain_attention_forward", "use_scatterbrain"]

NAME = "scatterbrain"
_FEATURES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()
_DEFAULT: dict[str, ScatterbrainConfig] = {}


@dataclass(frozen=True)
class ScatterbrainConfig:
    """How each attention layer is approximated.

    Attributes:
        window: exact keys per query (causal local window incl. itself); 0 = none.
        n_features: Performer random features M; 0 = sparse-only attention.
        sparse: "local" (window) or "lsh" (SMYRF-style buckets: `n_hashes` rounds of clusters
            of `cluster_size`; `window` is then ignored).
        global_tokens: first keys always in the support (attention sinks).
        n_hashes, cluster_size: LSH settings.
        seed: feature seed; layer i uses seed + i.
        lowrank_chunk: chunk of the causal prefix sums.
    """

    window: int = 64
    n_features: int = 64
    sparse: str = "local"
    global_tokens: int = 0
    n_hashes: int = 2
    cluster_size: int = 64
    seed: int = 0
    lowrank_chunk: int = 128

    def __post_init__(self) -> None:
        for name in ("window", "n_features", "global_tokens", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("n_hashes", "cluster_size", "lowrank_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.sparse not in ("local", "lsh"):
            raise ValueError(f"sparse must be 'local' or 'lsh', got {self.sparse!r}")
        if self.sparse == "local" and self.window == 0 and self.n_features == 0 and self.global_tokens == 0:
            raise ValueError("window, n_features and global_tokens are all 0: nothing to attend with")

    @property
    def memory_per_query(self) -> int:
        """Attention entries kept per query: support size + features (the 'equal memory' unit)."""
        support = self.n_hashes * self.cluster_size if self.sparse == "lsh" else self.window
        return support + self.global_tokens + self.n_features


def _features(module: nn.Module, config: ScatterbrainConfig, heads: int, dim: int,
              dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if config.n_features == 0:
        return None
    layer = int(getattr(module, "layer_idx", 0) or 0)
    key = (config.n_features, config.seed + layer, heads, dim, dtype, str(device))
    hit = _FEATURES.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    omega = orthogonal_gaussian(config.n_features, dim, heads=heads, seed=config.seed + layer,
                                dtype=dtype).to(device)
    _FEATURES[module] = (key, omega)
    return omega


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def scatterbrain_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` function: q (B, H, n, d), k/v (B, H_kv, m, d) -> (B, n, H, d), None."""
    config = getattr(module, "scatterbrain_config", None) or _DEFAULT.get(NAME) or ScatterbrainConfig()
    if dropout and module.training:
        raise ValueError("scatterbrain attention has no dropout: set attention_dropout=0 or call model.eval()")
    groups = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
    n, m = query.shape[-2], k.shape[-2]
    dt = compute_dtype(query.dtype)
    omega = _features(module, config, query.shape[1], query.shape[-1], dt, query.device)
    causal = bool(getattr(module, "is_causal", True))
    if attention_mask is None and n == m:
        if config.sparse == "lsh":
            out = lsh_scatterbrain_attention(query, k, v, omega=omega, n_hashes=config.n_hashes,
                                             cluster_size=config.cluster_size, scaling=scaling,
                                             causal=causal, seed=config.seed,
                                             lowrank_chunk=config.lowrank_chunk)
        else:
            out = scatterbrain_attention(query, k, v, omega=omega, window=config.window, scaling=scaling,
                                         causal=causal, global_tokens=config.global_tokens,
                                         lowrank_chunk=config.lowrank_chunk)
    else:
        if config.sparse == "lsh":
            raise ValueError("sparse='lsh' supports unpadded inputs without a cache only: use sparse='local'")
        allowed = None
        if attention_mask is not None:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        support = local_support(n, m, config.window, causal=causal, device=query.device)
        if config.global_tokens:
            support = support | (torch.arange(m, device=query.device) < config.global_tokens)[None, :]
        out = scatterbrain_dense(query, k, v, support=support, omega=omega, scaling=scaling,
                                 causal=causal and attention_mask is None, allowed=allowed)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register(config: ScatterbrainConfig | None = None) -> str:
    """Register "scatterbrain" with transformers (idempotent); `config` becomes the global default."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, scatterbrain_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if config is not None:
        _DEFAULT[NAME] = config
    return NAME


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "o_proj")]
    if not mods:
        raise TypeError(
            f"found no Llama-style attention module (with num_key_value_groups and o_proj) in "
            f"{type(model).__name__}: use_scatterbrain supports Llama-family models (Llama, SmolLM2, Mistral, Qwen2)"
        )
    return mods


@contextlib.contextmanager
def use_scatterbrain(model: nn.Module, config: ScatterbrainConfig | None = None) -> Iterator[nn.Module]:
    """Context manager: every self-attention layer of `model` runs Scatterbrain; restored on exit."""
    config = config or ScatterbrainConfig()
    register()
    mods = _attention_modules(model)
    previous = [getattr(m, "scatterbrain_config", None) for m in mods]
    configs = [model.config] + [m.config for m in mods if getattr(m, "config", None) is not None]
    old_impl = [c._attn_implementation for c in configs]
    try:
        for m in mods:
            m.scatterbrain_config = config
        for c in configs:
            c._attn_implementation = NAME
        yield model
    finally:
        for c, impl in zip(configs, old_impl, strict=True):
            c._attn_implementation = impl
        for m, prev in zip(mods, previous, strict=True):
            if prev is None:
                with contextlib.suppress(AttributeError):
                    del m.scatterbrain_config
            else:
                m.scatterbrain_config = prev
