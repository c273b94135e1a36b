"""rankwise.attention: approximate softmax attention (Scatterbrain: sparse + low-rank).

    from rankwise.attention import ScatterbrainConfig, use_scatterbrain
    with use_scatterbrain(model, ScatterbrainConfig(window=64, n_features=64)):
        print(rankwise.eval.perplexity(model, tok, texts))

Modules: features (Performer random features), scatterbrain (local-window Scatterbrain, the dense
reference and exact attention), lsh (LSH-bucketed support), hf (transformers AttentionInterface
registration). Importing this package does not import transformers.
"""

from __future__ import annotations

from rankwise.attention.features import log_features, orthogonal_gaussian
from rankwise.attention.hf import (
    ScatterbrainConfig,
    register,
    scatterbrain_attention_forward,
    use_scatterbrain,
)
from rankwise.attention.lsh import lsh_scatterbrain_attention, lsh_support
from rankwise.attention.scatterbrain import (
    exact_attention,
    local_support,
    scatterbrain_attention,
    scatterbrain_dense,
)

__all__ = [
    "ScatterbrainConfig",
    "exact_attention",
    "local_support",
    "log_features",
    "lsh_scatterbrain_attention",
    "lsh_support",
    "orthogonal_gaussian",
    "register",
    "scatterbrain_attention",
    "scatterbrain_attention_forward",
    "scatterbrain_dense",
    "use_scatterbrain",
]
