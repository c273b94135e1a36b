"""Per-document results of rankwise's rolling perplexity tasks (lm-eval `process_results`)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["rolling_results"]


def rolling_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """(log-likelihood, count) pairs that lm-eval's weighted_perplexity / bits_per_byte
    aggregate: words split on whitespace and UTF-8 bytes of the document, as its wikitext task.
    """
    (loglikelihood,) = results
    text = doc["text"]
    words = len(re.split(r"\s+", text.strip())) if text.strip() else 0
    size = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }
