"""Language-modelling domains: the embedded texts a model is scored on, and mixtures of them.

A compressed model is only as good as its worst domain: a model calibrated and healed on the
Python docs can match the dense model there and be several times worse on English prose it
never saw. The embedded corpora give three domains of different kinds:

* ``python-docs``: technical prose with code (the Python 3.11 documentation);
* ``fortunes``: the fortune quotes' text (modern English, short, many authors);
* ``devils-dictionary``: literary English prose and verse (Bierce, 1911).

``domain_stream`` packs one split of a domain into a token stream (EOS between documents);
``mixture_windows`` draws training windows from several domains in equal shares, the data of
mixture healing and mixed calibration. Provenance of the texts: DATA.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rankwise.linalg import make_generator

__all__ = ["DOMAINS", "domain_splits", "domain_stream", "domain_texts", "mixture_batches", "mixture_windows"]

DOMAINS: tuple[str, ...] = ("python-docs", "fortunes", "devils-dictionary")

# Per tokenizer object: packed streams of (domain, split); the texts never change.
_STREAMS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], torch.Tensor]] = weakref.WeakKeyDictionary()


def _check(name: str) -> None:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}: choose from {list(DOMAINS)}")


def domain_splits(name: str) -> list[str]:
    """The splits a domain has (fortunes: train and test; the corpora: train, validation, test)."""
    from rankwise.data.corpus import corpus_splits, topic_splits

    _check(name)
    return topic_splits(name) if name == "fortunes" else corpus_splits(name)


def domain_texts(name: str, split: str) -> list[str]:
    """One string per document (a quote, a dictionary entry, a doc page) of a domain's split."""
    from rankwise.data.corpus import load_corpus, load_topics

    _check(name)
    if name == "fortunes":
        return load_topics(name, split).texts
    return load_corpus(name, split)


def domain_stream(name: str, split: str, tokenizer: Any, *, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of a domain's split, documents joined by EOS, cut to `max_tokens` (cached)."""
    from rankwise.data.packing import token_stream

    key = (name, split)
    try:
        cache = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced
        cache = {}
    if key not in cache:
        cache[key] = token_stream(domain_texts(name, split), tokenizer)
    stream = cache[key]
    return stream if max_tokens is None else stream[:max_tokens]


def mixture_windows(names: Sequence[str], tokenizer: Any, n: int, seq_len: int, *, split: str = "train",
                    seed: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` tokens, domain by domain in turn (equal shares, whatever each
    domain's size), each a random non-overlapping window of its domain's packed stream."""
    if not names:
        raise ValueError("a mixture needs at least one domain")
    if n < 1 or seq_len < 1:
        raise ValueError(f"n and seq_len must be positive, got n={n}, seq_len={seq_len}")
    pools = []
    gen = make_generator(seed)  # one seeded-generator helper (rankwise.linalg)
    for name in names:
        stream = domain_stream(name, split, tokenizer)
        count = stream.numel() // seq_len
        if count < 1:
            raise ValueError(f"domain {name!r} ({split}) has {stream.numel()} tokens, fewer than one window of "
                             f"{seq_len}: lower seq_len")
        windows = stream[: count * seq_len].view(count, seq_len)
        pools.append(windows[torch.randperm(count, generator=gen)])
    rows = [pools[i % len(pools)][(i // len(pools)) % pools[i % len(pools)].shape[0]] for i in range(n)]
    return torch.stack(rows)


def mixture_batches(names: Sequence[str], tokenizer: Any, batch_size: int, seq_len: int, *,
                    split: str = "train", seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches (batch_size, seq_len) whose rows cycle through the domains: every batch
    holds the domains in equal shares (up to one row), every window of a domain is used once
    before any repeats (a fresh shuffle per pass)."""
    epoch = 0
    while True:
        per_pass = max(len(domain_stream(d, split, tokenizer)) // seq_len for d in names) * len(names)
        windows = mixture_windows(names, tokenizer, per_pass, seq_len, split=split, seed=seed + epoch)
        for i in range(0, windows.shape[0] - batch_size + 1, batch_size):
            yield windows[i:i + batch_size]
        epoch += 1
