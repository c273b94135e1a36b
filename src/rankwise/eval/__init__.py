"""Evaluation: perplexity of causal LMs, accuracy, and sentence-embedding quality.

Perplexity follows Hugging Face's strided recipe ("Perplexity of fixed-length models",
transformers docs): the texts become one token stream (``rankwise.data.token_stream``: each text
followed by EOS, so document boundaries are scored too), cut into windows of
`seq_len` tokens that start every `stride` tokens. With ``stride == seq_len`` (the default) the
windows do not overlap and each scores all its tokens but the first; with ``stride < seq_len``
each window scores only its last `stride` tokens (the rest are context, label -100), so every
token after the first is scored exactly once, with at least ``seq_len - stride`` tokens of
context. PPL = exp(sum of token NLLs / number of scored tokens), summed in float64 over tokens
(not an average of per-window means, which would overweight a short last window).

Modules: `rankwise.eval.lm` (perplexity), `rankwise.eval.classification` (accuracy),
`rankwise.eval.embeddings` (pooling, similarity, topic accuracy); everything is re-exported here.

Embeddings follow sentence-transformers: the attention-mask-aware mean of the last hidden
states (all-MiniLM-L6-v2's ``1_Pooling/config.json``), then L2 normalisation.
"""

from __future__ import annotations

from rankwise.eval.classification import accuracy, classification_accuracy
from rankwise.eval.embeddings import (
    embed,
    embedding_similarity,
    nearest_centroid_accuracy,
    topic_accuracy,
)
from rankwise.eval.lm import (
    DEFAULT_EVAL_TOKENS,
    _windows,  # noqa: F401  (tests check the window layout)
    evaluate_split,
    perplexity,
    strided_nll,
)

__all__ = [
    "DEFAULT_EVAL_TOKENS",
    "accuracy",
    "classification_accuracy",
    "embed",
    "embedding_similarity",
    "evaluate_split",
    "nearest_centroid_accuracy",
    "perplexity",
    "strided_nll",
    "topic_accuracy",
]
