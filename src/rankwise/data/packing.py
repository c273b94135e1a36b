"""Pack texts into fixed-length token blocks, and sample calibration windows from them.

Packing (as in GPT-2/nanoGPT pretraining data): tokenise every document without special tokens
or truncation, append EOS after each, concatenate into one stream and cut it into rows of
``seq_len`` tokens. No padding, no wasted positions, documents may straddle rows.

Calibration batches (the activations that whitened-SVD / GPTQ-style compressors fit on) are
``n`` non-overlapping windows of the packed stream drawn with a seeded generator, like GPTQ's
random C4 windows but reproducible from ``seed`` alone.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from rankwise.data.corpus import corpus_names, topic_names
from rankwise.data.loaders import load_texts
from rankwise.linalg import make_generator

__all__ = ["PackedLMDataset", "calibration_batch", "pack_tokens", "token_stream"]

logger = logging.getLogger(__name__)

Encoder = Callable[[list[str]], list[list[int]]]


def _encoder(tokenizer: Any) -> Encoder:
    """A batch encoder without special tokens, truncation or the too-long-sequence warning."""
    if callable(tokenizer) and hasattr(tokenizer, "eos_token_id"):  # transformers tokenizer
        def encode(batch: list[str]) -> list[list[int]]:
            # verbose=False: documents are longer than model_max_length on purpose (they are
            # cut into blocks afterwards); this is the switch transformers offers for its warning.
            out = tokenizer(batch, add_special_tokens=False, verbose=False,
                            return_attention_mask=False)
            return [list(ids) for ids in out["input_ids"]]
        return encode
    if hasattr(tokenizer, "encode_batch"):  # a bare `tokenizers.Tokenizer`
        return lambda batch: [e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False)]
    raise TypeError(f"unsupported tokenizer {type(tokenizer).__name__}: pass a transformers "
                    "tokenizer or a tokenizers.Tokenizer")


def _eos_id(tokenizer: Any, eos_id: int | None) -> int:
    if eos_id is not None:
        return int(eos_id)
    found = getattr(tokenizer, "eos_token_id", None)
    if found is None:
        raise ValueError("the tokenizer has no eos_token_id: pass eos_id=<token id> or add_eos=False")
    return int(found)


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string: wrap it as [text]")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, not str")


def token_stream(texts: Sequence[str], tokenizer: Any, *, add_eos: bool = True,
                 max_tokens: int | None = None, eos_id: int | None = None,
                 batch_size: int = 64) -> torch.Tensor:
    """Token ids of all texts concatenated, EOS after each: (total,) int64.

    Tokenises ``batch_size`` documents at a time (fast tokenizers parallelise inside a batch)
    and stops early once ``max_tokens`` are collected (the stream is then cut to that length).
    """
    _check_texts(texts)
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    encode = _encoder(tokenizer)
    eos = _eos_id(tokenizer, eos_id) if add_eos else None
    flat: list[int] = []
    for start in range(0, len(texts), batch_size):
        for ids in encode(list(texts[start:start + batch_size])):
            flat.extend(ids)
            if eos is not None:
                flat.append(eos)
        if max_tokens is not None and len(flat) >= max_tokens:
            del flat[max_tokens:]
            break
    return torch.tensor(flat, dtype=torch.long)


def _check_seq_len(seq_len: int) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")


def _pad_id(tokenizer: Any, pad_id: int | None, eos_id: int | None) -> int | None:
    """pad_id, else the tokenizer's pad id, else the EOS id (None when there is none)."""
    if pad_id is not None:
        return pad_id
    found = getattr(tokenizer, "pad_token_id", None)
    if found is not None:
        return int(found)
    return eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)


def _blocks(stream: torch.Tensor, seq_len: int, drop_last: bool, pad_id: int | None) -> torch.Tensor:
    n_full, rest = divmod(stream.numel(), seq_len)
    if drop_last or rest == 0:
        if n_full == 0:
            raise ValueError(f"the texts give only {stream.numel()} tokens, fewer than seq_len="
                             f"{seq_len}: lower seq_len, add text, or pass drop_last=False")
        return stream[: n_full * seq_len].view(n_full, seq_len)
    if pad_id is None:
        raise ValueError("drop_last=False pads the last block: pass pad_id=<token id>")
    padded = torch.full(((n_full + 1) * seq_len,), int(pad_id), dtype=torch.long)
    padded[: stream.numel()] = stream
    return padded.view(n_full + 1, seq_len)


