"""Accuracy of predictions and of a sequence-classification model on labelled texts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rankwise.eval._model import _device, _encode, _logits, _max_length


def accuracy(logits_or_predictions: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
    """Fraction of correct predictions; logits (N, C) are argmax-ed, integer predictions (N,) used as is."""
    labels = torch.as_tensor(labels)
    preds = torch.as_tensor(logits_or_predictions)
    if preds.is_floating_point():
        if preds.ndim != labels.ndim + 1:
            raise ValueError(
                f"logits {tuple(preds.shape)} need one more dimension than labels "
                f"{tuple(labels.shape)}: pass logits (N, C) with labels (N,)"
            )
        preds = preds.argmax(-1)
    if preds.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape: "
            "pass one prediction per label"
        )
    if labels.numel() == 0:
        raise ValueError("no labels: accuracy of an empty set is undefined")
    return (preds == labels.to(preds.device)).double().mean().item()


def classification_accuracy(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 32,
    max_length: int = 256,
) -> float:
    """Accuracy of a sequence-classification model (``model(...).logits -> (B, C)``) on texts."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels: pass one label per text")
    device = _device(model)
    max_length = _max_length(model, max_length)
    preds = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = {
                k: v.to(device)
                for k, v in _encode(tokenizer, texts[i : i + batch_size], max_length).items()
            }
            preds.append(_logits(model(**batch)).argmax(-1).cpu())
    return accuracy(torch.cat(preds), torch.as_tensor(labels))
