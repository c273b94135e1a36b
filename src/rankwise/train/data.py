"""Pretraining data: the corpus tokenised into rows, and the step-indexed row order.

The train split is tokenised up to the token budget and packed into rows; row order is a seeded
permutation per epoch computed from the step alone (`batch_rows`), so the data position is the
step and a resumed run reads exactly the rows the uninterrupted run would. Validation
perplexity is scored on a fixed prefix (`eval_tokens`) of the validation split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankwise.linalg import make_generator
from rankwise.train.config import PretrainConfig

__all__ = ["PretrainData", "batch_rows", "load_tokenizer", "prepare_data"]


@dataclass
class PretrainData:
    """Token ids of a run: train rows (n, seq_len) int64, validation stream (m,) int64.

    `vocab_map[i]` is the tokenizer id of model id i when the vocabulary was limited (the last
    model id stands for every other token); None for the full vocabulary.
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    vocab_map: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.train.ndim != 2 or self.train.dtype != torch.long or self.train.shape[0] < 1:
            raise ValueError(f"train must be a non-empty (n, seq_len) int64 tensor, got "
                             f"{tuple(self.train.shape)} {self.train.dtype}")
        if self.val.ndim != 1 or self.val.dtype != torch.long or self.val.numel() < 2:
            raise ValueError("val must be a (m,) int64 tensor with at least 2 tokens")
        top = int(max(self.train.max(), self.val.max()))
        if top >= self.vocab_size or int(min(self.train.min(), self.val.min())) < 0:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}), found "
                             f"{top}: raise vocab_size or remap the ids")


def load_tokenizer(name_or_path: str) -> Any:
    """A bundled model's tokenizer, or a directory holding only tokenizer files."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from rankwise.models import load_tokenizer as load

    return load(name_or_path)


def prepare_data(config: PretrainConfig, tokenizer: Any | None = None) -> tuple[PretrainData, Any]:
    """Tokenise the corpus for `config` (train up to the token budget, validation prefix).

    Returns:
        (data, tokenizer); the tokenizer is loaded from `config.tokenizer` when not given.
    """
    from rankwise.data import load_corpus, token_stream

    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer)
    train = token_stream(load_corpus(config.corpus, "train"), tokenizer,
                         max_tokens=config.tokens)
    val = token_stream(load_corpus(config.corpus, "validation"), tokenizer,
                       max_tokens=config.eval_tokens)
    rows = train.numel() // config.seq_len
    if rows < 1:
        raise ValueError(f"the {config.corpus} train split gives fewer than seq_len="
                         f"{config.seq_len} tokens: lower seq_len")
    train = train[: rows * config.seq_len].view(rows, config.seq_len)
    vocab, vocab_map = len(tokenizer), None
    if config.vocab_limit is not None and config.vocab_limit < vocab:
        counts = torch.bincount(train.reshape(-1), minlength=vocab)
        order = torch.argsort(-counts, stable=True)  # most frequent first, ties by id
        vocab_map = order[: config.vocab_limit - 1].clone()
        lookup = torch.full((vocab,), config.vocab_limit - 1, dtype=torch.long)
        lookup[vocab_map] = torch.arange(config.vocab_limit - 1)
        train, val, vocab = lookup[train], lookup[val], config.vocab_limit
    return PretrainData(train, val, vocab, vocab_map), tokenizer


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = make_generator(seed * 1_000_003 + epoch)  # one seeded-generator helper (rankwise.linalg)
    return torch.randperm(n, generator=gen)


def batch_rows(step: int, batch_size: int, n_rows: int, seed: int) -> torch.Tensor:
    """Row indices of update `step` (0-based): sample s = step * B + j is row
    perm_epoch[s mod n] with epoch = s // n, a fresh seeded permutation per epoch."""
    samples = range(step * batch_size, (step + 1) * batch_size)
    return torch.stack([_epoch_order(n_rows, seed, s // n_rows)[s % n_rows] for s in samples])

