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

Embeddings follow sentence-transformers: the attention-mask-aware mean of the last hidden
states (all-MiniLM-L6-v2's ``1_Pooling/config.json``), then L2 normalisation.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

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

# Tokens of a split `evaluate_split` scores by default (32 windows of 512). SmolLM2-135M scores
# ~400 tokens/s on two idle CPU cores at seq_len 512 (measured), so `rankwise eval smollm2-135m`
# takes ~45 s including loading; `max_tokens=None` scores the whole split.
DEFAULT_EVAL_TOKENS = 16_384


# ----------------------------------------------------------------------------- perplexity


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """HF strided windows over n tokens: (begin, end, first scored position inside the window).

    Window k covers stream positions [begin, end); it scores positions [end - trg, end) where
    trg = end - previous end, except position 0 of the window (it has no context).
    """
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        trg = end - prev_end
        length = end - begin
        out.append((begin, end, max(1, length - trg)))
        prev_end = end
        if end == n:
            break
    return out


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def strided_nll(
    model: Any,
    ids: torch.Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) and number of scored tokens of a 1-D stream `ids`."""
    from tqdm.auto import tqdm

    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len} is too short: use seq_len >= 2")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride} must be in [1, seq_len={seq_len}]: lower it")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(
            f"seq_len {seq_len} exceeds the model's {limit} positions: pass <= {limit}"
        )
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {ids.numel()}: pass more text")
    # Group windows of equal shape so they batch (all but the first and last are alike).
    groups: dict[tuple[int, int], list[int]] = {}
    for begin, end, start in _windows(ids.numel(), seq_len, stride):
        groups.setdefault((end - begin, start), []).append(begin)
    keep_logits = _accepts(model, "logits_to_keep")
    device = _device(model)
    total, count = 0.0, 0
    n_windows = sum(len(b) for b in groups.values())
    with (
        torch.inference_mode(),
        tqdm(
            total=n_windows, desc="perplexity", unit="win", disable=not progress, leave=False
        ) as bar,
    ):
        for (length, start), begins in groups.items():
            for i in range(0, len(begins), batch_size):
                rows = torch.stack([ids[b : b + length] for b in begins[i : i + batch_size]])
                rows = rows.to(device)
                if keep_logits:  # only positions start-1 .. length-1 are needed
                    logits = _logits(model(rows, logits_to_keep=length - start + 1))[:, :-1]
                else:
                    logits = _logits(model(rows))[:, start - 1 : length - 1]
                targets = rows[:, start:length]
                nll = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    reduction="none",
                )
                total += nll.double().sum().item()
                count += targets.numel()
                bar.update(rows.shape[0])
    if math.isnan(total):
        raise ValueError(
            "the model produced NaN logits: check its weights (e.g. after compression) or run "
            "in float32"
        )
    return total, count


def perplexity(
    model: Any,
    tokenizer: Any | None,
    texts_or_ids: str | Sequence[str] | torch.Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of a causal LM on texts (each followed by EOS) or on a LongTensor of token ids.

    Args:
        model: a causal LM (``model(ids (B, L)).logits -> (B, L, V)``).
        tokenizer: used to tokenize texts; may be None when token ids are given.
        texts_or_ids: a text, a list of texts (each followed by EOS), or token ids (n,)
            (2-D ids are read row by row as one stream).
        seq_len: window length in tokens.
        stride: window step; defaults to seq_len (non-overlapping windows).
        batch_size: windows per forward pass.
        max_tokens: evaluate only the first max_tokens tokens (None or 0: all).
        progress: show a tqdm bar over windows.

    Returns:
        exp(total NLL / scored tokens), a Python float.
    """
    from rankwise.data import token_stream

    if isinstance(texts_or_ids, torch.Tensor):
        if texts_or_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
            raise TypeError(f"token ids must be an integer tensor, got {texts_or_ids.dtype}")
        ids = texts_or_ids.reshape(-1).long()
        ids = ids[:max_tokens] if max_tokens else ids
    else:
        if tokenizer is None:
            raise TypeError("texts need a tokenizer: pass one, or pass a LongTensor of token ids")
        texts = [texts_or_ids] if isinstance(texts_or_ids, str) else list(texts_or_ids)
        ids = token_stream(texts, tokenizer, max_tokens=max_tokens or None)
    total, count = strided_nll(
        model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=progress
    )
    return math.exp(total / count)


def evaluate_split(
    model: Any,
    tokenizer: Any,
    corpus: str = "python-docs",
    split: str = "test",
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = DEFAULT_EVAL_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a causal LM on a rankwise corpus split (``rankwise.data.load_corpus``).

    Returns:
        dict with perplexity, nll (mean nats per token), tokens (scored), stream_tokens,
        seconds, tokens_per_s, and the settings used.
    """
    from rankwise.data import load_corpus, token_stream

    ids = token_stream(load_corpus(corpus, split), tokenizer, max_tokens=max_tokens or None)
    start = time.perf_counter()
    total, count = strided_nll(
        model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=progress
    )
    seconds = time.perf_counter() - start
    return {
        "corpus": corpus,
        "split": split,
        "perplexity": math.exp(total / count),
        "nll": total / count,
        "tokens": count,
        "stream_tokens": int(ids.numel()),
        "max_tokens": max_tokens or None,
        "seq_len": seq_len,
        "stride": stride or seq_len,
        "seconds": seconds,
        "tokens_per_s": ids.numel() / seconds if seconds > 0 else float("inf"),
    }


# ----------------------------------------------------------------------------- accuracy


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


def _max_length(model: Any, max_length: int) -> int:
    """`max_length`, capped at the model's number of positions (longer inputs cannot run)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize, truncate to max_length and right-pad a batch: input_ids, attention_mask (B, L)."""
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


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


# ----------------------------------------------------------------------------- embeddings


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
