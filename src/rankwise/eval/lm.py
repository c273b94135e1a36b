"""Strided perplexity of causal language models (see `rankwise.eval` for the recipe).

With windows of `seq_len` tokens starting every `stride` tokens, window w scores the tokens it
does not share with window w - 1 (label -100 on the rest), so every token after the first is
scored exactly once, with at least seq_len - stride tokens of context, and

    PPL = exp( sum_t NLL_t / #scored tokens ),

the NLLs summed in float64 over tokens (not an average of per-window means, which would
overweight a short last window). This is Hugging Face's recipe ("Perplexity of fixed-length
models", transformers documentation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from rankwise.eval._model import _accepts, _device, _logits

# Tokens of a split `evaluate_split` scores by default (32 windows of 512). SmolLM2-135M scores
# ~400 tokens/s on two idle CPU cores at seq_len 512 (measured), so `rankwise eval smollm2-135m`
# takes ~45 s including loading; `max_tokens=None` scores the whole split.
DEFAULT_EVAL_TOKENS = 16_384


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
