"""Measurements the pipeline decides and reports with: held-out perplexity and latency.

Decisions (method, allocation, compensation, healing) are measured on held-out data that the
calibration and healing never see: the python-docs validation split, or the last 10 % of the
user's text. The reported perplexity is on the python-docs test split (`evaluate_split`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["decode_latency_vs", "domain_perplexities", "heldout_perplexity", "latency_vs", "split_text",
           "test_perplexity"]

HELDOUT_FRACTION = 0.1


def split_text(tokenizer: Any, text: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token streams.

    `text`: None (the python-docs train/validation splits), an embedded corpus name (its
    train/validation splits), a list of documents, or any source `rankwise.data.load_texts`
    reads (file, folder, glob); the last two are cut 90/10 into train and held-out tokens.
    """
    from rankwise.data import corpus_names, corpus_splits, load_corpus, load_texts, token_stream

    name = "python-docs" if text is None else text
    if isinstance(name, str) and name in corpus_names() and "validation" in corpus_splits(name):
        return (token_stream(load_corpus(name, "train"), tokenizer),
                token_stream(load_corpus(name, "validation"), tokenizer))
    if isinstance(text, list | tuple):
        if not text or not all(isinstance(t, str) for t in text):
            raise ValueError("text as a list must hold the documents as non-empty strings")
        docs = list(text)
    else:
        docs = load_texts(text, "train")
    stream = token_stream(docs, tokenizer)
    cut = int(stream.numel() * (1 - HELDOUT_FRACTION))
    if cut < 2048 or stream.numel() - cut < 256:
        raise ValueError(f"the healing text has {stream.numel()} tokens; at least ~3,000 are needed to "
                         "train and hold out 10 % for measurement: pass a longer text")
    return stream[:cut], stream[cut:]


def _window(model: nn.Module, seq_len: int) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(seq_len, limit) if isinstance(limit, int) else seq_len


@torch.no_grad()
def heldout_perplexity(model: nn.Module, ids: torch.Tensor, *, seq_len: int = 512) -> float:
    """Perplexity on a held-out token stream (non-overlapping windows)."""
    from rankwise.eval import perplexity

    was = model.training
    model.eval()
    try:
        return perplexity(model, None, ids, seq_len=min(_window(model, seq_len), ids.numel() - 1), progress=False)
    finally:
        model.train(was)


def test_perplexity(model: nn.Module, tokenizer: Any, max_tokens: int) -> float:
    """Perplexity on the embedded python-docs test split (the reported number)."""
    from rankwise.eval import evaluate_split

    model.eval()
    return evaluate_split(model, tokenizer, "python-docs", "test", max_tokens=max_tokens,
                          seq_len=_window(model, 512), progress=False)["perplexity"]


def domain_perplexities(model: nn.Module, tokenizer: Any, max_tokens: int,
                        domains: Any = None) -> dict[str, float]:
    """Perplexity on the test split of every embedded LM domain (rankwise.data.domains), first
    `max_tokens` tokens each (512-token windows): the per-domain figures every report shows."""
    from rankwise.data.domains import DOMAINS, domain_stream

    return {name: heldout_perplexity(model, domain_stream(name, "test", tokenizer, max_tokens=max_tokens))
            for name in (domains or DOMAINS)}


def _first_token_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """The forward arguments of `generate`'s prefill (KV cache, last position's logits only), or
    None when the model's forward has no `logits_to_keep`."""
    import inspect

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return {"use_cache": True, "logits_to_keep": 1}


@torch.inference_mode()
def latency_vs(model: nn.Module, reference: nn.Module, *, tokens: int = 256, repeats: int = 7,
               vocab: int | None = None, first_token: bool = False) -> dict[str, float] | None:
    """Median forward time of `model` and `reference` on one (1, tokens) batch, interleaved so
    that load from other processes hits both alike; returns ms and the ratio.

    `first_token=True` times what `generate` does before its first token instead (time to first
    token): the same forward with a KV cache and only the last position's logits, so the output
    head costs one row, not `tokens`; None for models without `logits_to_keep`.
    """
    kwargs: dict[str, Any] | None = {}
    if first_token:
        kwargs = _first_token_kwargs(model)
        if kwargs is None or _first_token_kwargs(reference) is None:
            return None
    vocab = vocab or int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    model.eval()
    reference.eval()
    model(ids, **kwargs)
    reference(ids, **kwargs)  # warm-up
    mine, ref = [], []
    for _ in range(repeats):
        for net, acc in ((reference, ref), (model, mine)):
            t = time.perf_counter()
            net(ids, **kwargs)
            acc.append(time.perf_counter() - t)
    m, r = statistics.median(mine), statistics.median(ref)
    return {"latency_ms": 1e3 * m, "dense_ms": 1e3 * r, "latency_vs_dense": m / r, "tokens": tokens,
            "repeats": repeats}


def _decode_seconds(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per generated token: greedy steps of one token each on the KV cache of `prompt`."""
    out = model(prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def decode_latency_vs(model: nn.Module, reference: nn.Module, *, prompt_tokens: int = 64, steps: int = 32,
                      repeats: int = 5, vocab: int | None = None) -> dict[str, float] | None:
    """Per-token generation time (KV cache, one token a step) of `model` and `reference`,
    interleaved medians; None for models without a KV cache (not a Hugging Face causal LM).

    Prefill (`latency_vs`) is compute-bound; decoding one token at a time reads every weight once
    a token, so it shows the bandwidth side of a smaller model.
    """
    if not hasattr(model, "generate") or not hasattr(reference, "generate"):
        return None
    vocab = vocab or int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    model.eval()
    reference.eval()
    _decode_seconds(model, prompt, 2)
    _decode_seconds(reference, prompt, 2)  # warm-up
    mine, ref = [], []
    for _ in range(repeats):
        ref.append(_decode_seconds(reference, prompt, steps))
        mine.append(_decode_seconds(model, prompt, steps))
    m, r = statistics.median(mine), statistics.median(ref)
    return {"ms_per_token": 1e3 * m, "dense_ms_per_token": 1e3 * r, "latency_vs_dense": m / r,
            "prompt_tokens": prompt_tokens, "steps": steps, "repeats": repeats}


PROMPTS: tuple[str, ...] = ("The capital of France is", "Once upon a time, there was a",
                            "The best way to learn a new language is")


@torch.inference_mode()
def generations(model: nn.Module, reference: nn.Module, tokenizer: Any, prompts: tuple[str, ...] = PROMPTS,
                tokens: int = 20) -> list[dict[str, str]] | None:
    """Greedy continuations (`tokens` new tokens) of the same prompts by `reference` (dense) and
    `model`: what a user sees first. None for models that cannot generate."""
    if tokenizer is None or not hasattr(model, "generate") or not hasattr(reference, "generate"):
        return None
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        row = {"prompt": prompt}
        for key, net in (("dense", reference), ("shrunk", model)):
            net.eval()
            out = net.generate(ids, max_new_tokens=tokens, do_sample=False,
                               pad_token_id=getattr(tokenizer, "eos_token_id", None))
            row[key] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append(row)
    return rows
