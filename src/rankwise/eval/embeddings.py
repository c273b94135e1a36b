"""Sentence embeddings and their quality: pooled hidden states, similarity, nearest-centroid topic
accuracy.

Pooling follows sentence-transformers: the attention-mask-aware mean of the last hidden states
(all-MiniLM-L6-v2's ``1_Pooling/config.json``), e = sum_t m_t h_t / sum_t m_t, then L2
normalisation e / ||e||_2 ("cls" takes the first token, "last" the last unmasked one). Topic
accuracy assigns each test text to the class whose mean training embedding (centroid) has the
highest cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from rankwise.eval._model import _device, _encode, _max_length
from rankwise.eval.classification import accuracy

_POOLINGS = ("mean", "cls", "last")


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, d) hidden states + (B, L) mask -> (B, d)."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":  # last non-pad token (right padding): the causal-LM summary token
        last = mask.long().sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}: choose one of {', '.join(_POOLINGS)}")


def embed(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int = 256,
) -> torch.Tensor:
    """Sentence embeddings (N, d) from the last hidden states of `model`'s backbone.

    Padding never changes a text's embedding: mean pooling averages only positions whose
    attention mask is 1. Texts are batched by length (fewer pads), results in input order.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("no texts to embed: pass at least one")
    if pooling not in _POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: choose one of {', '.join(_POOLINGS)}")
    backbone = getattr(model, "base_model", model)  # e.g. LlamaForCausalLM -> LlamaModel
    device = _device(model)
    max_length = _max_length(model, max_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            batch = {
                k: v.to(device)
                for k, v in _encode(tokenizer, [texts[j] for j in idx], max_length).items()
            }
            output = backbone(**batch)
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            vecs = _pool(hidden.float(), batch["attention_mask"], pooling)
            if normalize:
                vecs = F.normalize(vecs, dim=-1)
            for j, v in zip(idx, vecs.cpu(), strict=True):
                out[j] = v
    return torch.stack(out)


def embedding_similarity(
    model_a: Any, model_b: Any, tokenizer: Any, texts: Sequence[str], **embed_kwargs: Any
) -> dict[str, float]:
    """Cosine similarity of each text's embedding under two models (e.g. before/after compression).

    Returns:
        {"mean_cosine", "min_cosine"}: 1.0 for identical models.
    """
    embed_kwargs = {**embed_kwargs, "normalize": True}
    a = embed(model_a, tokenizer, texts, **embed_kwargs)
    b = embed(model_b, tokenizer, texts, **embed_kwargs)
    if a.shape != b.shape:
        raise ValueError(
            f"embeddings differ in width ({a.shape[1]} vs {b.shape[1]}): compare models of one family"
        )
    cos = (a.double() * b.double()).sum(-1)
    return {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item()}


def nearest_centroid_accuracy(
    train: torch.Tensor,
    train_labels: Sequence[int] | torch.Tensor,
    test: torch.Tensor,
    test_labels: Sequence[int] | torch.Tensor,
) -> float:
    """Accuracy of classifying `test` (M, d) by the cosine-nearest class centroid of `train` (N, d)."""
    train_labels = torch.as_tensor(train_labels)
    classes = torch.unique(train_labels)
    train = F.normalize(train.double(), dim=-1)
    centroids = torch.stack([train[train_labels == c].mean(0) for c in classes])
    scores = F.normalize(test.double(), dim=-1) @ F.normalize(centroids, dim=-1).T  # (M, C)
    return accuracy(classes[scores.argmax(-1)], torch.as_tensor(test_labels))


def topic_accuracy(
    model: Any,
    tokenizer: Any,
    corpus: str = "fortunes",
    *,
    train_split: str = "train",
    test_split: str = "test",
    batch_size: int = 32,
    max_length: int = 256,
) -> dict[str, Any]:
    """Nearest-centroid topic accuracy of mean-pooled embeddings (``rankwise.data.load_topics``)."""
    from rankwise.data import load_topics

    def split(name: str) -> tuple[list[str], torch.Tensor, list[str]]:
        data = load_topics(corpus, name)
        if isinstance(data, tuple):
            texts, labels, names = data
        else:
            texts, labels, names = data.texts, data.labels, data.label_names
        return list(texts), torch.as_tensor(labels), list(names)

    train_texts, train_labels, names = split(train_split)
    test_texts, test_labels, _ = split(test_split)
    kw = {"batch_size": batch_size, "max_length": max_length}
    acc = nearest_centroid_accuracy(
        embed(model, tokenizer, train_texts, **kw),
        train_labels,
        embed(model, tokenizer, test_texts, **kw),
        test_labels,
    )
    return {
        "corpus": corpus,
        "accuracy": acc,
        "chance": 1.0 / len(names),
        "classes": names,
        "train_texts": len(train_texts),
        "test_texts": len(test_texts),
    }