def pack_tokens(texts: Sequence[str], tokenizer: Any, seq_len: int, *, add_eos: bool = True,
                drop_last: bool = True, max_tokens: int | None = None, eos_id: int | None = None,
                pad_id: int | None = None) -> torch.Tensor:
    """Pack texts into rows of exactly ``seq_len`` tokens: (n, seq_len) int64.

    Args:
        texts: documents; each is tokenised whole (no truncation, no special tokens).
        tokenizer: a transformers tokenizer, or a ``tokenizers.Tokenizer`` with ``eos_id=``.
        seq_len: tokens per row.
        add_eos: append the EOS id after every document (so the model sees boundaries).
        drop_last: drop the final partial row; if False it is padded with ``pad_id``
            (default: the tokenizer's pad id, else its EOS id).
        max_tokens: stop tokenising once this many stream tokens are collected.
        eos_id / pad_id: override the tokenizer's ids.

    Row-major flattening of the result is a prefix of the token stream (``token_stream``).
    """
    _check_seq_len(seq_len)
    stream = token_stream(texts, tokenizer, add_eos=add_eos, max_tokens=max_tokens, eos_id=eos_id)
    if not drop_last:
        pad_id = _pad_id(tokenizer, pad_id, eos_id)
    return _blocks(stream, seq_len, drop_last, pad_id)


class PackedLMDataset(Dataset):
    """Causal-LM examples over packed blocks: ``{"input_ids": (seq_len,), "labels": (seq_len,)}``.

    ``labels`` equals ``input_ids`` (Hugging Face causal LMs shift them internally), except that
    positions past ``n_tokens`` (padding of a last partial block) are -100 and ignored by the loss.
    """

    def __init__(self, blocks: torch.Tensor, *, n_tokens: int | None = None) -> None:
        if blocks.ndim != 2 or blocks.dtype != torch.long:
            raise ValueError(f"blocks must be a (n, seq_len) int64 tensor, got {tuple(blocks.shape)} "
                             f"{blocks.dtype}: build it with pack_tokens")
        self.blocks = blocks
        self.labels = blocks.clone()
        if n_tokens is not None:
            self.labels.view(-1)[n_tokens:] = -100

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Any, seq_len: int, *,
                   add_eos: bool = True, drop_last: bool = True, max_tokens: int | None = None,
                   eos_id: int | None = None, pad_id: int | None = None) -> PackedLMDataset:
        """Pack ``texts`` as ``pack_tokens`` does and wrap them; a padded tail gets labels -100."""
        _check_seq_len(seq_len)
        stream = token_stream(texts, tokenizer, add_eos=add_eos, max_tokens=max_tokens,
                              eos_id=eos_id)
        if not drop_last:
            pad_id = _pad_id(tokenizer, pad_id, eos_id)
        return cls(_blocks(stream, seq_len, drop_last, pad_id), n_tokens=stream.numel())

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1]

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.labels[index]}


# Token streams of embedded corpora per live tokenizer: the corpora never change, and tokenising
# the python-docs train split takes seconds, so repeated calibration_batch calls reuse it.
_STREAMS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _calibration_stream(tokenizer: Any, source: Any, split: str, field: str) -> torch.Tensor:
    embedded = isinstance(source, str) and source in corpus_names() + topic_names()
    if not embedded:
        return token_stream(load_texts(source, split, field=field), tokenizer)
    try:
        per_tokenizer = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        return token_stream(load_texts(source, split, field=field), tokenizer)
    key = (source, split)
    if key not in per_tokenizer:
        per_tokenizer[key] = token_stream(load_texts(source, split, field=field), tokenizer)
    return per_tokenizer[key]


def calibration_batch(tokenizer: Any, n: int = 32, seq_len: int = 256, *,
                      source: Any = "python-docs", split: str = "train", seed: int = 0,
                      field: str = "text") -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from the packed stream: (n, seq_len) int64.

    The source (anything ``load_texts`` accepts) is packed with EOS between documents; the
    stream is cut into non-overlapping windows after a random offset and ``n`` distinct windows
    are drawn, all from ``torch.Generator().manual_seed(seed)``: same seed, same batch. The token
    stream of an embedded corpus is cached per tokenizer object for the life of that object.

    Args:
        tokenizer: a transformers tokenizer (its EOS id separates documents).
        n: number of windows (rows).
        seq_len: tokens per window.
        source: anything ``load_texts`` accepts; ``split`` and ``field`` are passed to it.
        seed: seeds the offset and the choice of windows.
    """
    if n <= 0 or seq_len <= 0:
        raise ValueError(f"n and seq_len must be positive, got n={n}, seq_len={seq_len}")
    stream = _calibration_stream(tokenizer, source, split, field)
    need = n * seq_len
    if stream.numel() < need:
        raise ValueError(
            f"source {source!r} (split {split!r}) has only {stream.numel()} tokens with this "
            f"tokenizer, but n * seq_len = {n} * {seq_len} = {need} are needed: lower n or "
            "seq_len, or pass a larger source="
        )
    gen = make_generator(seed)  # one seeded-generator helper (rankwise.linalg)
    windows = stream.numel() // seq_len
    offset = int(torch.randint(stream.numel() - windows * seq_len + 1, (1,), generator=gen))
    blocks = stream[offset: offset + windows * seq_len].view(windows, seq_len)
    chosen = torch.randperm(windows, generator=gen)[:n]
    logger.debug("calibration: %d of %d windows of %d tokens, offset %d", n, windows, seq_len, offset)
    return blocks[chosen]  # advanced indexing copies: the cached stream stays untouched
